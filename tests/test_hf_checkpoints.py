"""Checkpoints saved by Hugging Face transformers, loaded by vitviz's own key mapping (vitviz.models.hf).

The reference is transformers itself: a tiny random-weight model of each family is built from a config here (width 32,
2 layers, 32 px images of 8 px patches; no network), saved with ``save_pretrained``, loaded by vitviz, and its outputs
and captured attention compared with transformers' own eager forward (``output_attentions``, ``output_hidden_states``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vitviz.errors import CheckpointError, ModelError, ModelUnavailableError
from vitviz.models import get_model, load_source
from vitviz.models.labels import class_names
from vitviz.walk.capture import attention_forward

from .helpers import require_extra

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, attn_implementation="eager")
NAMES = {"0": "tabby cat", "1": "golden retriever", "2": "goldfinch"}


@pytest.fixture(scope="module")
def T():
    return require_extra("transformers", "hf")


def _spread(model, seed: int = 0):
    """Random weights with some spread (transformers' init leaves attention near uniform, layer scale at 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _two_tower(T, kind: str):
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = {k: v for k, v in TINY.items() if k != "attn_implementation"}
    if kind == "clip":
        return T.CLIPModel(T.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16,
                                        attn_implementation="eager"))
    return T.SiglipModel(T.SiglipConfig(vision_config=vision, text_config=text, attn_implementation="eager"))


# family -> (a tiny transformers model, what its output is compared with: the vitviz model's forward)
FAMILIES = {
    "vit": lambda T: T.ViTModel(T.ViTConfig(**TINY)),
    "vit_classifier": lambda T: T.ViTForImageClassification(T.ViTConfig(**TINY, id2label=NAMES)),
    # an MLP width whose ratio to the width does not survive float rounding: int(56 * (61 / 56)) == 60
    "vit_odd_width": lambda T: T.ViTModel(T.ViTConfig(**{**TINY, "hidden_size": 56, "intermediate_size": 61})),
    "deit": lambda T: T.DeiTModel(T.DeiTConfig(**TINY)),
    "deit_classifier": lambda T: T.DeiTForImageClassification(T.DeiTConfig(**TINY, id2label=NAMES)),
    "deit_distilled": lambda T: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**TINY, num_labels=5)),
    "dinov2": lambda T: T.Dinov2Model(T.Dinov2Config(**TINY, layerscale_value=0.5)),
    "dinov2_swiglu": lambda T: T.Dinov2Model(T.Dinov2Config(**TINY, use_swiglu_ffn=True)),
    "dinov2_registers": lambda T: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**TINY,
                                                                                         num_register_tokens=3)),
    "dinov2_registers_swiglu": lambda T: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        **TINY, num_register_tokens=1, use_swiglu_ffn=True, mlp_ratio=3)),
    "clip": lambda T: T.CLIPVisionModel(T.CLIPVisionConfig(**TINY)),
    "clip_projection": lambda T: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**TINY, projection_dim=16)),
    "clip_two_towers": lambda T: _two_tower(T, "clip"),
    "siglip": lambda T: T.SiglipVisionModel(T.SiglipVisionConfig(**{**TINY, "num_attention_heads": 2})),
    "siglip_two_towers": lambda T: _two_tower(T, "siglip"),
}
CLS_LESS = {"siglip", "siglip_two_towers"}  # no CLS token: the views read the attention-pool head (its readout)


def _saved(T, family: str, folder: Path):
    model = _spread(FAMILIES[family](T))
    model.save_pretrained(folder)
    return model


def _reference(hf, family: str, x: torch.Tensor):
    """transformers' eager forward: (the image model's output, its output object with attentions, hidden states)."""
    with torch.no_grad():
        if family.endswith("two_towers"):  # CLIPModel.get_image_features; SiglipModel's pooled image tower
            out = hf.vision_model(pixel_values=x, output_attentions=True, output_hidden_states=True)
            return (hf.visual_projection(out.pooler_output) if family.startswith("clip") else out.pooler_output), out
        out = hf(pixel_values=x, output_attentions=True, output_hidden_states=True)
    for field in ("logits", "image_embeds"):
        if getattr(out, field, None) is not None:
            return getattr(out, field), out
    if family.startswith(("vit", "deit")):  # the normed CLS token: timm has no pooler (tanh dense), it is left out
        return out.last_hidden_state[:, 0], out
    return out.pooler_output, out


def _vitviz_model(folder: Path):
    """The timm model of a saved folder, built by timm itself from vitviz's source (no vitviz walk or build)."""
    source, state = load_source(folder)
    model = timm.create_model(source.arch, pretrained=False, **source.kwargs)
    model.load_state_dict(state, strict=True)
    return source, model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_equal_the_transformers_models_own_forward(T, family, tmp_path):
    hf = _saved(T, family, tmp_path / family)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want, out = _reference(hf, family, x)
    _source, model = _vitviz_model(tmp_path / family)
    with torch.no_grad():
        got, feats = model(x), model.forward_features(x)
    if family == "deit":  # timm's distilled backbone embeds the mean of the CLS and distillation tokens
        want = out.last_hidden_state[:, :2].mean(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    last = getattr(out, "last_hidden_state", None)  # classifiers return logits and hidden states only
    if last is not None:
        torch.testing.assert_close(feats, _hf_norm(hf, last) if family.startswith("clip") else last,
                                   rtol=1e-5, atol=1e-5)


def _hf_norm(hf, tokens):
    """CLIP's post_layernorm, which transformers applies to the pooled token only and timm to every token."""
    tower = hf.vision_model if hasattr(hf, "vision_model") else hf
    return tower.post_layernorm(tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_attention_and_tokens_equal_transformers_output_attentions(T, family, tmp_path):
    hf = _saved(T, family, tmp_path / family)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _want, out = _reference(hf, family, x)
    model, info = get_model(tmp_path / family)
    cap = attention_forward(model, x, tokens=True)
    torch.testing.assert_close(cap.attention[0], torch.stack(out.attentions, 1)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.tokens, torch.stack(out.hidden_states[1:], 1), rtol=1e-5, atol=1e-5)
    assert info.depth == 2 and info.patch_size == 8 and info.grid == (4, 4)
    assert info.num_heads == out.attentions[0].shape[1]
    assert info.readout == ("pool" if family in CLS_LESS else "cls")


@pytest.mark.parametrize("family", sorted(CLS_LESS))
def test_a_siglip_towers_readout_is_its_heads_own_attention(T, family, tmp_path):
    """The readout weights of a SigLIP tower are the attention of transformers' own pooling head (its
    nn.MultiheadAttention's weights, averaged over heads) over the final tokens."""
    from vitviz.analysis import analyze

    hf = _saved(T, family, tmp_path / family)
    model, info = get_model(tmp_path / family)
    res = analyze(model, Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    x = torch.from_numpy(((res.pixels / 255.0 - np.array(info.mean)) / np.array(info.std)).astype(np.float32))
    _want, out = _reference(hf, family, x.permute(2, 0, 1)[None])
    tower = hf.vision_model if hasattr(hf, "vision_model") else hf
    head = tower.vision_model.head if hasattr(tower, "vision_model") else tower.head
    last = out.last_hidden_state
    with torch.no_grad():
        _pooled, weights = head.attention(head.probe, last, last, need_weights=True, average_attn_weights=True)
    np.testing.assert_allclose(res.readout, weights[0, 0].numpy(), rtol=1e-4, atol=1e-6)


def test_class_names_come_from_id2label_and_placeholders_are_no_names(T, tmp_path):
    _saved(T, "vit_classifier", tmp_path / "named")
    model, _info = get_model(tmp_path / "named")
    assert class_names(model) == ("tabby cat", "golden retriever", "goldfinch")
    _saved(T, "deit_distilled", tmp_path / "placeholders")  # id2label LABEL_0..LABEL_4, transformers' defaults
    source, _state = load_source(tmp_path / "placeholders")
    assert source.label_names is None and source.kwargs["num_classes"] == 5


def test_other_sizes_resample_positions_and_patches(T, tmp_path):
    """A transformers checkpoint builds at other sizes as any checkpoint does (PI-resize, position resampling)."""
    _saved(T, "dinov2_registers", tmp_path / "reg")
    model, info = get_model(tmp_path / "reg", img_size=48, patch_size=12)
    assert info.grid == (4, 4) and info.num_reg_tokens == 3 and info.num_prefix_tokens == 4
    cap = attention_forward(model, torch.randn(1, 3, 48, 48))
    assert cap.attention.shape == (1, 2, 4, 20, 20)


def test_timm_names_say_the_size_and_every_norm_has_the_configs_eps(T, tmp_path):
    one = dict(num_hidden_layers=1, attn_implementation="eager")
    T.Dinov2Model(T.Dinov2Config(**one, hidden_size=384, num_attention_heads=6, image_size=28,
                                 patch_size=14)).save_pretrained(tmp_path / "dino")
    T.ViTModel(T.ViTConfig(**one, hidden_size=384, num_attention_heads=6, intermediate_size=1536, image_size=224,
                           patch_size=16)).save_pretrained(tmp_path / "vit")
    assert load_source(tmp_path / "dino")[0].arch == "vit_small_patch14_dinov2"
    assert load_source(tmp_path / "vit")[0].arch == "vit_small_patch16_224"
    assert load_source(tmp_path / "vit")[0].kwargs["norm_layer"].keywords["eps"] == 1e-12  # transformers' ViT's
    T.CLIPVisionModel(T.CLIPVisionConfig(**{**TINY, "layer_norm_eps": 1e-6})).save_pretrained(tmp_path / "clip")
    _source, model = _vitviz_model(tmp_path / "clip")  # timm's CLIP towers have eps 1e-5 of their own
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 2 and all(m.eps == 1e-6 for m in norms)


def test_pytorch_model_bin_loads_like_safetensors(T, tmp_path):
    hf = _saved(T, "vit_classifier", tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(load_file(tmp_path / "st" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    _source, model = _vitviz_model(tmp_path / "bin")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- refused


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, words", [
    (dict(model_type="swin"), "model_type 'swin'"),
    (dict(hidden_size=10**9), "hidden_size = 1000000000 must be a whole number from 1 to 4096"),
    (dict(num_hidden_layers=10_000), "num_hidden_layers"),
    (dict(image_size=-3), "image_size"),
    (dict(hidden_act="os.system"), "hidden_act"),
    (dict(num_channels=4), "num_channels"),
    (dict(layer_norm_eps="1e-6"), "layer_norm_eps"),
    (dict(hidden_size=64), "do not fit the vit model its config.json describes"),  # weights of width 32
    (dict(num_attention_heads=3), "not a multiple of num_attention_heads"),
    (dict(image_size=64), "wrong shape: pos_embed [1, 17, 32], not [1, 65, 32]"),
])
def test_bad_configs_are_refused_with_a_sentence(T, tmp_path, changes, words):
    _saved(T, "vit_classifier", tmp_path / "m")
    _edit_config(tmp_path / "m", **changes)
    with pytest.raises(CheckpointError, match="^'m'") as err:
        load_source(tmp_path / "m")
    assert words in str(err.value)


def test_config_json_that_is_no_object_or_too_big_is_refused_before_reading(T, tmp_path, monkeypatch):
    _saved(T, "vit", tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        load_source(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{" * 100_000)
    with pytest.raises(CheckpointError, match="is not JSON"):
        load_source(tmp_path / "m")
    import vitviz.models.hf as hf_module

    monkeypatch.setattr(hf_module, "MAX_CONFIG_BYTES", 10)
    with pytest.raises(CheckpointError, match="config.json is 100.0 kB; vitviz reads at most 10.0 bytes"):
        load_source(tmp_path / "m")


def test_missing_weights_are_refused(T, tmp_path):
    _saved(T, "dinov2", tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    del state["encoder.layer.1.layer_scale2.lambda1"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="lacks the weight 'encoder.layer.1.layer_scale2.lambda1'"):
        load_source(tmp_path / "m")
    weights.unlink()
    with pytest.raises(CheckpointError, match="holds a config.json but it has no weights"):
        load_source(tmp_path / "m")


def test_extra_or_reshaped_weights_are_refused(T, tmp_path):
    _saved(T, "clip", tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "encoder.layers.0.self_attn.q_norm.weight": torch.ones(8)}, weights)
    with pytest.raises(CheckpointError, match="does not have: encoder.layers.0.self_attn.q_norm.weight"):
        load_source(tmp_path / "m")
    save_file({**state, "embeddings.patch_embedding.weight": torch.zeros(32, 3, 8, 4)}, weights)
    with pytest.raises(CheckpointError, match=r"wrong shape: patch_embed.proj.weight \[32, 3, 8, 4\]"):
        load_source(tmp_path / "m")


def test_a_dinov2_classifier_and_a_size_cap_are_refused(T, tmp_path):
    T.Dinov2ForImageClassification(T.Dinov2Config(**TINY, num_labels=3)).save_pretrained(tmp_path / "cls")
    with pytest.raises(CheckpointError, match="CLS token and the mean patch token side by side"):
        load_source(tmp_path / "cls")
    _saved(T, "vit", tmp_path / "vit")
    with pytest.raises(CheckpointError, match="at most 0 million"):
        load_source(tmp_path / "vit", max_params=10)


def test_a_pickle_that_would_run_code_is_never_loaded(T, tmp_path):
    _saved(T, "vit", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save({"weights": Path("not a tensor")}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        load_source(tmp_path / "m")


def test_loading_runs_no_transformers_code(T, tmp_path, monkeypatch):
    """transformers is the tests' reference only: vitviz reads the folder with transformers made unimportable."""
    import sys

    hf = _saved(T, "dinov2_registers", tmp_path / "m")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError now
    model, _info = get_model(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).pooler_output, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- the Hub


def test_hub_ids_fail_fast_offline_and_bad_ids_are_named(monkeypatch, tmp_path):
    import huggingface_hub.constants

    import vitviz.models.hf as hf_module

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelUnavailableError, match="'hf:nobody-here/no-model' are not on this server"):
        load_source("hf:nobody-here/no-model")
    with pytest.raises(ModelError, match="is not a Hugging Face Hub id: write hf:owner/name"):
        load_source("hf:../../etc/passwd")


def test_a_hub_id_in_the_local_cache_loads_offline(T, monkeypatch, tmp_path):
    """The Hub's cache layout (refs/main -> snapshots/<commit>/), as huggingface_hub leaves it after a download."""
    import huggingface_hub.constants

    import vitviz.models.hf as hf_module

    repo = tmp_path / "models--someone--tiny-vit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    hf = _saved(T, "vit_classifier", repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_module, "_hub_reachable", lambda timeout=3.0: pytest.fail("the cache needs no Hub"))
    model, info = get_model("hf:someone/tiny-vit")
    assert info.name == "hf:someone/tiny-vit" and class_names(model)[1] == "golden retriever"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


def test_a_download_is_size_checked_before_it_starts(T, monkeypatch, tmp_path):
    """The Hub's answers stood in for (no network here): the weights' size is asked before they are downloaded."""
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants

    import vitviz.models.hf as hf_module

    folder, downloads, said = tmp_path / "snapshot", [], []
    _saved(T, "clip_projection", folder)
    size = [10**6]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hf_module, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url: SimpleNamespace(size=size[0]))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, file: downloads.append(file) or str(folder / file))
    source, _state = hf_module.hf_source("hf:someone/clip", progress=said.append)
    assert downloads == ["config.json", "model.safetensors"] and source.kwargs["num_classes"] == 16
    assert said == ["Loading someone/clip from the Hugging Face Hub..."]
    size[0], downloads[:] = 9 * 10**9, []
    with pytest.raises(CheckpointError, match="its model.safetensors is 9.0 GB; vitviz reads checkpoints of at most"):
        hf_module.hf_source("hf:someone/clip")
    assert downloads == ["config.json"]


def test_the_text_tower_of_a_two_tower_file_is_never_read(T, monkeypatch, tmp_path):
    import vitviz.models.hf as hf_module

    _saved(T, "siglip_two_towers", tmp_path / "m")
    read, real = [], hf_module._read_safetensors
    monkeypatch.setattr(hf_module, "_read_safetensors", lambda path, names: read.extend(names) or real(path, names))
    load_source(tmp_path / "m")
    assert read and all(k.startswith("vision_model.") for k in read)


# ---------------------------------------------------------------------------------------------------------- surfaces


def test_vitviz_analyze_reads_a_saved_folder(T, tmp_path, capsys):
    from vitviz.cli import main

    hf = _saved(T, "dinov2_registers", tmp_path / "dino")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    code = main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "dino"),
                 "--img-size", "32", "--save-attention", "--quiet"])
    assert code == 0, capsys.readouterr().err
    d = np.load(tmp_path / "out" / "a.npz")
    assert d["attention"].shape == (2, 4, 20, 20) and int(d["num_prefix_tokens"]) == 4
    assert d["attention_map"].shape == (4, 4)
    np.testing.assert_allclose(d["attention"].sum(-1), 1.0, atol=1e-5)
    assert hf.config.num_register_tokens == 3


def test_the_apps_checkpoint_folder_lists_saved_folders(T, tmp_path, monkeypatch):
    from vitviz.app.sidebar import checkpoint_files

    _saved(T, "vit", tmp_path / "my-vit")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "tiny.safetensors").write_bytes(b"")
    monkeypatch.setenv("VITVIZ_CHECKPOINT_DIR", str(tmp_path))
    assert checkpoint_files() == ["my-vit", "tiny.safetensors"]
    source, _state = load_source(tmp_path / checkpoint_files()[0])  # the app's dir: choice, as a path
    assert source.arch == "vit_base_patch16_224" and source.name == "my-vit"
