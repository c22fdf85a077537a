"""Checkpoint files as an attacker would make them: metadata that names files, loaders or huge architectures, and
files whose tensors expand far beyond their size. Each must be refused by name, before timm builds anything from it
and before the tensors are read, with the process's memory staying small."""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from pathlib import Path

import pytest
import safetensors
import timm
import torch
from safetensors.torch import save_file

import vitviz.models.checkpoints as vm
from vitviz.errors import CheckpointError
from vitviz.models import build_model, load_source, read_checkpoint

from .helpers import peak_rss_growth, tiny_vit

ARCH = "vit_tiny_patch16_224"
KW = dict(embed_dim=32, depth=2, num_heads=4, num_classes=0)
GiB = 2**30


# ------------------------------------------------------------------------------------------------ spies and makers




class Seen(dict):
    def clear(self):  # forget what building the test's own files did
        self["paths"].clear()
        self["create"].clear()


@pytest.fixture
def spies(monkeypatch):
    """Records every file torch, safetensors or timm open or load, and every kwarg timm's create_model receives."""
    seen = Seen(paths=[], create=[])
    real_load, real_safe_open = torch.load, safetensors.safe_open
    real_create, real_ckpt = timm.create_model, timm.models.load_checkpoint

    def load(f, *a, **k):
        seen["paths"].append(str(f))
        return real_load(f, *a, **k)

    def safe_open(f, *a, **k):
        seen["paths"].append(str(f))
        return real_safe_open(f, *a, **k)

    def create(name, *a, **k):
        seen["create"].append((name, dict(k)))
        return real_create(name, *a, **k)

    def ckpt(model, path, *a, **k):
        seen["paths"].append(str(path))
        return real_ckpt(model, path, *a, **k)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    monkeypatch.setattr(timm, "create_model", create)
    for module in (timm.models, timm.models._helpers, timm.models._factory):
        monkeypatch.setattr(module, "load_checkpoint", ckpt, raising=False)
    return seen


def tiny_state(**extra) -> dict[str, torch.Tensor]:
    model = tiny_vit(ARCH, img_size=32, patch_size=8, depth=2, **extra)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_with(tmp_path: Path, kwargs, *, arch=ARCH, name="m.safetensors", state=None) -> Path:
    path = tmp_path / name
    text = kwargs if isinstance(kwargs, str) else json.dumps(kwargs)
    save_file(state or tiny_state(), str(path), metadata={"arch": arch, "kwargs": text})
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    """A real checkpoint of the same tiny ViT at a path an attacker names: loading it would be recorded by the spies
    (and, before the whitelist, succeeded: create_model(checkpoint_path=...) loads it into the model)."""
    path = tmp_path / "planted" / "marker.pth"
    path.parent.mkdir()
    torch.save(tiny_state(), path)
    return path


# ----------------------------------------------------------------------------------- metadata that names files


@pytest.mark.parametrize("key,value", [
    ("checkpoint_path", "{marker}"),
    ("pretrained", True),
    ("pretrained_cfg", {"file": "{marker}", "architecture": ARCH}),
    ("pretrained_cfg_overlay", {"file": "{marker}"}),
    ("cache_dir", "{dir}"),
    ("pretrained_strict", False),
])
def test_metadata_naming_a_file_is_refused_and_the_file_never_read(tmp_path, spies, marker, key, value):
    text = json.dumps({**KW, key: value}).replace("{marker}", str(marker)).replace("{dir}", str(marker.parent))
    path = save_with(tmp_path, text)
    spies.clear()
    with pytest.raises(CheckpointError, match=rf"'{key}' is never passed on: it would make timm load weights"):
        load_source(path)
    assert str(marker) not in spies["paths"]
    assert all(key not in kwargs for _, kwargs in spies["create"])
    assert spies["paths"] == [str(path)]  # only the checkpoint itself, and only its header


@pytest.mark.parametrize("key,value,why", [
    ("block_fn", "timm.models.vision_transformer.ResPostBlock", "names code"),
    ("norm_layer", "layernorm", "names code"),
    ("attn_layer", "os.system", "names code"),
    ("embed_layer", "builtins.eval", "names code"),
    ("features_only", True, "changes what the model returns"),
    ("out_indices", [1], "changes what the model returns"),
    ("weight_init", "jax", "vitviz sets it itself"),
    ("device", "cuda", "vitviz sets it itself"),
    ("dynamic_img_size", True, "vitviz builds the model at the chosen image size itself"),
    ("made_up", 1, "not an architecture setting vitviz reads"),
])
def test_every_non_architecture_key_is_refused_by_name_with_its_reason(tmp_path, spies, key, value, why):
    path = save_with(tmp_path, {**KW, key: value})
    spies.clear()
    with pytest.raises(CheckpointError, match=rf"'{key}' .*{why}.*Only these settings are read: .*depth") as err:
        load_source(path)
    assert "cannot build architecture 'vit_tiny_patch16_224' for 'm.safetensors'" in str(err.value)
    assert spies["create"] == []  # refused before timm builds anything


def test_all_refused_keys_are_named_in_one_message(tmp_path, spies):
    path = save_with(tmp_path, {**KW, "checkpoint_path": "/x", "block_fn": "y", "depth": 30000, "foo": 1})
    spies.clear()
    with pytest.raises(CheckpointError) as err:
        load_source(path)
    text = str(err.value)
    for part in ("'checkpoint_path' is never passed on", "'block_fn' is never passed on",
                 "depth = 30000 must be a whole number from 1 to 48", "'foo' is not an architecture setting"):
        assert part in text
    assert spies["create"] == []


@pytest.mark.parametrize("key,value,match", [
    ("depth", 30000, "depth = 30000 must be a whole number from 1 to 48"),
    ("depth", 0, "depth = 0 must be a whole number"),
    ("depth", True, "depth = true must be a whole number"),
    ("depth", 2.0, "depth = 2.0 must be a whole number"),
    ("embed_dim", 10**6, "embed_dim = 1000000 must be a whole number from 1 to 4096"),
    ("num_heads", 5, "embed_dim 32 is not a multiple of num_heads 5"),
    ("mlp_ratio", "NaN", "mlp_ratio = NaN must be a number above 0 up to 16"),
    ("mlp_ratio", 1e9, "mlp_ratio = 1000000000.0 must be a number above 0 up to 16"),
    ("img_size", [32, "a"], "img_size = \\[32, \"a\"\\] must be a whole number from 1 to 2048, or \\[height, width\\]"),
    ("img_size", 10**6, "img_size = 1000000 must be"),
    ("reg_tokens", 10**4, "reg_tokens = 10000 must be a whole number from 0 to 16"),
    ("num_classes", 10**9, "num_classes = 1000000000 must be a whole number from 0 to 100000"),
    ("global_pool", "prr", "global_pool = \"prr\" must be one of \"\", \"token\", \"avg\", \"map\""),
    ("act_layer", "torch.nn.GELU", "act_layer = \"torch.nn.GELU\" must be one of"),
    ("in_chans", 1, "in_chans = 1 must be one of 3"),
    ("init_values", -1, "init_values = -1 must be a number above 0 up to 10 \\(or null\\)"),
    ("class_token", "yes", "class_token = \"yes\" must be true or false"),
])
def test_out_of_range_settings_are_refused_before_any_build(tmp_path, spies, key, value, match):
    text = json.dumps({**KW, key: value}).replace('"NaN"', "NaN")  # json.loads reads a bare NaN
    path = save_with(tmp_path, text)
    spies.clear()
    with pytest.raises(CheckpointError, match=match):
        load_source(path)
    assert spies["create"] == []


@pytest.mark.parametrize("arch,match", [
    ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "not a timm architecture name"),
    ("local-dir:/tmp", "not a timm architecture name"),
    ("../../etc/passwd", "not a timm architecture name"),
    ("resnet18", "it is not a plain Vision Transformer"),
    ("convnext_atto", "it is not a plain Vision Transformer"),
    ("vit_tiny_patch16_22", "timm has no such architecture. Did you mean vit_tiny_patch16_224"),
])
def test_architecture_names_are_bounded_to_plain_vits(tmp_path, spies, arch, match):
    path = save_with(tmp_path, KW, arch=arch)
    spies.clear()
    with pytest.raises(CheckpointError, match=match):
        load_source(path)
    with pytest.raises(CheckpointError, match=match):  # the same rule for a name the user types
        load_source(path, arch=arch)
    assert spies["create"] == []


def test_library_sources_never_reach_timm_with_file_kwargs(marker, spies):
    source = vm.ModelSource(name="lib", arch=ARCH, kind="file",
                            kwargs={**KW, "img_size": 32, "patch_size": 8, "checkpoint_path": str(marker)})
    state = tiny_state()
    spies.clear()
    with pytest.raises(CheckpointError, match="checkpoint_path is never passed to timm"):
        build_model(source, state)
    assert spies["create"] == [] and str(marker) not in spies["paths"]


def test_missing_architecture_is_worded_for_app_and_cli(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(tiny_state(), path)
    with pytest.raises(CheckpointError, match="say which timm architecture it is for") as err:
        load_source(path)
    assert "--" not in str(err.value)


def test_whitelisted_settings_build_exactly_the_model_timm_builds(tmp_path):
    """Every accepted kind of setting (ints, sizes, floats, flags, choices, null) reaches timm unchanged: the model
    built from the file computes what timm's own model with those kwargs computes, bit for bit."""
    kwargs = dict(KW, img_size=[32, 48], reg_tokens=2, no_embed_class=True, qk_norm=True, init_values=1e-5,
                  mlp_ratio=2.0, global_pool="avg", fc_norm=None, act_layer="quick_gelu", drop_path_rate=0.1,
                  class_token=True)
    model = tiny_vit(ARCH, patch_size=8, **{**kwargs, "img_size": (32, 48)})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = save_with(tmp_path, kwargs, state=state)
    built = build_model(*load_source(path))
    assert isinstance(built.blocks[0].mlp.act, timm.layers.QuickGELU) and built.num_reg_tokens == 2
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(built.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(built(x), model(x), rtol=0, atol=0)


def test_metadata_patch_size_must_match_the_weights(tmp_path):
    path = save_with(tmp_path, {**KW, "patch_size": 16})
    with pytest.raises(CheckpointError, match="says patch_size 16, but its patch embedding is for 8x8 px patches"):
        load_source(path)


# --------------------------------------------------------------------------------- files larger than they look


def deflated_pth(path: Path, numel: int) -> Path:
    """A torch zip whose one float32 tensor (``pos_embed``, ``numel`` zeros) is deflate-compressed (level 1, the
    fastest to make: 4.5 MB per GiB). torch.load reads it (it inflates compressed records): tested below."""
    seed = 0x12345  # a length torch pickles as a 4-byte int (pickle opcode J), in the tensor's storage and shape
    buf = io.BytesIO()
    torch.save({"pos_embed": torch.zeros(seed)}, buf)
    old, new = b"J" + struct.pack("<i", seed), b"J" + struct.pack("<i", numel)
    deflated = dict(compression=zipfile.ZIP_DEFLATED, compresslevel=1)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w", **deflated) as out:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                continue
            data = src.read(info)
            data = data.replace(old, new) if info.filename.endswith("data.pkl") else data
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
        chunk, left = bytes(2**24), 4 * numel
        with out.open(f"{src.namelist()[0].split('/')[0]}/data/0", "w", force_zip64=True) as f:
            while left:
                f.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def test_the_deflated_torch_zip_is_a_real_threat(tmp_path):
    """The construction is a checkpoint torch.load reads (inflating it): the refusal below is about size alone."""
    path = deflated_pth(tmp_path / "small.pth", 2**20)  # 4 MiB of tensor
    assert path.stat().st_size < 2**16
    assert torch.load(path, weights_only=True)["pos_embed"].shape == (2**20,)


def test_a_compressed_gigabyte_is_refused_before_it_is_inflated(tmp_path, spies):
    path = deflated_pth(tmp_path / "bomb.pth", GiB // 4)  # 1 GiB of zeros, deflated
    assert path.stat().st_size < 5 * 2**20
    spies.clear()
    grown, err = peak_rss_growth(lambda: load_source(path, arch=ARCH))
    assert isinstance(err, CheckpointError), err
    assert re.search(r"'bomb\.pth' was refused: its contents would expand to 1\.1 GB, over 4 times its "
                     r"[\d.]+ [kM]B file size \(compressed tensors\)", str(err)), str(err)
    assert spies["paths"] == [] and spies["create"] == []  # never handed to torch.load, nothing built
    assert grown < 64 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MB"
    with pytest.raises(CheckpointError, match=r"would expand to 1\.1 GB"):
        read_checkpoint(path)


def test_torch_zips_over_the_budget_are_refused_from_their_directory(tmp_path, spies):
    path = tmp_path / "plain.pth"
    torch.save(tiny_state(), path)  # stored, not compressed: expands to about its own size
    spies.clear()
    with pytest.raises(CheckpointError, match=r"'plain\.pth' is .*; vitviz reads checkpoints of at most"):
        read_checkpoint(path, max_bytes=path.stat().st_size // 2)  # the file itself is over
    small = deflated_pth(tmp_path / "small.pth", 2**20)  # 4 MiB of tensor in a few kB
    with pytest.raises(CheckpointError, match=r"would expand to 4\.2 MB, more than the 2\.0 MB vitviz reads"):
        read_checkpoint(small, max_bytes=2 * 10**6)  # the file fits, its contents do not
    assert spies["paths"] == []
    state, meta = read_checkpoint(path)
    assert set(state) == set(tiny_state()) and meta == {}


def test_the_entry_count_is_read_before_the_archive_directory(tmp_path, monkeypatch, spies):
    """A zip directory of millions of entries would cost memory to parse: the count comes from its end record."""
    path = tmp_path / "many.pth"
    torch.save(tiny_state(), path)  # one archive entry per tensor, plus a few
    with zipfile.ZipFile(path) as z:
        entries = len(z.infolist())
    monkeypatch.setattr(vm, "MAX_CHECKPOINT_ENTRIES", entries - 1)
    parsed, real = [], zipfile.ZipFile._RealGetContents  # where ZipFile parses the whole directory

    def spy(self):
        parsed.append(self.filename)
        return real(self)

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", spy)
    spies.clear()
    with pytest.raises(CheckpointError, match=rf"'many\.pth' lists {entries} files in its archive; a checkpoint "
                                              rf"has at most {entries - 1}"):
        load_source(path, arch=ARCH)
    assert parsed == [] and spies["paths"] == []


def sparse_safetensors(path: Path, state: dict[str, torch.Tensor], *, junk: int, metadata: dict) -> Path:
    """A valid safetensors file: ``state`` and then a float32 tensor of ``junk`` elements stored as a hole (a sparse
    file: no disk, but reading the tensor would cost its full size in memory)."""
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    for name, t in state.items():
        blob = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header["junk"] = {"dtype": "F32", "shape": [junk], "data_offsets": [offset, offset + 4 * junk]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
        f.truncate(8 + len(text) + offset + 4 * junk)
    return path


def test_tensors_far_larger_than_the_architecture_are_refused_from_the_header(tmp_path, spies):
    meta = {"arch": ARCH, "kwargs": json.dumps(KW)}
    path = sparse_safetensors(tmp_path / "sparse.safetensors", tiny_state(), junk=GiB // 4, metadata=meta)
    spies.clear()
    grown, err = peak_rss_growth(lambda: load_source(path))
    assert isinstance(err, CheckpointError), err
    assert re.search(r"'sparse\.safetensors' holds 1\.1 GB of tensors, far more than its architecture needs "
                     r"\(\d+\.\d kB in float32\)", str(err)), str(err)
    assert grown < 64 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MB"
    assert spies["create"] and all(k.get("img_size") == 16 for _, k in spies["create"])  # only the meta probe
    small = sparse_safetensors(tmp_path / "ok.safetensors", tiny_state(), junk=1000, metadata=meta)
    source, state = load_source(small)  # a few extra elements are a mismatch for build_model to name, not a bomb
    with pytest.raises(CheckpointError, match="unexpected: junk"):
        build_model(source, state)


def test_a_safetensors_header_cannot_declare_more_than_the_file_holds(tmp_path):
    """safetensors itself checks the header's offsets against the file's length and each tensor's shape and dtype
    against its offsets: a 1 GiB tensor declared in a small file is refused before anything is read."""
    for shape, offsets in (([GiB // 4], [0, GiB]), ([GiB // 4], [0, 16])):
        text = json.dumps({"pos_embed": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
        path = tmp_path / "lie.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
        grown, err = peak_rss_growth(lambda p=path: load_source(p, arch=ARCH))
        assert isinstance(err, CheckpointError) and "not a readable safetensors file" in str(err), err
        assert grown < 16 * 2**20


def test_pth_tensors_far_larger_than_the_architecture_are_refused(tmp_path):
    path = tmp_path / "padded.pth"
    torch.save({**tiny_state(), "junk": torch.zeros(2**24)}, path)  # 67 MB beside a 0.1 MB model
    # no metadata: the architecture is vit_tiny_patch16_224 as timm defines it (5.7 M parameters)
    with pytest.raises(CheckpointError, match=r"holds 67\.\d MB of tensors, far more than its architecture needs "
                                              r"\(2\d\.\d MB in float32\)"):
        load_source(path, arch=ARCH)


def test_position_embeddings_for_huge_images_are_refused(tmp_path):
    state = tiny_state()
    g = vm.MAX_NATIVE_IMG_SIZE // 8 + 1  # one patch row more than the largest native grid
    state["pos_embed"] = torch.zeros(1, 1 + g * g, 32)
    path = save_with(tmp_path, KW, state=state)
    with pytest.raises(CheckpointError, match=r"position embedding is for 2056 px images; .* up to 2048 px"):
        load_source(path)


@pytest.mark.parametrize("arch", ["vit_giant_patch14_dinov2", "vit_gigantic_patch14_clip_224",
                                  "vit_base_patch16_reg4_gap_256", "vit_so400m_patch14_siglip_378"])
def test_the_limits_admit_timms_largest_vits(arch):
    """The whitelist's ranges and the byte budget are not tighter than real timm ViTs: their own settings pass the
    whitelist and their float32 weights fit the budget (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    blk = model.blocks[0]
    own = dict(depth=len(model.blocks), embed_dim=model.embed_dim, num_heads=blk.attn.num_heads,
               mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, reg_tokens=model.num_reg_tokens,
               img_size=list(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
               global_pool=model.global_pool, class_token=model.has_class_token, no_embed_class=model.no_embed_class)
    assert vm._checked_kwargs(json.dumps(own), arch=arch, what="x") == {**own, "img_size": tuple(own["img_size"])}
    assert 4 * sum(p.numel() for p in model.parameters()) < vm.MAX_CHECKPOINT_BYTES
