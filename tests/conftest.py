"""Shared fixtures: tiny random timm ViTs built here (pretrained=False), never anything from the network."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported (it reads this once): no test reaches the Hub

import pytest  # noqa: E402
import torch  # noqa: E402

from .helpers import tiny_vit  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """The default model is converted into a cache of the test session's own, never the user's ~/.cache/vitviz."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITVIZ_CACHE", str(tmp_path_factory.mktemp("vitviz-cache")))
        yield


@pytest.fixture
def make_vit():
    return tiny_vit


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """The tiny ViT (32 px, P = 8, 3 layers x 4 heads) as a safetensors checkpoint that names its architecture."""
    model = tiny_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": "vit_tiny_patch16_224", "kwargs": json.dumps(dict(embed_dim=32, depth=3, num_heads=4))})
    return path
