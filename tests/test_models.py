"""Model loading: checkpoints (safe and hostile), hub failures, refusals, and patch/image-size resampling."""

from __future__ import annotations

import functools
import json
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_patch_embed

from vitviz.errors import CheckpointError, ModelError, ModelUnavailableError, ParameterError
from vitviz.models import ModelSource, build_model, describe_model, load_source, patch_size_range, resolve_sizes

from .helpers import tiny_vit

ARCH = "vit_tiny_patch16_224"
KW = dict(embed_dim=32, depth=2, num_heads=4, num_classes=0)


def save_tiny(tmp_path, *, name="tiny.safetensors", **extra):
    model = tiny_vit(ARCH, img_size=32, patch_size=8, depth=2, **extra)
    meta = {"arch": ARCH, "kwargs": json.dumps({**KW, **extra})}
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return model, path


def test_safetensors_checkpoint_roundtrip_is_exact(tmp_path):
    model, path = save_tiny(tmp_path)
    source, state = load_source(path)
    assert source.kind == "file" and source.arch == ARCH
    built = build_model(source, state)  # native sizes: weights loaded unchanged
    for k, v in model.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(built(x), model(x))
    info = describe_model(built, source=source)
    assert (info.patch_size, info.grid, info.num_prefix_tokens, info.depth) == (8, (4, 4), 1, 2)



@pytest.mark.parametrize("arch,extra", [
    (ARCH, {}),
    (ARCH, dict(reg_tokens=2, class_token=True, no_embed_class=True)),
    ("deit_tiny_distilled_patch16_224", {}),  # its own __init__ handles weight_init itself
])
def test_built_models_skip_timm_init_yet_hold_only_the_checkpoint(tmp_path, arch, extra):
    """build_model creates the architecture with weight_init='skip' on the meta device: every tensor must then come
    from the checkpoint (none left on meta) and the model must compute what the saved one does."""
    model = tiny_vit(arch, img_size=32, patch_size=8, depth=2, **extra)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": arch, "kwargs": json.dumps({**KW, **extra})})
    built = build_model(*load_source(path))
    assert not [n for n, t in [*built.named_parameters(), *built.named_buffers()] if t.is_meta]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(built.forward_features(x), model.forward_features(x), rtol=0, atol=0)


def test_sources_whose_kwargs_hold_objects_build_as_given():
    """Library users may describe an architecture with objects (a norm_layer partial): built from those very kwargs,
    twice (the geometry cache must not stringify them), and equal to the model they came from."""
    kwargs = dict(KW, img_size=32, patch_size=8, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-3))
    torch.manual_seed(0)
    model = timm.create_model(ARCH, **kwargs).eval()
    source = ModelSource(name="objects", arch=ARCH, kind="file", kwargs=kwargs)
    x = torch.randn(1, 3, 32, 32)
    for _ in range(2):
        built = build_model(source, model.state_dict())
        assert built.norm.eps == 1e-3
        torch.testing.assert_close(built.forward_features(x), model.forward_features(x), rtol=0, atol=0)
        assert describe_model(built, source=source).native_img_size == (32, 32)

def test_pth_checkpoint_with_nesting_and_module_prefix(tmp_path):
    model = tiny_vit(ARCH, img_size=32, patch_size=8, depth=2)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    source, state = load_source(path, arch=ARCH)
    assert set(state) == set(model.state_dict())
    with pytest.raises(CheckpointError, match="say which timm architecture it is for"):
        load_source(path)  # a .pth has no metadata: the architecture must be given


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create a file if the pickle were executed


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / f"evil{suffix}"
    with path.open("wb") as f:
        pickle.dump({"pos_embed": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_source(path, arch=ARCH)
    assert not marker.exists()


def test_wrong_checkpoint_names_the_mismatching_keys(tmp_path):
    model = tiny_vit(ARCH, img_size=32, patch_size=8, depth=2)
    state = dict(model.state_dict())
    state["blocks.0.extra.weight"] = torch.zeros(3)
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path), metadata={"arch": ARCH, "kwargs": json.dumps(KW)})
    source, st = load_source(path)
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.mlp\.fc2\.bias.*unexpected: blocks\.0\.extra"):
        build_model(source, st)


def test_garbage_and_misnamed_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_source(bad, arch=ARCH)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_source(tmp_path / "missing.safetensors", arch=ARCH)
    model = tiny_vit(ARCH, img_size=32, patch_size=8, depth=2)
    no_pos = tmp_path / "nopos.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if k != "pos_embed"}, str(no_pos), metadata={"arch": ARCH})
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_source(no_pos)


def test_unknown_name_suggests_and_non_vit_is_refused(tmp_path):
    with pytest.raises(ModelError, match="Did you mean.*vit_base_patch16_224"):
        load_source("vit_base_patch16_22")
    resnet = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet.safetensors"
    save_file(resnet.state_dict(), str(path), metadata={"arch": "resnet18"})
    with pytest.raises(ModelError):
        load_source(path)


def test_hub_failure_is_a_clear_message_without_network(monkeypatch):
    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    import vitviz.models.hub as vm

    monkeypatch.setattr(vm, "_hub_reachable", lambda: True)  # reachable, but the download itself fails
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelUnavailableError, match="Hugging Face Hub cannot be reached.*checkpoint file"):
        load_source("vit_small_patch16_224.augreg_in21k_ft_in1k")


def test_an_unreachable_hub_fails_at_once_without_asking_it(monkeypatch):
    """No cached weights and no Hub: one sentence, before timm's download (which retries for minutes) is tried."""
    import vitviz.models.hub as vm

    def never(*_a, **_k):
        raise AssertionError("the download must not be attempted")

    monkeypatch.setattr(vm, "_hub_reachable", lambda: False)
    monkeypatch.setattr(timm, "create_model", never)
    with pytest.raises(ModelUnavailableError) as err:
        load_source("vit_small_patch16_224.augreg_in21k_ft_in1k")
    assert "not on this server and the Hugging Face Hub cannot be reached" in str(err.value)
    assert "Traceback" not in str(err.value) and str(err.value).count(". ") <= 2


def test_the_hub_probe_never_touches_the_network_when_offline(monkeypatch):
    import socket

    import vitviz.models.hub as vm

    def no_network(*_a, **_k):
        raise AssertionError("no connection may be attempted offline")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert vm._hub_reachable() is False  # tests run with HF_HUB_OFFLINE=1 (conftest)


def test_same_patch_and_grid_is_bit_exact_and_other_sizes_resample(tmp_path):
    model, path = save_tiny(tmp_path)
    source, state = load_source(path)
    same = build_model(source, state, patch_size=8, img_size=32)
    assert torch.equal(same.patch_embed.proj.weight, model.patch_embed.proj.weight)
    assert torch.equal(same.pos_embed, model.pos_embed)
    other = build_model(source, state, patch_size=12, img_size=(36, 60))
    assert other.patch_embed.proj.weight.shape[-2:] == (12, 12)
    assert tuple(other.patch_embed.grid_size) == (3, 5)
    assert other.pos_embed.shape[1] == 1 + 15
    want = resample_patch_embed(model.patch_embed.proj.weight, new_size=[12, 12])
    torch.testing.assert_close(other.patch_embed.proj.weight, want)
    # prefix (CLS) position row is carried over untouched
    assert torch.equal(other.pos_embed[:, 0], model.pos_embed[:, 0])
    # PI-resize (FlexiViT): a patch upsampled to the new size gets the token the original patch got
    x_small = torch.randn(1, 3, 8, 8)
    x_big = torch.nn.functional.interpolate(x_small, size=(12, 12), mode="bicubic", align_corners=False, antialias=True)
    e_old = torch.nn.functional.conv2d(x_small, model.patch_embed.proj.weight)
    e_new = torch.nn.functional.conv2d(x_big, other.patch_embed.proj.weight)
    torch.testing.assert_close(e_new, e_old, atol=1e-4, rtol=1e-4)


def test_registers_model_keeps_its_prefix_tokens(tmp_path):
    model, path = save_tiny(tmp_path, reg_tokens=2, no_embed_class=True)
    source, state = load_source(path)
    built = build_model(source, state, patch_size=8, img_size=48)
    info = describe_model(built, source=source)
    assert info.num_prefix_tokens == 3 and info.num_reg_tokens == 2 and info.grid == (6, 6)
    assert built.pos_embed.shape[1] == 36  # no_embed_class: patch rows only


def test_size_checks_name_the_allowed_range():
    assert patch_size_range(14) == (8, 28) and patch_size_range(16) == (8, 32)
    with pytest.raises(ParameterError, match="8 to 28"):
        resolve_sizes(native_patch_size=14, patch_size=30, img_size=224)
    with pytest.raises(ParameterError, match="14 to 1036"):
        resolve_sizes(native_patch_size=14, patch_size=None, img_size=5000)
    assert resolve_sizes(native_patch_size=14, patch_size=None, img_size=224) == (14, (224, 224))
    assert resolve_sizes(native_patch_size=16, patch_size=16, img_size=(200, 300)) == (16, (208, 304))


def test_hub_cached_reads_the_local_cache_only(tmp_path, monkeypatch):
    """A fake HF cache laid out by hand: the model counts as cached once its weights file is there."""
    import huggingface_hub.constants

    from vitviz.models import hub_cached

    name = "deit_small_patch16_224"
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert not hub_cached(name)
    snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    (snap / "model.safetensors").write_bytes(b"x")
    assert hub_cached(name)
    assert not hub_cached("not_a_model_at_all")


@pytest.mark.parametrize("arch,kwargs,match", [
    ("resnet18", None, "cannot build architecture 'resnet18'"),
    ("convnext_atto", None, "cannot build architecture 'convnext_atto'"),
    (ARCH, "[1]", "must be a JSON object"),
    (ARCH, '{"foo": 1}', "cannot build architecture"),
    (ARCH, '{"img_size": "abc"}', "cannot build architecture"),
    (ARCH, '{"embed_dim": 32, "num_heads": 5}', "cannot build architecture"),
    (ARCH, "{not json", "not JSON"),
])
def test_wrong_arch_or_kwargs_metadata_is_a_checkpoint_error(tmp_path, arch, kwargs, match):
    model = tiny_vit(ARCH, img_size=32, patch_size=8, depth=2)
    meta = {"arch": arch, **({"kwargs": kwargs} if kwargs is not None else {"kwargs": json.dumps(KW)})}
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=match):
        source, state = load_source(path)
        build_model(source, state)


def test_description_reports_native_sizes_without_touching_the_model(tmp_path):
    _, path = save_tiny(tmp_path)
    source, state = load_source(path)
    built = build_model(source, state, patch_size=12, img_size=(36, 60))
    before = set(vars(built))
    info = describe_model(built, source=source)
    assert (info.patch_size, info.img_size, info.grid) == (12, (36, 60), (3, 5))
    assert (info.native_patch_size, info.native_img_size) == (8, (32, 32))
    assert set(vars(built)) == before


def test_get_model_is_one_cached_path_and_reads_the_native_patch_size_from_the_source(tmp_path):
    from vitviz.models import get_model, native_patch_size

    ref, path = save_tiny(tmp_path)
    model, info = get_model(str(path), patch_size=8, img_size=48, device="cpu")
    assert not model.training and info.grid == (6, 6) and next(model.parameters()).dtype == torch.float32
    again, _ = get_model(str(path), patch_size=8, img_size=(48, 48), device="cpu")
    assert again is model, "the same key must give the same cached model"
    other, other_info = get_model(str(path), patch_size=12, img_size=48, device="cpu")
    assert other is not model and other_info.patch_size == 12
    assert native_patch_size(str(path)) == ref.patch_embed.patch_size[0] == 8
