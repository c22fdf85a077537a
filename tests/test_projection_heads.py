"""A CLIP or SigLIP image tower's head projects into an image-text space: it has a head but no classes. vitviz
never offers or predicts a "class" of it (the brief: never fake a class the model does not have)."""

from __future__ import annotations

import pytest
import timm
import torch

from vitviz.errors import ModelError
from vitviz.explain import explain
from vitviz.models.labels import PROJECTION_KEY, has_classes, has_head, is_projection_head, predict
from vitviz.targets import resolve_target


def _timm(name: str, **kw):
    return timm.create_model(name, pretrained=False, depth=1, embed_dim=32, num_heads=2, img_size=32, **kw).eval()


@pytest.mark.parametrize(("name", "classes"), [
    ("vit_base_patch16_clip_224.openai", False),  # the image tower: a 512-d projection
    ("vit_base_patch16_clip_224.openai_ft_in1k", True),  # fine-tuned on ImageNet: a classifier
    ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", True),
])
def test_timms_own_clip_towers_have_a_head_but_no_classes_unless_fine_tuned(name, classes):
    model = _timm(name)
    assert has_head(model) and has_classes(model) == classes and is_projection_head(model) == (not classes)


def test_a_projection_head_yields_no_predictions_and_no_class_target():
    model = _timm("vit_tiny_patch16_224", num_classes=16)
    assert has_classes(model)
    model.pretrained_cfg = {**model.pretrained_cfg, PROJECTION_KEY: True}  # as vitviz's CLIP builders mark theirs
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ModelError, match="image-text embedding space"):
        resolve_target(model, "class", None)
    with pytest.raises(ModelError, match="no predictions"):
        predict(model, x)
    assert resolve_target(model, "auto", None).kind == "embedding"
    e = explain(model, x, method="gradxattn")
    assert e.predictions == () and e.target.kind == "embedding"


def test_the_towers_vitviz_builds_say_they_project(tmp_path):
    """open_clip's tower (models.clip) and a transformers CLIP vision model with projection (models.hf)."""
    from .helpers import require_extra

    transformers = require_extra("transformers", "hf")
    from vitviz.models import get_model

    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    model, _info = get_model(str(tmp_path / "clip"), img_size=32)
    assert has_head(model) and is_projection_head(model) and not has_classes(model)
