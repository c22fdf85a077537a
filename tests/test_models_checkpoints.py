"""Checkpoints and models: nested and plain state dicts, pickles that would run code, wrong architectures, and
models vitviz cannot read, each refused by name.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitviz.analysis.onepass import analyze
from vitviz.cli import main
from vitviz.errors import CheckpointError, ModelError
from vitviz.models import build_model, load_source
from vitviz.walk.capture import check_capturable

from .helpers import encode, noise, tiny_vit

ARCH = "vit_tiny_patch16_224"
KW = dict(embed_dim=32, depth=3, num_heads=4)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ 2. checkpoints and models


class _Plant:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_nested_bin_checkpoint_loads_exactly(tmp_path):
    """A .bin has no metadata: the architecture's own widths, patch size from the weights, grid from pos_embed."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, **SMALL, img_size=32, patch_size=8).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save({"epoch": 3, "model": {k: v.clone() for k, v in model.state_dict().items()}}, path)
    source, state = load_source(path, arch=ARCH)
    built = build_model(source, state)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(built.forward_features(x), model.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["legacy-nested", "zip-nested", "zip-custom-class", "zip-whole-module"])
def test_checkpoints_that_would_run_code_are_refused_and_never_run(tmp_path, capsys, how):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "weights.bin"
    sd = {k: v for k, v in tiny_vit(ARCH, img_size=32, patch_size=8, depth=3).state_dict().items()}
    payload = {
        "legacy-nested": {"state_dict": {**sd, "blocks.0.norm1.weight": _Plant(str(marker))}},
        "zip-nested": {"state_dict": {**sd, "extra": {"deep": [_Plant(str(marker))]}}},
        "zip-custom-class": _Plant(str(marker)),
        "zip-whole-module": torch.nn.Linear(2, 2),
    }[how]
    if how == "legacy-nested":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)  # torch's default zip format
    with pytest.raises(CheckpointError, match=r"'weights\.bin' was refused: it is not a plain tensor checkpoint"):
        load_source(path, arch=ARCH)
    img = tmp_path / "a.png"
    img.write_bytes(encode(noise(20, 20), "PNG"))
    assert main(["analyze", str(img), "--out", str(tmp_path / "out"), "--model", str(path), "--arch", ARCH,
                 "--quiet"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    model = tiny_vit(ARCH, img_size=32, patch_size=8, depth=2)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path), metadata={"arch": "vit_small_patch16_224"})  # embed 384 x 12 layers expected
    source, state = load_source(path)
    with pytest.raises(CheckpointError, match=r"do not fit architecture 'vit_small_patch16_224'.*(missing|shape)"):
        build_model(source, state)
    save_file(sd, str(path), metadata={"arch": "convnext_atto"})  # a non-ViT name for ViT weights
    with pytest.raises(ModelError, match="convnext_atto.*is not a plain Vision Transformer"):
        load_source(path)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        load_source(tmp_path / "tensor.pt", arch=ARCH)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "tensor.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="refused"):
        load_source(tmp_path / "cut.pth", arch=ARCH)


SMALL = dict(pretrained=False, num_classes=0)
UNSUPPORTED = {
    "swin_tiny_patch4_window7_224": (dict(embed_dim=32, depths=(1, 1), num_heads=(2, 2), img_size=64, window_size=4),
                                     r"SwinTransformer is not a plain Vision Transformer"),
    "convnext_atto": (dict(), r"ConvNeXt is not a plain Vision Transformer"),
    "vit_relpos_base_patch16_224": (dict(embed_dim=32, depth=1, num_heads=2, img_size=32),
                                    r"VisionTransformerRelPos is not a plain"),
    "vit_small_patch16_18x2_224": (dict(embed_dim=32, depth=1, num_heads=2, img_size=32),
                                   r"block 0 of VisionTransformer is a ParallelThingsBlock"),
    "vit_tiny_patch16_224:no-pos": (dict(embed_dim=32, depth=1, num_heads=2, img_size=32, pos_embed="none"),
                                    r"no absolute position embedding"),
    "vit_tiny_patch16_224:no-cls": (dict(embed_dim=32, depth=1, num_heads=2, img_size=32, class_token=False,
                                         global_pool="max"), r"has no CLS token and its head pools"),
}


@pytest.mark.parametrize("arch", list(UNSUPPORTED))
def test_models_vitviz_cannot_read_are_refused_by_name(arch):
    kwargs, message = UNSUPPORTED[arch]
    model = timm.create_model(arch.split(":")[0], **SMALL, **kwargs).eval()
    with pytest.raises(ModelError, match=message) as err:
        check_capturable(model)
    assert "vitviz" in str(err.value) or "not supported" in str(err.value) or "no CLS" in str(err.value)
    with pytest.raises(ModelError):
        analyze(model, noise(20, 20))


