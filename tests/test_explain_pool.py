"""Attention-pool heads (timm's "map": SigLIP's towers, with or without a CLS token) under the target-dependent
methods: Chefer's rollout and gradient × attention read the pool's own weights as their row, greedy deletion
removes tokens from the pool's softmax too.

References are written here, independent of vitviz's walk: each block's attention by hand from its qkv weights
(kept for autograd), timm's own ``forward_head`` for the score, the pool's softmax and its whole forward by hand
from its weights (with the key bias added to its logits), plain loops for the rollout and the greedy removal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from vitviz.errors import ModelError
from vitviz.explain import METHODS, embed_tokens, explain
from vitviz.explain.deletion import PRESENCE, _presence_gradient, _weighted_outputs, deletion_order
from vitviz.explain.passes import attention_gradients, pool_readout
from vitviz.metrics.faithfulness import run_kept
from vitviz.walk.blocks import Interventions, KeptProbs, walk

# kind -> timm kwargs: no CLS token (SigLIP), a CLS token the pool never reads, a pool reading the prefix tokens too
KINDS = {
    "siglip": dict(class_token=False),
    "siglip_like": dict(),
    "siglip_prefix": dict(reg_tokens=2, pool_include_prefix=True),
}


def pool_model(kind: str, *, num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A tiny random ViT with an attention-pool head, in float64, its weights spread so no softmax is uniform."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, global_pool="map", num_classes=num_classes, **KINDS[kind])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.weight", "kv.weight", "q.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("latent", "cls_token", "reg_token", "pos_embed")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.startswith(("norm.", "attn_pool.norm.")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.5)
    return model.double().eval()


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pooled_from(model) -> int:
    return 0 if model.pool_include_prefix else int(model.num_prefix_tokens)


def hand_blocks(model, t: torch.Tensor, bias: torch.Tensor | None = None):
    """timm's pre-norm blocks with each attention written out, softmax(q·kᵀ/√d + b)·v: (1, T, C) tokens ->
    final normed tokens and every layer's attention (H, T, T), in the autograd graph."""
    kept = []
    for blk in model.blocks:
        h = blk.norm1(t)
        _, T, C = h.shape
        H = blk.attn.num_heads
        q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)[0].reshape(T, 3, H, C // H).permute(1, 2, 0, 3)
        logits = q @ k.transpose(-2, -1) / math.sqrt(C // H)
        a = (logits if bias is None else logits + bias).softmax(-1)
        kept.append(a)
        out = F.linear((a @ v).transpose(0, 1).reshape(1, T, C), blk.attn.proj.weight, blk.attn.proj.bias)
        t = t + blk.ls1(out)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.norm(t), kept


def hand_pool(model, feats: torch.Tensor, bias: torch.Tensor | None = None):
    """AttentionPoolLatent by hand on (1, T, C): the latent's softmax(q·kᵀ/√d + b) over the pooled tokens, the
    value mixing, projection and residual MLP, then fc_norm and the head -> (embedding (C,), logits, weights (T,):
    the attention averaged over heads and latents, 0 on the tokens not pooled)."""
    pool, start = model.attn_pool, pooled_from(model)
    x = feats[0, start:]
    N, C = x.shape
    H = pool.num_heads
    q = F.linear(pool.latent[0], pool.q.weight, pool.q.bias).reshape(-1, H, C // H)  # (Q, H, d)
    k, v = F.linear(x, pool.kv.weight, pool.kv.bias).reshape(N, 2, H, C // H).unbind(1)  # (N, H, d) each
    logits = torch.einsum("qhd,nhd->hqn", q, k) / math.sqrt(C // H)
    a = (logits if bias is None else logits + bias[start:]).softmax(-1)
    out = F.linear(torch.einsum("hqn,nhd->qhd", a, v).reshape(-1, C), pool.proj.weight, pool.proj.bias)
    out = (out + pool.mlp(pool.norm(out)))[0]
    embedding = model.fc_norm(out)
    w = torch.zeros(feats.shape[1], dtype=feats.dtype)
    w[start:] = a.mean(dim=(0, 1))
    return embedding, model.head(embedding), w


def timm_tokens(model, x):
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def naive_gradients(model, x, target: str):
    """Every layer's attention A_l and ∂s/∂A_l from the hand forward, s the class logit (timm's own head) or the
    label-free ⟨f(x), f(x̃)⟩; and the pool's weights w by hand."""
    feats, kept = hand_blocks(model, timm_tokens(model, x))
    if target == "embedding":
        emb = model.forward_head(feats, pre_logits=True)[0]
        score = emb @ emb.detach()
    else:
        score = model.forward_head(feats)[0, int(target.partition(":")[2])]
    grads = torch.autograd.grad(score, kept)
    with torch.no_grad():
        w = hand_pool(model, feats)[2]
    return [a.detach() for a in kept], [g.detach() for g in grads], w


def naive_chefer(attention, gradients, w, p: int) -> np.ndarray:
    T = attention[0].shape[-1]
    R = torch.eye(T, dtype=torch.float64)
    for a, g in zip(attention, gradients, strict=True):
        abar = (g * a).clamp(min=0).mean(dim=0)
        R = R + abar @ R
    return (w @ R)[p:].reshape(4, 4).numpy()


def naive_gradxattn(attention, gradients, w, p: int) -> np.ndarray:
    abar = (gradients[-1] * attention[-1]).clamp(min=0).mean(dim=0)
    return (w @ abar)[p:].reshape(4, 4).numpy()


def test_the_hand_forward_is_timms():
    for kind in KINDS:
        model, x = pool_model(kind), image()
        with torch.no_grad():
            feats, _ = hand_blocks(model, timm_tokens(model, x))
            emb, logits, w = hand_pool(model, feats)
            torch.testing.assert_close(feats, model.forward_features(x))
            torch.testing.assert_close(logits, model(x)[0])
            torch.testing.assert_close(emb, model.forward_head(feats, pre_logits=True)[0])
            assert float(w.sum()) == pytest.approx(1.0) and w.std() > 1e-3
            assert (w[: pooled_from(model)] == 0).all()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("target", ["class:1", "embedding"])
@pytest.mark.parametrize("method", ["chefer", "gradxattn"])
def test_gradient_weighted_attention_reads_the_pools_own_weights(kind, target, method):
    model, x = pool_model(kind), image(1)
    attention, gradients, w = naive_gradients(model, x, target)
    naive = naive_chefer if method == "chefer" else naive_gradxattn
    want = naive(attention, gradients, w, int(model.num_prefix_tokens))
    e = explain(model, x, method=method, target=target)
    assert e.map.dtype == np.float32 and e.informative
    np.testing.assert_allclose(e.map, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_with_a_cls_token_the_pool_is_the_row_and_the_cls_row_would_follow_nothing():
    """The head never reads the CLS token (timm pools the patches): the last layer's CLS row has no gradient, so the
    CLS row's gradient × attention is zero; the pool's row is not."""
    model, x = pool_model("siglip_like"), image(2)
    attention, gradients, w = naive_gradients(model, x, "class:1")
    assert w[0] == 0.0 and gradients[-1][:, 0].abs().max() == 0.0
    assert gradients[-1][:, 1:].abs().max() > 1e-3
    g = attention_gradients(model, x, target="class:1")
    torch.testing.assert_close(g.readout, w)  # the pass's own weights: the hand pool's, from its final features


def test_a_patch_target_reads_its_own_token_not_the_pool():
    model, x = pool_model("siglip"), image(3)
    feats, kept = hand_blocks(model, timm_tokens(model, x))
    f = feats[0, 5]  # patch 5's own final feature: the patch target, s = ⟨g_5(x), g_5(x̃)⟩
    grads = [g.detach() for g in torch.autograd.grad(f @ f.detach(), kept)]
    one_hot = torch.zeros(feats.shape[1], dtype=torch.float64)
    one_hot[5] = 1.0
    want = naive_chefer([a.detach() for a in kept], grads, one_hot, 0)
    np.testing.assert_allclose(explain(model, x, method="chefer", target="patch:5").map, want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())


def test_the_perception_encoders_pool_weighs_every_token():
    """Eva's (PE's) pool reads the CLS token with the patches (no pool_include_prefix): its weights cover all T."""
    torch.manual_seed(0)
    model = timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, num_classes=3).double().eval()
    with torch.no_grad():
        model.attn_pool.latent.normal_()
        feats = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        pool, C = model.attn_pool, 32
        H = pool.num_heads
        q = F.linear(pool.latent[0], pool.q.weight, pool.q.bias).reshape(-1, H, C // H)
        k = F.linear(feats[0], pool.kv.weight[:C], pool.kv.bias[:C]).reshape(17, H, C // H)
        want = (torch.einsum("qhd,nhd->hqn", q, k) / math.sqrt(C // H)).softmax(-1).mean(dim=(0, 1))
        torch.testing.assert_close(pool_readout(model, feats), want)
    assert want[0] > 0 and np.isfinite(explain(model, image(), method="chefer", target="class:0").map).all()


def test_a_method_title_names_the_cls_token_only_beside_the_readout_and_a_cls_less_explanation_says_none():
    assert not [m.title for m in METHODS if "CLS" in m.title and "without one, of the head's readout" not in m.title]
    model, x = pool_model("siglip"), image()
    for method in ("rollout", "raw", "chefer", "gradxattn"):
        assert "CLS" not in explain(model, x, method=method, target="embedding").target_description


# greedy deletion: the presence m_j = exp(b_j) reaches the pool's softmax as it reaches every block's


def hand_score(model, seq, bias, target: str, ref):
    """The curves' score on a sequence at key bias ``bias`` (T',): the class probability or cos(f, f(x))."""
    feats, _ = hand_blocks(model, seq, bias)
    emb, logits, _w = hand_pool(model, feats, bias)
    if target == "embedding":
        return F.cosine_similarity(emb, ref, dim=0)
    return logits.softmax(-1)[int(target.partition(":")[2])]


def hand_sequence(model, tokens, kept):
    p = int(model.num_prefix_tokens)
    return tokens[:, [*range(p), *(p + j for j in kept)]]


def hand_gradient(model, tokens, kept, target, ref):
    seq = hand_sequence(model, tokens, kept)
    b = torch.full((len(kept),), math.log(PRESENCE), dtype=torch.float64, requires_grad=True)
    bias = torch.cat([torch.zeros(seq.shape[1] - len(kept), dtype=torch.float64), b])
    (g,) = torch.autograd.grad(hand_score(model, seq, bias, target, ref), b)
    return g


def reference_embedding(model, tokens):
    with torch.no_grad():
        return hand_pool(model, hand_blocks(model, tokens)[0])[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_key_bias_of_minus_infinity_removes_the_token_from_the_pool_too(kind):
    model, x = pool_model(kind), image(4)
    tokens = embed_tokens(model, x)
    p, n = int(model.num_prefix_tokens), 16
    kept = [0, 3, 4, 9, 10, 14]
    bias = torch.zeros(1, p + n, dtype=torch.float64)
    bias[0, [p + j for j in range(n) if j not in kept]] = -math.inf
    with torch.no_grad():
        t = walk(model, tokens, probs=KeptProbs(), interventions=Interventions(key_bias=bias))
        ours = _weighted_outputs(model, t, bias)
        removed = run_kept(model, tokens, torch.tensor([kept]))  # timm's own blocks and pool on the short sequence
        hand = hand_pool(model, hand_blocks(model, hand_sequence(model, tokens, kept))[0])
    torch.testing.assert_close(ours.embedding[0], removed.embedding[0])
    torch.testing.assert_close(ours.logits[0], hand[1])
    torch.testing.assert_close(removed.logits[0], hand[1])


@pytest.mark.parametrize("kind", ["siglip", "siglip_like"])
@pytest.mark.parametrize("target", ["class:2", "embedding"])
def test_presence_gradient_through_the_pool_equals_the_hand_forwards(kind, target):
    model, x = pool_model(kind), image(5)
    tokens = embed_tokens(model, x)
    ref = reference_embedding(model, tokens)
    kept = [1, 2, 5, 6, 7, 8, 11, 12, 15]
    from vitviz.targets import Target

    got = _presence_gradient(model, tokens, torch.tensor(kept), target=Target.parse(target),
                             ref=None if target != "embedding" else ref, protect=None)
    want = hand_gradient(model, tokens, kept, target, ref)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    assert want.abs().max() > 1e-4


def naive_deletion(model, x, target: str, steps: int):
    """The greedy loop of vitviz.explain.deletion's docstring over Python lists, on the hand forward."""
    tokens = embed_tokens(model, x)
    ref = reference_embedding(model, tokens)
    kept = list(range(16))
    counts = [math.floor(i * 16 / steps + 0.5) for i in range(steps)] + [16]
    order, scores = [], []
    for i in range(steps):
        seq = hand_sequence(model, tokens, kept)
        with torch.no_grad():
            scores.append(float(hand_score(model, seq, torch.zeros(seq.shape[1], dtype=torch.float64), target, ref)))
        g = hand_gradient(model, tokens, kept, target, ref).tolist()
        ranked = sorted(range(len(kept)), key=lambda j: -g[j])
        n = counts[i + 1] - counts[i]
        order += [kept[j] for j in ranked[:n]]
        kept = [kept[j] for j in ranked[n:]]
    return order, scores


@pytest.mark.parametrize(("kind", "target"), [("siglip", "class:0"), ("siglip_like", "class:0"),
                                             ("siglip_like", "embedding"), ("siglip_prefix", "embedding")])
def test_deletion_on_an_attention_pool_equals_the_naive_greedy_loop(kind, target):
    model, x = pool_model(kind), image(6)
    d = deletion_order(model, x, target=target, steps=4)
    order, scores = naive_deletion(model, x, target, 4)
    assert d.order.tolist() == order
    np.testing.assert_allclose(d.scores, scores, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = 1.0 if target == "embedding" else float(model(x)[0].softmax(-1)[0])
    assert d.scores[0] == pytest.approx(want)


@pytest.mark.parametrize("pool", ["map", "avg"])
def test_without_a_prefix_token_the_embedding_has_no_first_gradient_and_is_refused(pool):
    """All patches half present is the full image when no token stays at presence 1: the cosine sits at its
    maximum, its gradient is zero (by hand, here), so deletion refuses the embedding target and says why."""
    model, x = pool_model("siglip"), image(7)
    tokens = embed_tokens(model, x)
    g = hand_gradient(model, tokens, list(range(16)), "embedding", reference_embedding(model, tokens))
    assert g.abs().max() < 1e-9
    assert hand_gradient(model, tokens, list(range(16)), "class:0", None).abs().max() > 1e-4  # a class is ranked
    if pool == "avg":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                  depth=2, num_heads=2, class_token=False, global_pool="avg").double().eval()
    with pytest.raises(ModelError, match="no gradient; choose a class, prompt or patch target"):
        explain(model, x, method="deletion:steps=2", target="embedding")


def test_pools_deletion_cannot_read_are_refused():
    model = pool_model("siglip")
    prr = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, class_token=False, global_pool="prr", num_classes=3).eval()
    for method, says in (("chefer", "without a latent query reads no token row"), ("gradxattn", "no token row"),
                         ("deletion:steps=2", "cannot remove tokens from this AttentionPoolPrr")):
        with pytest.raises(ModelError, match="choose another method") as err:
            explain(prr, torch.randn(1, 3, 32, 32), method=method, target="class:0")
        assert says in str(err.value)
    e = explain(model, image(), method="deletion:steps=2", target="class:0")  # a latent-query pool: it runs
    assert e.map.shape == (4, 4) and np.isfinite(e.map).all() and e.passes.startswith("2 steps")
