"""The second attack run on checkpoints (issue 23): tiny files that claim huge models, and the operator's cap on the
size of uploaded models. Each is refused before timm builds anything."""

from __future__ import annotations

import io
from contextlib import redirect_stderr

import pytest
import timm
import torch

from vitviz.errors import CheckpointError
from vitviz.models import load_source, resolve_sizes
from vitviz.models.checkpoints import _dense, check_dense, upload_param_cap

GIGANTIC = "vit_gigantic_patch14_224"


def _meta_state(arch: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0).state_dict()


def _stride_zero_file(tmp_path, arch: str = GIGANTIC):
    """The attack: every entry a stride-0 view of one 4-byte storage, saved by torch.save."""
    state = {k: torch.full((1,), 1e-3).expand(*v.shape) for k, v in _meta_state(arch).items()}
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    return path


@pytest.fixture
def no_builds(monkeypatch):
    built = []
    real = timm.create_model

    def create(name, *a, **k):
        if k.get("img_size") is not None or not str(name).startswith("vit_gigantic"):
            built.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(timm, "create_model", create)
    return built


def test_the_dense_check_follows_its_definition():
    assert _dense(torch.zeros(3, 4)) and _dense(torch.zeros(3, 4).t()) and _dense(torch.zeros(2, 3, 4).permute(2, 0, 1))
    assert not _dense(torch.zeros(1).expand(5, 6))  # stride 0
    assert not _dense(torch.zeros(10).as_strided((3, 3), (1, 1)))  # overlapping rows
    assert not _dense(torch.zeros(4, 6)[:, ::2])  # gaps: the storage holds more than the tensor, not packed


def test_a_stride_zero_checkpoint_of_a_gigantic_model_is_refused_before_any_build(tmp_path, no_builds):
    path = _stride_zero_file(tmp_path)
    assert path.stat().st_size < 200_000  # the attack's file is tiny
    with pytest.raises(CheckpointError, match="not stored whole") as err:
        load_source(path, arch=GIGANTIC)
    assert "tiny.pt" in str(err.value) and not no_builds


def test_the_stride_zero_checkpoint_through_the_cli(tmp_path, no_builds):
    from vitviz.cli import main

    path = _stride_zero_file(tmp_path)
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(img)
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["analyze", str(img), "--out", str(tmp_path / "out"), "--model", str(path), "--arch", GIGANTIC,
                     "--quiet"])
    assert code != 0 and "not stored whole" in err.getvalue() and "Traceback" not in err.getvalue()
    assert not no_builds


def _vit_tiny_state() -> dict[str, torch.Tensor]:
    """vit_tiny_patch16_224's own shapes (what a .pth without metadata is read as) at 32 px, patches of 8."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                             patch_size=8).state_dict()


def test_tensors_sharing_one_storage_must_still_hold_the_architectures_bytes(tmp_path):
    state = _vit_tiny_state()
    biggest = max(v.numel() for v in state.values())
    shared = torch.randn(biggest)
    state = {k: shared[: v.numel()].view(v.shape) for k, v in state.items()}  # each dense, all one storage
    check_dense(state, what="x")  # every tensor on its own is fine
    path = tmp_path / "shared.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="overlapping in memory"):
        load_source(path, arch="vit_tiny_patch16_224")


def test_the_operators_parameter_cap(tmp_path, monkeypatch):
    state = _vit_tiny_state()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    n = sum(v.numel() for v in state.values())
    with pytest.raises(CheckpointError, match="million parameters"):
        load_source(path, arch="vit_tiny_patch16_224", max_params=n // 2)
    source, _state = load_source(path, arch="vit_tiny_patch16_224", max_params=n + 1)
    assert source.kind == "file"
    monkeypatch.setenv("VITVIZ_MAX_PARAMS", "1e6")
    assert upload_param_cap() == 1_000_000
    monkeypatch.setenv("VITVIZ_MAX_PARAMS", "0")
    assert upload_param_cap() is None
    monkeypatch.delenv("VITVIZ_MAX_PARAMS")
    cap = upload_param_cap()
    assert 304_000_000 < cap < sum(v.numel() for v in _meta_state(GIGANTIC).values())  # ViT-L in, ViT-g out


def test_the_largest_image_size_rounds_within_the_range():
    """1036 px at patch 8 is 129.5 patches: rounding up would give 1040, past the maximum; it rounds down."""
    p, (h, w) = resolve_sizes(native_patch_size=14, patch_size=8, img_size=1036)
    assert p == 8 and h == w == 1032 and h <= 1036
    assert resolve_sizes(native_patch_size=14, patch_size=8, img_size=1035)[1] == (1032, 1032)
    assert resolve_sizes(native_patch_size=16, patch_size=16, img_size=1036)[1] == (1024, 1024)
