"""Models without a CLS token: timm's ``*_gap`` ViTs (average pooling) and SigLIP-like towers (an attention pool,
``global_pool="map"``), with and without register tokens. The views follow their readout (vitviz.analysis.readout).

References are independent of vitviz's walk: attention by hand from each block's own qkv weights while timm's own
blocks carry the tokens; the pool's softmax by hand from its weights; rollout as a plain loop of matrix products;
the embedding as timm's ``forward_head(forward_features(x), pre_logits=True)``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitviz.analysis import analyze
from vitviz.analysis.maps import query_attention_maps, raw_attention_maps, rollout_map, rollout_table
from vitviz.analysis.readout import readout_weights
from vitviz.analysis.rollout import discard_lowest
from vitviz.errors import ModelError, ParameterError
from vitviz.experiments.ablation import ablate, reference
from vitviz.experiments.position import position_experiment
from vitviz.models import describe_model
from vitviz.settings import Settings
from vitviz.walk.capture import attention_forward, check_capturable

ARCH = "vit_small_patch16_224"
KINDS = {"gap": dict(global_pool="avg"), "map": dict(global_pool="map"),
         "map_reg": dict(global_pool="map", reg_tokens=2), "gap_reg": dict(global_pool="avg", reg_tokens=1)}


def cls_less(kind: str, *, img_size: int = 32, num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    """A tiny random CLS-less ViT, its weights spread so attention is far from uniform."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, img_size=img_size, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, class_token=False, num_classes=num_classes, **KINDS[kind])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.mul_(3.0)  # sharper softmaxes than timm's small init
            if name.endswith("latent"):
                p.normal_()
    return model.eval()


def image(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_attention(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, H, T, T) attention by hand from each block's qkv weights, timm's own blocks carrying the tokens; and
    timm's final normed features (T, C)."""
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        out = []
        for blk in model.blocks:
            attn = blk.attn
            B, T, C = t.shape
            qkv = torch.nn.functional.linear(blk.norm1(t), attn.qkv.weight, attn.qkv.bias)
            q, k, _v = qkv.reshape(B, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            out.append(((q @ k.transpose(-2, -1)) * (C // attn.num_heads) ** -0.5).softmax(-1)[0])
            t = blk(t)
        return torch.stack(out), model.norm(t)[0]


def pool_by_hand(model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """AttentionPoolLatent's probabilities from its weights: softmax(q·kᵀ/√d), averaged over heads and latents,
    over the tokens it pools (the patches: timm skips the prefix tokens) -> (T,), prefix tokens 0."""
    pool, p = model.attn_pool, model.num_prefix_tokens
    x = feats[p:]
    C, H = x.shape[-1], pool.num_heads
    q = torch.nn.functional.linear(pool.latent[0], pool.q.weight, pool.q.bias).reshape(-1, H, C // H)  # (Q, H, d)
    k = torch.nn.functional.linear(x, pool.kv.weight[:C], pool.kv.bias[:C]).reshape(-1, H, C // H)  # (N, H, d)
    a = (torch.einsum("qhd,nhd->hqn", q, k) * (C // H) ** -0.5).softmax(-1)
    return torch.cat([torch.zeros(p), a.mean(dim=(0, 1))])


def naive_rollout(attn: torch.Tensor, w: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """w · Â_end ··· Â_start with Â = norm_rows(mean_h A + I), as a plain loop."""
    T = attn.shape[-1]
    r = torch.eye(T, dtype=torch.float64)
    for layer in range(start, end + 1):
        a = attn[layer].double().mean(0) + torch.eye(T, dtype=torch.float64)
        r = (a / a.sum(-1, keepdim=True)) @ r
    return w.double() @ r


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_capture_of_a_cls_less_model_is_timms_attention_and_its_tokens(kind):
    model = cls_less(kind)
    x = image(1)
    want, feats = timm_attention(model, x)
    cap = attention_forward(model, x, tokens=True)
    torch.testing.assert_close(cap.attention[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.features[0], feats, rtol=1e-5, atol=1e-5)
    inter = model.forward_intermediates(x, norm=False, intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(cap.tokens[0, :, model.num_prefix_tokens:], torch.cat(inter), rtol=1e-5, atol=1e-5)
    info = describe_model(model)
    assert info.readout == ("mean" if kind.startswith("gap") else "pool") and not info.has_class_token


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_readout_weights_are_the_pools_own(kind):
    model = cls_less(kind)
    x = torch.cat([image(2), image(3)])
    feats = model.forward_features(x).detach()
    w = readout_weights(model, feats)
    p, T = model.num_prefix_tokens, feats.shape[1]
    assert w.shape == (2, T) and torch.all(w[:, :p] == 0)
    if kind.startswith("gap"):
        torch.testing.assert_close(w, torch.cat([torch.zeros(2, p), torch.full((2, T - p), 1 / (T - p))], 1))
        return
    for i in range(2):
        torch.testing.assert_close(w[i], pool_by_hand(model, feats[i]), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(w[0], w[1], atol=1e-3)  # an attention pool's weights depend on the image
    assert not torch.allclose(w[0, p:], torch.full((T - p,), 1 / (T - p)), atol=1e-3)


def test_a_cls_model_reads_its_cls_row_and_max_pooling_without_cls_is_refused():
    torch.manual_seed(0)
    plain = timm.create_model(ARCH, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=0).eval()
    assert check_capturable(plain) == "cls" and readout_weights(plain, torch.zeros(1, 17, 32)) is None
    maxed = timm.create_model(ARCH, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=0, class_token=False, global_pool="max").eval()
    with pytest.raises(ModelError, match="no CLS token and its head pools the tokens by 'max'"):
        check_capturable(maxed)


@pytest.mark.parametrize("kind", ["map", "gap_reg"])
def test_the_maps_follow_the_readout(kind):
    """rollout_map, rollout_table, the raw maps and the per-head maps equal the readout's row of a naive loop."""
    model = cls_less(kind)
    info = describe_model(model)
    res = analyze(model, Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    attn, w = torch.from_numpy(res.attention), torch.from_numpy(res.readout)
    p = info.num_prefix_tokens
    x = torch.from_numpy(((res.pixels / 255.0 - np.array(info.mean)) / np.array(info.std)).astype(np.float32))
    torch.testing.assert_close(w, readout_weights(model, model.forward_features(x.permute(2, 0, 1)[None]))[0])
    grid = lambda r: r[p:].reshape(info.grid).float()  # noqa: E731
    got = rollout_map(res.attention, info=info, settings=Settings(start_layer=0, discard_ratio=0.0),
                      readout=res.readout)
    torch.testing.assert_close(torch.from_numpy(got), grid(naive_rollout(attn, w, 0, 1)), rtol=1e-5, atol=1e-6)
    table = rollout_table(res.attention, info=info, readout=res.readout)
    for a, b in ((0, 0), (0, 1), (1, 1)):
        torch.testing.assert_close(torch.from_numpy(table[a, b]), grid(naive_rollout(attn, w, a, b)),
                                   rtol=1e-5, atol=1e-6)
    raw = raw_attention_maps(res.attention, info=info, readout=res.readout)
    heads = query_attention_maps(res.attention, info=info, layer=1, readout=res.readout)
    for layer in range(2):
        torch.testing.assert_close(torch.from_numpy(raw[layer]), grid(w @ attn[layer].mean(0)), rtol=1e-5, atol=1e-7)
    for h in range(2):
        torch.testing.assert_close(torch.from_numpy(heads[h]), grid(w @ attn[1, h]), rtol=1e-5, atol=1e-7)


def test_artefact_rollout_leaves_the_dropped_tokens_out_of_the_readout_too():
    model = cls_less("gap")
    info = describe_model(model)
    res = analyze(model, Image.new("RGB", (32, 32), (120, 40, 200)))
    drop = np.zeros(info.num_tokens, dtype=bool)
    drop[[0, 5]] = True  # token 0 is a patch here: nothing protects it
    table = rollout_table(res.attention, info=info, readout=res.readout, drop_tokens=drop)
    assert table[0, 1].reshape(-1)[[0, 5]].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(table[0, 1].sum(), 1.0, rtol=1e-5)
    with pytest.raises(ParameterError, match="one set of dropped tokens"):  # per-layer masks: no one readout row
        rollout_table(res.attention, info=info, readout=res.readout, drop_tokens=np.stack([drop] * info.depth))


def test_without_a_cls_column_discard_counts_every_entry():
    a = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    out = discard_lowest(a, 0.5, keep_column=None)
    assert all(int((m == 0).sum()) == int(0.5 * 36) for m in out)
    for m, kept in zip(a, out, strict=True):  # the zeroed entries are the lowest, column 0 included
        assert kept[kept > 0].min() >= m[kept == 0].max()


@pytest.mark.parametrize("kind", ["gap", "map_reg"])
def test_experiments_compare_the_pooled_embedding(kind):
    model = cls_less(kind, num_classes=3)
    x = image(5)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)[0]
    torch.testing.assert_close(reference(model, x).embedding, want, rtol=1e-5, atol=1e-6)
    done = position_experiment(model, x, variants=("shuffled",), start=0)
    assert done.readout == ("mean" if kind == "gap" else "pool")
    intact = done.variant("intact")
    torch.testing.assert_close(torch.from_numpy(intact.embedding), want, rtol=1e-5, atol=1e-6)
    attn, feats = timm_attention(model, x)
    w = readout_weights(model, feats[None])[0]
    p = model.num_prefix_tokens
    torch.testing.assert_close(torch.from_numpy(intact.attention_map),
                               naive_rollout(attn, w, 0, 1)[p:].reshape(4, 4).float(), rtol=1e-5, atol=1e-6)
    cut = ablate(model, x, [(1, 0)], attention=True)
    assert cut.readout.shape == (attn.shape[-1],) and abs(float(cut.readout.sum()) - 1) < 1e-5


def test_analyze_cli_on_a_cls_less_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from vitviz.cli import main

    model = cls_less("map")
    path = tmp_path / "siglip_like.safetensors"
    kwargs = dict(embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="map", num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": ARCH, "kwargs": json.dumps(kwargs)})
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / "a.png")
    assert main(["analyze", str(src), "--out", str(out), "--model", str(path), "--img-size", "32", "--quiet",
                 "--method", "rollout:start=1,discard=0.9"]) == 0
    with np.load(out / "a.npz") as d:
        assert str(d["readout"]) == "pool" and "attention-pool head" in str(d["map_target"])
        w = torch.from_numpy(d["readout_weights"])
        x = torch.from_numpy(((d["pixels"] / 255.0 - 0.5) / 0.5).astype(np.float32)).permute(2, 0, 1)[None]
        torch.testing.assert_close(w, readout_weights(model, model.forward_features(x).detach())[0],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d["map"], d["attention_map"])  # --method asked for the analysis's own rollout


@pytest.mark.parametrize("kind", ["map_reg", "gap"])
def test_the_explain_methods_rollout_and_raw_follow_the_readout(kind):
    from vitviz.explain import explain

    model = cls_less(kind)
    x = image(7)
    attn, feats = timm_attention(model, x)
    w = readout_weights(model, feats[None])[0]
    p = model.num_prefix_tokens
    rolled = explain(model, x, method="rollout:start=0,discard=0").map
    np.testing.assert_allclose(rolled, naive_rollout(attn, w, 0, 1)[p:].reshape(4, 4).numpy(), rtol=1e-5, atol=1e-7)
    raw = explain(model, x, method="raw:layer=0").map
    np.testing.assert_allclose(raw, (w @ attn[0].mean(0))[p:].reshape(4, 4).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["map_reg", "gap"])
def test_every_app_view_renders_a_cls_less_model_and_says_what_its_maps_follow(kind, tmp_path, monkeypatch):
    """AppTest on a CLS-less checkpoint: every view renders without an exception or an error (the Explain view runs
    the other engineers' methods: no exception there), and the attention views name the readout."""
    from .helpers import app_serves
    from .test_app import SECTION_OF, TABS, captions, ok, show, started, view_text

    model = cls_less(kind, img_size=64)
    kwargs = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=64, num_classes=0, class_token=False,
                  **KINDS[kind])
    app_serves(monkeypatch, model, tmp_path / f"{kind}.safetensors", arch=ARCH, kwargs=kwargs)
    at = started()
    ok(at)
    said = {}
    for tab in TABS:
        show(at, tab)
        assert not at.exception, (tab, [e.value for e in at.exception])
        if tab != "Explain":
            ok(at)
        said[tab] = view_text(at) + "\n" + captions(at)
    name = "the mean-pooled readout" if kind == "gap" else "the attention-pool head"
    show(at, "Head ablation").multiselect(key="ablate_heads").set_value(["1:0"]).run()  # the maps under ablation
    ok(at)
    assert "readout rollout, ablated" in captions(at) and f"Each head's attention of {name}" in captions(at)
    assert f"Attention of {name}" in said["Attention rollout"] and "no CLS token" in said["Attention rollout"]
    assert f"where {name}" in said["Heads"]
    assert show(at, "Attention rollout").radio(key="view").label == "Readout attention"
    assert ("mean-pooled embedding" if kind == "gap" else "attention-pooled embedding") in said["Remove positions"]
    assert "CLS" not in said["Patch grid"] and SECTION_OF["Heads"] == "Attention"


@pytest.mark.parametrize("pool_type", ["token", "avg"])
def test_a_pool_of_several_latents_is_read_as_its_output_reads_them(pool_type):
    """timm's AttentionPoolLatent with 2 latents returns latent 0 ("token") or their mean ("avg"): the readout
    weights are that latent's attention, or the latents' mean, averaged over the heads (by hand, as pool_by_hand)."""
    from timm.layers import AttentionPoolLatent

    model = cls_less("map")
    torch.manual_seed(5)
    model.attn_pool = AttentionPoolLatent(32, num_heads=2, latent_len=2, pool_type=pool_type).eval()
    with torch.no_grad():
        model.attn_pool.latent.normal_()
    feats = model.forward_features(image(4)).detach()
    pool, C, H = model.attn_pool, 32, 2
    q = torch.nn.functional.linear(pool.latent[0], pool.q.weight, pool.q.bias).reshape(2, H, C // H)
    k = torch.nn.functional.linear(feats[0], pool.kv.weight[:C], pool.kv.bias[:C]).reshape(-1, H, C // H)
    a = (torch.einsum("qhd,nhd->hqn", q, k) * (C // H) ** -0.5).softmax(-1)  # (H, 2, T)
    want = (a[:, 0] if pool_type == "token" else a.mean(1)).mean(0)
    torch.testing.assert_close(readout_weights(model, feats)[0], want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(a[:, 0].mean(0), a[:, 1].mean(0), atol=1e-3)  # the two latents differ


def test_latents_left_unpooled_are_refused_with_the_reason():
    from timm.layers import AttentionPoolLatent

    model = cls_less("map")
    model.attn_pool = AttentionPoolLatent(32, num_heads=2, latent_len=2, pool_type="").eval()
    with pytest.raises(ModelError, match="latents unpooled"):
        check_capturable(model)


def test_the_experiments_name_the_embedding_the_head_pools_not_the_readout():
    """A model with a CLS token whose head averages its patches (as DINOv3's): the views follow the CLS row, the
    experiments compare forward_head(pre_logits=True), the mean of the patch tokens, and say so."""
    from vitviz.analysis.readout import embedding_name

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=0, global_pool="avg").eval()
    info = describe_model(model)
    assert info.readout == "cls" and info.pooling == "avg"
    assert embedding_name(info.pooling) == "the mean-pooled embedding"
    feats = model.forward_features(image(1))
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), model.fc_norm(feats[:, 1:].mean(1)))
    assert embedding_name(describe_model(cls_less("map")).pooling) == "the attention-pooled embedding"
    assert embedding_name(describe_model(timm.create_model(ARCH, pretrained=False, img_size=32, patch_size=8,
                                                           embed_dim=32, depth=1, num_heads=2)).pooling) == \
        "the CLS embedding"
