"""Shared fixtures: tiny random timm ViTs built here (pretrained=False), never anything from the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported (it reads this once): no test reaches the Hub

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(pretrained=False, embed_dim=32, depth=3, num_heads=4, num_classes=0)


def tiny_vit(arch: str = "vit_tiny_patch16_224", *, img_size=32, patch_size=8, seed: int = 0, **kwargs):
    """A tiny random ViT in eval mode; extra kwargs go to timm.create_model."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**TINY, "img_size": img_size, "patch_size": patch_size, **kwargs})
    # random init leaves LayerScale tiny and attention near uniform: spread the weights so the tests see structure
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif "qkv.weight" in name:
                p.normal_(0, 0.5)
            elif "pos_embed" in name or "cls_token" in name or "reg_token" in name or "dist_token" in name:
                p.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """The default model is converted into a cache of the test session's own, never the user's ~/.cache/vitviz."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITVIZ_CACHE", str(tmp_path_factory.mktemp("vitviz-cache")))
        yield


@pytest.fixture
def make_vit():
    return tiny_vit
