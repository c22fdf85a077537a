"""Device and precision choice, including the GPU branches (simulated on this CPU machine)."""

from __future__ import annotations

import pytest
import torch

from vitviz import device as dev
from vitviz.errors import ParameterError


def fake(monkeypatch, *, cuda: bool, mps: bool, bf16: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(dev, "_mps_available", lambda: mps)


@pytest.mark.parametrize("cuda,mps,want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    fake(monkeypatch, cuda=cuda, mps=mps)
    assert dev.pick_device("auto").type == want
    assert dev.available_devices()[-1] == "cpu"


def test_explicit_device_must_exist(monkeypatch):
    fake(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ParameterError, match="not available.*available: cpu"):
        dev.pick_device("cuda")
    with pytest.raises(ParameterError, match="auto, cpu, cuda, mps"):
        dev.pick_device("tpu")
    assert dev.pick_device("CPU").type == "cpu"


def test_precision_half_on_gpu_only(monkeypatch):
    fake(monkeypatch, cuda=True, mps=False, bf16=False)
    assert dev.pick_dtype(torch.device("cuda"), "auto") is torch.float16
    fake(monkeypatch, cuda=True, mps=False, bf16=True)
    assert dev.pick_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert dev.pick_dtype(torch.device("cuda"), "fp32") is torch.float32
    assert dev.pick_dtype(torch.device("mps"), "auto") is torch.float16
    assert dev.pick_dtype(torch.device("cpu"), "auto") is torch.float32
    with pytest.raises(ParameterError, match="not supported on the CPU"):
        dev.pick_dtype(torch.device("cpu"), "bf16")
    with pytest.raises(ParameterError, match="auto, fp32, fp16, bf16"):
        dev.pick_dtype(torch.device("cuda"), "int8")


def test_half_precision_model_through_the_pipeline():
    """The GPU recipe (half weights, fp32 softmax, fp16/fp32 storage) run on CPU with bf16 weights."""
    from PIL import Image

    from vitviz.analysis.maps import rollout_map
    from vitviz.analysis.onepass import analyze
    from vitviz.models import describe_model

    from .conftest import tiny_vit

    model = tiny_vit()
    info = describe_model(model)
    img = Image.new("RGB", (40, 40), (200, 30, 30))
    ref = analyze(model, img, info=info)
    half = tiny_vit().to(torch.bfloat16)
    got = analyze(half, img, info=info)
    assert str(got.attention.dtype) == "float32"  # small captures are stored in fp32 whatever the weights
    assert abs(got.attention - ref.attention).max() < 0.05
    assert abs(rollout_map(got.attention, info=info) - rollout_map(ref.attention, info=info)).max() < 0.05


def test_threads_share_the_cores_among_concurrent_jobs():
    from vitviz.device import cpu_threads

    assert [cpu_threads(n, cores=2) for n in (1, 2, 3, 4)] == [2, 1, 1, 1]
    assert [cpu_threads(n, cores=16) for n in (1, 2, 3, 4)] == [16, 8, 5, 4]
    assert cpu_threads(1) >= 1


def test_the_cli_sets_its_threads_from_the_option_or_the_ranks_on_this_machine(monkeypatch, tmp_path):
    """``--threads N`` is applied before the run; without it, the cores are shared among torchrun's local ranks."""
    import torch

    from vitviz import cli
    from vitviz.device import cpu_threads

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setattr(cli.analyze, "run", lambda args: 0)
    assert cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--threads", "1"]) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert seen == [1, cpu_threads(2)]
    assert cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--threads", "0"]) == 2
