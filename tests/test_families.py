"""timm's ViT families in the one walk of the blocks: tiny random instances of each, checked against timm's own path.

Per family (ViT, DeiT's distillation token, registers, a DINOv3-like Eva with RoPE and registers, an EVA-02-like Eva
with SwiGLU and RoPE, BEiT with per-block and with shared relative position biases, an attention-pool "map" head
as SigLIP's, an average pool): the capture equals timm's own unfused attention (fused attention switched off on a
private copy, probabilities read at ``attn_drop``), the outputs equal timm's forward, the total gradients ∂s/∂A_l
equal finite differences through timm's own eager path, and every registered method either runs or is refused with
a sentence, exactly as :data:`REFUSED` declares.
"""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from vitviz.analysis.onepass import analyze
from vitviz.analysis.posembed import patch_pos_embed
from vitviz.errors import ModelError, ModelUnavailableError, VitvizError
from vitviz.explain import METHOD_NAMES, explain
from vitviz.explain.passes import attention_gradients
from vitviz.models import build_model, describe_model, list_pretrained_vits, list_vit_models, load_source
from vitviz.targets import Target
from vitviz.walk.blocks import KeptProbs, embed, pool_attention, run_blocks, walk
from vitviz.walk.capture import attention_forward

SMALL = dict(pretrained=False, embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)

# family -> (timm architecture, kwargs over SMALL): the architecture's own settings otherwise (norms, pools, RoPE)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=2, no_embed_class=True)),
    "eva_rope": ("vit_small_patch16_dinov3", {}),  # DINOv3: RoPE (rotate-half), 4 registers, layer scale, avg pool
    "eva02": ("eva02_tiny_patch14_224", {}),  # EVA-02: RoPE (interleaved), SwiGLU with its norm, abs. positions
    "beit": ("beit_base_patch16_224", {}),  # a relative position bias in every block, layer scale, q/v biases
    "beit_shared": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                 use_abs_pos_emb=True, global_pool="token")),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),  # AttentionRope, learned RoPE frequencies per layer
    "gqa_rmsnorm": ("vit_base_patch16_sapiens2", dict(num_kv_heads=1)),  # Sapiens2: grouped-query, RmsNorm, GLU
    "pe_core": ("vit_pe_core_tiny_patch16_384", {}),  # Perception Encoder: RoPE and an attention-pool head
    "siglip_like": ("vit_tiny_patch16_224", dict(global_pool="map")),  # attention-pool head (with a CLS token)
    "siglip": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="map")),  # SigLIP's tower: no CLS token
    "eva_gap": ("vit_medium_patch16_rope_reg1_gap_256", {}),  # RoPE, 1 register, no CLS token, average pool
    "avg_pool": ("vit_tiny_patch16_224", dict(global_pool="avg")),
}

_NO_CLS = "no CLS token, so there is no CLS attention to roll out"  # rollout and raw read the CLS row
NO_CLS = ("siglip", "eva_gap")  # no CLS token: the capture's views read the pooling (vitviz.analysis.readout)
# (family, method) -> a phrase of the sentence it is refused with; every other pair runs
REFUSED: dict[tuple[str, str], str] = {}  # attention pools: the gradient methods and deletion read the pool too
FAST = {"deletion": "deletion:steps=2"}


@functools.cache
def family_model(name: str, *, num_classes: int = 3, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random instance of ``name``, weights spread so that attention, biases and layer scales matter."""
    arch, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, **{**SMALL, "num_classes": num_classes, **kwargs})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "gamma" in pname:  # Eva's and Beit's layer scale γ (init 1e-5 or 0.1)
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif pname.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight", "kv.weight", "pool.q.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif any(s in pname for s in ("pos_embed", "token", "bias_table", "q_bias", "v_bias", "latent")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif pname.startswith("head."):  # some heads start near zero (head_init_scale): no gradient to check
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif pname.endswith("norm.weight") or pname.endswith("norm.bias"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if pname.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype).eval()


def image(model, seed: int = 0) -> torch.Tensor:
    h, w = model.patch_embed.img_size
    dtype = next(model.parameters()).dtype
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


class EagerProbe:
    """timm's own eager forward on a private copy (fused attention off): each layer's probabilities read (and
    optionally moved by a delta) at ``attn_drop``, which every family's unfused attention applies to them."""

    def __init__(self, model):
        self.ref = copy.deepcopy(model)
        self.delta: dict[int, torch.Tensor] = {}
        self.probs: list[torch.Tensor] = []
        for layer, blk in enumerate(self.ref.blocks):
            blk.attn.fused_attn = False
            blk.attn.attn_drop.register_forward_hook(self._probe(layer))

    def _probe(self, layer):
        def hook(_m, _i, out):
            out = out + self.delta[layer] if layer in self.delta else out
            self.probs.append(out)
            return out
        return hook

    def logits(self, x):
        self.probs = []
        return self.ref(x)


@pytest.mark.parametrize("name", NO_CLS)
def test_a_model_without_a_cls_token_is_walked_and_captured_as_timm(name):
    """The walk (what the gradient methods run) and the capture (whose views follow the model's pooling, its
    readout) equal timm's own attention and forward."""
    model = family_model(name)
    x = torch.cat([image(model, 0), image(model, 1)])
    probe = EagerProbe(model)
    with torch.no_grad():
        want_logits = probe.logits(x)
        kept = KeptProbs()
        out = model.forward_head(model.norm(walk(model, embed(model, x), probs=kept)))
        torch.testing.assert_close(torch.stack(kept.kept, 1), torch.stack(probe.probs, 1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention_forward(model, x).attention, torch.stack(probe.probs, 1), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", [f for f in FAMILIES if f not in NO_CLS])
def test_capture_equals_the_family_own_attention_and_outputs(name):
    model = family_model(name)
    x = torch.cat([image(model, 0), image(model, 1)])
    probe = EagerProbe(model)
    with torch.no_grad():
        want_logits = probe.logits(x)
        want = torch.stack(probe.probs, dim=1)  # (B, L, H, T, T)
        cap = attention_forward(model, x)
        torch.testing.assert_close(cap.attention, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap.features, model.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(cap.features), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(cap.features), want_logits, rtol=1e-5, atol=1e-5)
        # the family's own fused blocks, as greedy deletion and the plain pass run them
        torch.testing.assert_close(model.norm(run_blocks(model, embed(model, x))), model.forward_features(x),
                                   rtol=1e-5, atol=1e-5)
        # attention only (the last block stops at its probabilities): the same probabilities
        only = attention_forward(model, x, features=False)
        torch.testing.assert_close(only.attention, cap.attention, rtol=0, atol=0)
    rows = cap.attention.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("name", ["eva_rope", "eva02", "rope_mixed", "gqa_rmsnorm", "eva_gap", "beit", "beit_shared"])
def test_a_shortened_sequence_keeps_its_positions_as_timm_with_the_removed_keys_masked(name):
    """Token removal (greedy deletion, the faithfulness curves): the prefix tokens and K kept patches, walked with
    the rotary embedding / relative bias read at the kept patches' places, equal timm's own blocks on the whole
    sequence with the removed tokens masked out as keys (an additive -inf on their logits), row for row."""
    model = family_model(name)
    x = image(model)
    p, n = int(model.num_prefix_tokens), int(model.patch_embed.num_patches)
    g = torch.Generator().manual_seed(5)
    keep = torch.stack([torch.randperm(n, generator=g)[:7] for _ in range(2)])  # (2, 7), unsorted on purpose
    with torch.no_grad():
        full = embed(model, x).expand(2, -1, -1)
        seq = torch.cat([full[:, :p], torch.gather(full[:, p:], 1, keep[..., None].expand(-1, -1, full.shape[-1]))], 1)
        ours = run_blocks(model, seq, patches=keep)
        mask = torch.full((2, 1, 1, p + n), float("-inf"))
        mask[:, :, :, :p] = 0
        mask.scatter_(3, (keep + p)[:, None, None, :], 0.0)
        ref, shared = full, getattr(model, "rel_pos_bias", None)
        eva = not name.startswith("beit")
        rope = model._pos_embed(model.patch_embed(x))[1] if eva else None  # timm's own RoPE
        for layer, blk in enumerate(model.blocks):
            if eva:
                ref = blk(ref, rope=rope[layer] if model.rope_mixed else rope, attn_mask=mask)
            else:
                ref = blk(ref, shared_rel_pos_bias=mask + (0 if shared is None else shared()[None]))
        rows = torch.cat([torch.arange(p).expand(2, -1), keep + p], 1)
        want = torch.gather(ref, 1, rows[..., None].expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["siglip_like", "pe_core", "vit"])
def test_the_attention_pool_exposes_its_own_attention(name):
    """The latent query's probabilities over the tokens: the pool's output rebuilt from them (value mixing,
    projection, residual MLP, as AttentionPoolLatent does) equals timm's attn_pool on the same features."""
    model = family_model(name)
    x = torch.cat([image(model, 0), image(model, 1)])
    with torch.no_grad():
        feats = attention_forward(model, x).features
        a = pool_attention(model, feats)
        if name == "vit":
            assert a is None
            return
        pool = model.attn_pool
        B, T, C = feats.shape
        assert a.shape == (B, pool.num_heads, pool.latent_len, T)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
        inp = feats if pool.pos_embed is None else feats + pool.pos_embed[None]
        v = pool.kv(inp).reshape(B, T, 2, pool.num_heads, pool.head_dim)[:, :, 1].transpose(1, 2)
        out = pool.proj((a @ v).transpose(1, 2).reshape(B, pool.latent_len, C))
        out = (out + pool.mlp(pool.norm(out)))[:, 0]
        torch.testing.assert_close(out, pool(feats), rtol=1e-5, atol=1e-5)
        assert a.std() > 1e-3  # the weights spread: not a uniform pool that any probabilities would match


def test_positions_inside_attention_matter():
    """A check that could fail: the rotary embedding and the relative position bias change the attention."""
    for name in ("eva_rope", "beit", "beit_shared"):
        model = family_model(name)
        x = image(model)
        plain = copy.deepcopy(model)
        with torch.no_grad():
            if name == "eva_rope":
                plain.rope = None
            elif name == "beit":
                for blk in plain.blocks:
                    blk.attn.relative_position_bias_table.zero_()
            else:
                plain.rel_pos_bias.relative_position_bias_table.zero_()
            a, b = attention_forward(model, x).attention, attention_forward(plain, x).attention
        assert (a - b).abs().max() > 1e-3, name


@pytest.mark.parametrize("name", [f for f in FAMILIES if f not in NO_CLS])
def test_the_analysis_behind_the_views_runs_for_every_family(name):
    model = family_model(name)
    res = analyze(model, Image.new("RGB", (48, 40), (10, 200, 90)), tokens=True)
    T = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
    assert res.attention.shape == (2, 2, T, T) and res.tokens.shape == (2, T, 32)
    assert np.isfinite(res.attention).all() and np.isfinite(res.tokens).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_total_gradients_equal_finite_differences_through_timm(name):
    """⟨∂y_c/∂A_l, D⟩ (Chefer's and gradient × attention's pass) equals (y(A_l + εD) - y(A_l - εD)) / 2ε, y_c read
    by timm's own forward with A_l moved at ``attn_drop``, in double precision."""
    model = family_model(name, dtype=torch.float64)
    x = image(model)
    target = Target("class", 1)
    got = attention_gradients(model, x, target=target)
    probe = EagerProbe(model)
    eps, g = 1e-6, torch.Generator().manual_seed(3)

    def y(layer, delta):
        probe.delta = {layer: delta}
        return float(probe.logits(x)[0, 1])

    with torch.no_grad():
        for layer in range(len(model.blocks)):
            d = torch.randn(got.gradients.shape[1:], generator=g, dtype=torch.float64)
            fd = (y(layer, eps * d) - y(layer, -eps * d)) / (2 * eps)
            analytic = float((got.gradients[layer] * d).sum())
            assert abs(analytic) > 1e-6, "a zero gradient would make this check vacuous"
            assert fd == pytest.approx(analytic, rel=1e-5, abs=1e-8)


def test_every_refusal_names_a_registered_method_and_family():
    assert {m for _f, m in REFUSED} <= set(METHOD_NAMES)
    assert {f for f, _m in REFUSED} <= set(FAMILIES)


@pytest.mark.parametrize(("name", "method"), [(f, m) for f in FAMILIES for m in METHOD_NAMES])
def test_every_method_runs_or_is_refused_with_its_reason(name, method):
    model = family_model(name)
    x = image(model)
    label = FAST.get(method, method)
    reason = REFUSED.get((name, method))
    if reason is not None:
        with pytest.raises(ModelError) as err:
            explain(model, x, method=label, target="class:1")
        assert isinstance(err.value, VitvizError) and reason in str(err.value)
        assert reason == _NO_CLS or "choose another method" in str(err.value)
        return
    e = explain(model, x, method=label, target="class:1")
    assert e.map.shape == tuple(int(v) for v in model.patch_embed.grid_size)
    assert np.isfinite(e.map).all()
    assert e.informative or e.notes


@pytest.mark.parametrize(("name", "says"), [("eva_rope", "rotary embeddings (RoPE)"),
                                            ("beit", "relative position bias")])
def test_a_model_without_a_learned_position_embedding_says_why(name, says):
    model = family_model(name)
    with pytest.raises(ModelError, match=r"has no learned position embedding") as err:
        patch_pos_embed(model)
    assert says in str(err.value)
    with pytest.raises(ModelError, match="no learned absolute position embedding to replace"):
        embed(model, image(model), pos_embed=torch.zeros(1, 17, 32))
    res = analyze(model, Image.new("RGB", (40, 40), (120, 30, 200)))  # every other view still has its analysis
    assert res.pos_sim is None and says in res.pos_note
    assert res.attention.shape[0] == 2
    assert family_model("eva02") is not None and analyze(family_model("eva02"), Image.new("RGB", (32, 32))).pos_note \
        is None  # EVA-02 adds a learned position embedding besides its RoPE: compared as a ViT's


@pytest.mark.parametrize("name", ["eva_rope", "eva02", "beit", "beit_shared", "registers"])
def test_a_checkpoint_naming_its_family_architecture_loads_and_computes_as_timm(name, tmp_path):
    """A safetensors file with metadata 'arch' (and the widths in 'kwargs') rebuilds the family's model: the same
    outputs as the model saved; at another image size Beit's relative bias tables are resampled, Eva's RoPE is
    rebuilt for the grid, and the capture still sums to 1 per row."""
    arch, extra = FAMILIES[name]
    model = family_model(name)
    kwargs = dict(embed_dim=32, depth=2, num_heads=2, **({"img_size": 32} if name == "eva_rope" else {}))
    kwargs.update({k: v for k, v in extra.items() if k in ("global_pool", "reg_tokens", "no_embed_class")})
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": arch, "kwargs": json.dumps(kwargs)})
    if extra.get("use_shared_rel_pos_bias"):  # not a setting a checkpoint may record: the arch's own is per block
        with pytest.raises(VitvizError):
            build_model(*load_source(path))
        return
    source, state = load_source(path)
    built = build_model(source, state)
    x = image(model)
    with torch.no_grad():
        torch.testing.assert_close(built(x), model(x), rtol=1e-5, atol=1e-5)
    info = describe_model(built, source=source)
    assert info.num_prefix_tokens == model.num_prefix_tokens and info.has_class_token
    assert info.num_reg_tokens == (4 if name == "eva_rope" else 2 if name == "registers" else 0)
    bigger = build_model(source, state, img_size=48)
    assert tuple(bigger.patch_embed.grid_size) == (6, 6)
    with torch.no_grad():
        cap = attention_forward(bigger, torch.randn(1, 3, 48, 48))
    torch.testing.assert_close(cap.attention.sum(-1), torch.ones(cap.attention.shape[:-1]))


def test_the_families_are_offered_by_name_and_fail_clearly_offline(monkeypatch):
    import vitviz.models.hub as vm

    for arch in ("vit_small_patch16_dinov3", "eva02_small_patch14_224", "beit_base_patch16_224"):
        assert arch in list_vit_models()
    assert any(n.startswith("vit_small_patch16_dinov3.") for n in list_pretrained_vits())

    def never(*_a, **_k):
        raise AssertionError("the download must not be attempted")

    monkeypatch.setattr(vm, "_hub_reachable", lambda: False)
    monkeypatch.setattr(timm, "create_model", never)
    with pytest.raises(ModelUnavailableError, match="'vit_small_patch16_dinov3' are not on this server"):
        load_source("vit_small_patch16_dinov3")


@pytest.mark.parametrize("perturbation", ["tokens", "pixels"])
@pytest.mark.parametrize("name", ["eva_rope", "eva02", "beit", "beit_shared", "siglip", "eva_gap"])
def test_faithfulness_curves_run_for_every_family(name, perturbation):
    """The curves beside every map: step 0 is timm's own probability of the class; token removal shortens the
    sequence (the positions inside attention read at the kept patches), pixel removal runs the family's blocks."""
    from vitviz.metrics.faithfulness import faithfulness

    model = family_model(name)
    x = image(model)
    heat = np.random.default_rng(0).random(tuple(int(v) for v in model.patch_embed.grid_size))
    c = faithfulness(model, x, heat, target="class:1", perturbation=perturbation, steps=4)
    with torch.no_grad():
        p1 = float(model(x).softmax(-1)[0, 1])
    assert np.isfinite(c.morf).all() and np.isfinite(c.lerf).all()
    assert c.morf[0] == pytest.approx(p1, rel=1e-4) and c.lerf[0] == pytest.approx(p1, rel=1e-4)
    assert not np.allclose(c.morf[1:], p1)  # removing patches changes the score


@pytest.mark.parametrize("name", ["eva_rope", "rope_mixed", "eva_gap", "beit", "beit_shared", "avg_pool", "eva02",
                                  "gqa_rmsnorm", "siglip_like", "siglip", "pe_core"])
def test_lrp_conserves_the_score_with_zero_biases_in_every_family_it_runs_on(name):
    """AttnLRP's rules make the walk linear in its tokens given the constants (softmax, 1/σ, activation slopes; the
    rotary embedding and the relative position bias act on the constant probabilities only, layer scale γ is a
    factor; a gated MLP's product is quadratic and its gradient halved by the uniform rule; an attention pool's
    probabilities are constants too), so with every bias at zero the relevance of all tokens sums to the score
    exactly (Euler)."""
    from vitviz.explain.lrp import relevance

    model = copy.deepcopy(family_model(name, dtype=torch.float64))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):  # biases, Eva's and Beit's q/v biases; the relative bias tables stay
                p.zero_()
    rel, _out, _t, score = relevance(model, image(model), target="class:1")
    assert abs(score) > 1e-3
    assert float(rel.sum()) == pytest.approx(score, rel=1e-9, abs=1e-12)
