"""Settings out of range name the allowed range, in the library and as the CLI's exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitviz.analysis.maps import query_attention_maps, rollout_map
from vitviz.analysis.rollout import fuse_heads
from vitviz.errors import ParameterError
from vitviz.inputs.image import load_image, patch_box, whole_image_size
from vitviz.models import describe_model, resolve_sizes
from vitviz.settings import Settings

from .helpers import encode, noise, run_cli, tiny_vit

ARCH = "vit_tiny_patch16_224"
KW = dict(embed_dim=32, depth=3, num_heads=4)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ settings out of range

_ATT = torch.softmax(torch.randn(3, 4, 17, 17), dim=-1)  # (L, H, T, T)
_INFO = describe_model(tiny_vit(ARCH, img_size=32, patch_size=8))  # 4x4 grid, 3 layers, 4 heads

OUT_OF_RANGE = {
    "patch too big": (lambda: resolve_sizes(native_patch_size=16, patch_size=40, img_size=224), r"choose 8 to 32"),
    "patch too small": (lambda: resolve_sizes(native_patch_size=16, patch_size=4, img_size=224), r"choose 8 to 32"),
    "patch over image": (lambda: resolve_sizes(native_patch_size=16, patch_size=32, img_size=16),
                         r"image size 16 is out of range: choose 32 to 1036"),
    "image too big": (lambda: resolve_sizes(native_patch_size=14, patch_size=None, img_size=(224, 2000)),
                      r"image size 2000 is out of range: choose 14 to 1036"),
    "image zero": (lambda: resolve_sizes(native_patch_size=14, patch_size=None, img_size=0), r"choose 14 to 1036"),
    "discard 1": (lambda: Settings(discard_ratio=1.0).check(), r"discard ratio must be in \[0, 1\), got 1.0"),
    "discard negative": (lambda: Settings(discard_ratio=-0.1).check(), r"\[0, 1\)"),
    "discard nan": (lambda: Settings(discard_ratio=float("nan")).check(), r"\[0, 1\)"),
    "layers reversed": (lambda: Settings(start_layer=5, end_layer=2).layer_range(12),
                        r"reversed: start 5 is after end 2"),
    "layers reversed negative": (lambda: Settings(start_layer=-1, end_layer=-2).layer_range(12), r"reversed"),
    "start past end of model": (lambda: Settings(start_layer=12).layer_range(12), r"layers must be in 0 to 11"),
    "end before first layer": (lambda: Settings(end_layer=-13).layer_range(12), r"layers must be in 0 to 11"),
    "rollout empty range": (lambda: rollout_map(_ATT.numpy(), info=_INFO, settings=Settings(start_layer=3)),
                            r"layers must be in 0 to 2"),
    "head too big": (lambda: fuse_heads(_ATT, 4), r"head 4 does not exist: choose 0 to 3"),
    "head negative": (lambda: fuse_heads(_ATT, -1), r"choose 0 to 3"),
    "query too big": (lambda: query_attention_maps(_ATT.numpy(), info=_INFO, layer=0, query=16),
                      r"patch 16 does not exist: choose 0 to 15"),
    "query negative": (lambda: query_attention_maps(_ATT.numpy(), info=_INFO, layer=0, query=-1), r"choose 0 to 15"),
    "query layer": (lambda: query_attention_maps(_ATT.numpy(), info=_INFO, layer=3), r"layers must be in 0 to 2"),
    "patch box": (lambda: patch_box(16, grid=(4, 4), patch_size=8), r"\[0, 15\]"),
    "whole target": (lambda: whole_image_size((10, 10), target=4, patch_size=8), r">= patch_size \(8\)"),
    "max bytes": (lambda: load_image(b"x", max_bytes=0), r"max_bytes must be a positive integer"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_settings_out_of_range_name_the_allowed_range(case):
    call, message = OUT_OF_RANGE[case]
    with pytest.raises(ParameterError, match=message):
        call()


@pytest.mark.parametrize("args,message", [
    (["--start-layer", "9"], "layers must be in 0 to 2"),
    (["--start-layer", "2", "--end-layer", "1"], "reversed"),
    (["--patch-size", "4"], "choose 8 to 16"),
    (["--img-size", "5000"], "choose 8 to 1036"),
    (["--discard", "1"], r"[0, 1)"),
    (["--opacity", "2"], "opacity must be in [0, 1]"),
    (["--batch-size", "-1"], "batch size must be at least 1"),
    (["--batch-size", "0"], "batch size must be at least 1"),
])
def test_cli_refuses_bad_settings_with_exit_2(tmp_path, ckpt, capsys, args, message):
    img = tmp_path / "a.png"
    img.write_bytes(encode(noise(40, 40), "PNG"))
    assert run_cli([img], tmp_path / "out", ckpt, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


