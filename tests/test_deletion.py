"""Greedy token deletion against references written here: attention with a key bias head by head, a greedy loop
over Python lists, finite differences, hand-computed map values, and the faithfulness curves' own token removal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

from vitviz.errors import ModelError, ParameterError
from vitviz.explain import Method, Target, embed_tokens, explain, explain_all
from vitviz.explain.deletion import PRESENCE, _presence_gradient, deletion, deletion_order, deletion_values
from vitviz.metrics.faithfulness import curves

from .helpers import LAYOUTS, hook_state, in_threads, layout_image, layout_model

TARGETS = ["embedding", "class", "patch:3"]


def hand_walk(model, seq, bias):
    """timm's blocks with the attention written out head by head: softmax(q_h·k_hᵀ/√d + b)·v_h, where the bias b (T,)
    is added to every query's logit of each key; pre-norm t + ls(f(norm(t))) or post-norm (ResPostBlock)
    t + norm(f(t)). ``seq`` (1, T, C) -> final normed tokens (1, T, C)."""
    t = seq
    for blk in model.blocks:
        a = blk.attn
        post = isinstance(blk, ResPostBlock)
        h = t if post else blk.norm1(t)
        T, H, d = h.shape[1], a.num_heads, a.head_dim
        qkv = (h[0] @ a.qkv.weight.T + a.qkv.bias).reshape(T, 3, H, d)
        heads = []
        for j in range(H):
            q, k, v = a.q_norm(qkv[:, 0, j]), a.k_norm(qkv[:, 1, j]), qkv[:, 2, j]
            heads.append(torch.softmax(q @ k.T / math.sqrt(d) + bias, dim=-1) @ v)
        out = torch.cat(heads, dim=-1) @ a.proj.weight.T + a.proj.bias
        if post:
            t = t + blk.norm1(out[None])
            t = t + blk.norm2(blk.mlp(t))
        else:
            t = t + blk.ls1(out[None])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.norm(t)


def hand_embedding(model, feats, bias):
    """The head's input: the CLS token (timm's token pooling), or for an average pool the patches' mean weighted by
    their presence exp(b) (a removed patch, b = -inf, drops out of the mean as it does from the sequence)."""
    if model.global_pool != "avg":
        return model.forward_head(feats, pre_logits=True)[0]
    p = model.num_prefix_tokens
    w = bias[p:].exp()
    return model.fc_norm((feats[0, p:] * w[:, None]).sum(0) / w.sum())


def hand_score(model, feats, target: Target, ref, position, bias):
    """What the curves measure: the class probability, or the cosine of the embedding / the patch's feature."""
    if target.kind == "class":
        logits = model.head(hand_embedding(model, feats, bias)) if model.global_pool == "avg" else (
            model.forward_head(feats)[0])  # a distilled DeiT averages two heads
        return torch.softmax(logits, dim=-1)[target.index]
    f = hand_embedding(model, feats, bias) if target.kind == "embedding" else feats[0, position]
    return F.cosine_similarity(f, ref, dim=0)


class Hand:
    """One image's tokens, its resolved target and the full image's reference, all by hand."""

    def __init__(self, model, x, target):
        self.model, self.p = model, int(model.num_prefix_tokens)
        with torch.no_grad():
            self.tokens = embed_tokens(model, x)  # checked against sequences built by hand in test_faithfulness
            zero = torch.zeros(self.tokens.shape[1], dtype=self.tokens.dtype)
            feats = hand_walk(model, self.tokens, zero)
            embedding = hand_embedding(model, feats, zero)
        t = Target.parse(target)
        if t.kind == "class" and t.index is None:
            t = Target("class", int(model(x)[0].argmax()))
        self.target = t
        self.protect = t.index if t.kind == "patch" else None
        self.ref = None if t.kind == "class" else embedding if t.kind == "embedding" else feats[0, self.p + t.index]

    def seq(self, kept):
        extra = [self.p + self.protect] if self.protect is not None else []
        return self.tokens[:, list(range(self.p)) + extra + [self.p + j for j in kept]]

    def score(self, kept, kept_bias=0.0):
        """y with the kept patches (list) at the bias ``kept_bias`` (a float or a (K,) tensor)."""
        seq = self.seq(kept)
        fixed = torch.zeros(seq.shape[1] - len(kept), dtype=seq.dtype)
        bias = torch.cat([fixed, torch.as_tensor(kept_bias, dtype=seq.dtype).expand(len(kept))])
        return hand_score(self.model, hand_walk(self.model, seq, bias), self.target, self.ref, self.p, bias)

    def gradient(self, kept):
        b = torch.full((len(kept),), math.log(PRESENCE), dtype=self.tokens.dtype, requires_grad=True)
        (g,) = torch.autograd.grad(self.score(kept, b), b)
        return g


def naive_deletion(model, x, target, steps):
    """The greedy loop of vitviz.deletion's docstring over Python lists: (order, sizes, scores)."""
    hand = Hand(model, x, target)
    gh, gw = model.patch_embed.grid_size
    kept = [j for j in range(gh * gw) if j != hand.protect]
    k = len(kept)
    counts = [math.floor(i * k / steps + 0.5) for i in range(steps)] + [k]
    order, scores = [], []
    for i in range(steps):
        with torch.no_grad():
            scores.append(float(hand.score(kept)))
        g = hand.gradient(kept).tolist()
        ranked = sorted(range(len(kept)), key=lambda j: -g[j])  # stable: ties keep their place
        n = counts[i + 1] - counts[i]
        order += [kept[j] for j in ranked[:n]]
        kept = [kept[j] for j in ranked[n:]]
    return order, np.diff(counts), scores


@pytest.mark.parametrize("layout", ["registers", "post_norm", "avg_pool"])
def test_a_key_bias_of_minus_infinity_is_token_removal(layout):
    """The premise: b_j = -inf for a patch gives the model on the sequence without it (the curves' removal), in the
    walk written here and in vitviz's own (vitviz.walk.blocks.walk and the presence-weighted head)."""
    from vitviz.explain.deletion import _weighted_outputs
    from vitviz.metrics.faithfulness import run_kept
    from vitviz.walk.blocks import Interventions, KeptProbs, walk

    model = layout_model(layout, num_classes=5, dtype=torch.float64)
    x = layout_image(model)
    hand = Hand(model, x, "embedding")
    n, p = model.patch_embed.num_patches, model.num_prefix_tokens
    kept = [1, 4, 5, 9, 12, 15]
    bias = torch.full((n,), -math.inf, dtype=torch.float64)
    bias[kept] = 0.0
    with torch.no_grad():
        masked = hand.score(list(range(n)), bias)
        removed = hand.score(kept)
        t = hand.tokens
        full_bias = torch.cat([torch.zeros(1, p, dtype=torch.float64), bias[None]], dim=1)
        t = walk(model, t, probs=KeptProbs(), interventions=Interventions(key_bias=full_bias))
        ours = _weighted_outputs(model, t, full_bias).embedding[0]
        timm_removed = run_kept(model, hand.tokens, torch.tensor([kept])).embedding[0]
        whole = hand_walk(model, hand.tokens, torch.zeros(hand.tokens.shape[1], dtype=torch.float64))
    assert float(masked) == pytest.approx(float(removed), abs=1e-12)
    torch.testing.assert_close(ours, timm_removed)
    short = torch.zeros(p + len(kept), dtype=torch.float64)  # the sequence without the removed patches
    seq = hand.tokens[:, [*range(p), *(p + j for j in kept)]]
    torch.testing.assert_close(hand_embedding(model, hand_walk(model, seq, short), short), timm_removed)
    torch.testing.assert_close(whole, model.forward_features(x))  # the hand walk is timm's forward


@pytest.mark.parametrize("target", TARGETS)
def test_presence_gradient_equals_finite_differences(target):
    model = layout_model("distilled", num_classes=5, dtype=torch.float64)
    x = layout_image(model, seed=1)
    hand = Hand(model, x, target)
    kept = [j for j in [0, 2, 3, 5, 6, 7, 8, 11, 13, 14] if j != hand.protect]
    got = _presence_gradient(model, hand.tokens, torch.tensor(kept), target=hand.target, ref=hand.ref,
                             protect=hand.protect)
    eps = 1e-5
    with torch.no_grad():
        for j in range(len(kept)):
            up = torch.full((len(kept),), math.log(PRESENCE), dtype=torch.float64)
            down = up.clone()
            up[j] += eps
            down[j] -= eps
            fd = (hand.score(kept, up) - hand.score(kept, down)) / (2 * eps)
            assert float(got[j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-7), j
    assert got.abs().max() > 1e-4  # the check is not vacuous


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("target", TARGETS)
def test_deletion_equals_the_naive_greedy_loop(layout, target):
    model = layout_model(layout, num_classes=5, dtype=torch.float64)
    x = layout_image(model, seed=2)
    d = deletion_order(model, x, target=target, steps=5)
    order, sizes, scores = naive_deletion(model, x, target, steps=5)
    assert d.order.tolist() == order
    np.testing.assert_array_equal(d.sizes, sizes)
    np.testing.assert_allclose(d.scores, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.map.reshape(-1), deletion_values(np.array(order), sizes, np.array(scores),
                                                                  num_patches=d.map.size), atol=1e-5)
    assert d.map.shape == tuple(model.patch_embed.grid_size) and d.map.dtype == np.float32
    with torch.no_grad():  # y_0 is the full image's score: 1 for a cosine, timm's own softmax for the class
        want = torch.softmax(model(x)[0], -1)[d.target.index] if d.target.kind == "class" else 1.0
    assert d.scores[0] == pytest.approx(float(want), abs=1e-6)


def test_map_values_by_hand():
    # two steps of two: y = 1.0 then 0.6; the second step's patches come after the fall -> 0
    v = deletion_values(np.array([2, 0, 1, 3]), np.array([2, 2]), np.array([1.0, 0.6]), num_patches=4)
    np.testing.assert_allclose(v, [0.2, 0.0, 0.4, 0.0], atol=1e-7)
    # a score that rises again (0.5 -> 0.7) is read through its running minimum: the patch removed there gets 0.3
    v = deletion_values(np.array([3, 2, 1, 0]), np.array([1, 1, 1, 1]), np.array([1.0, 0.5, 0.7, 0.2]),
                        num_patches=4)
    np.testing.assert_allclose(v, [0.0, 0.3, 0.3, 0.8], atol=1e-7)
    # one step of three patches: linear within the step, from the whole fall down
    v = deletion_values(np.array([1, 2, 0]), np.array([3]), np.array([0.9]), num_patches=3)
    np.testing.assert_allclose(v, [0.0, 0.0, 0.0], atol=1e-7)
    with pytest.raises(ParameterError, match="add up"):
        deletion_values(np.array([0, 1]), np.array([1, 2]), np.array([1.0, 0.5]), num_patches=2)


@pytest.mark.parametrize("target", TARGETS)
def test_its_scores_are_the_curves_morf_at_the_same_steps(target):
    """With the curves' 10 steps, the deletion's own scores y_i are the MoRF curve of its removal order (the curves
    build their sequences with run_kept, sorted; deletion keeps the protected patch first and ranks the rest)."""
    model = layout_model("non_square", num_classes=5)
    x = layout_image(model, seed=3)
    d = deletion_order(model, x, target=target, steps=10)
    rank = np.empty(d.map.size, dtype=np.float32)
    rank[d.order] = -np.arange(d.order.size)  # strictly falling along the removal: no ties
    if d.target.kind == "patch":
        rank[d.target.index] = 0.0
    c = curves(model, x, [rank.reshape(d.map.shape)], target=d.target)[0]
    np.testing.assert_allclose(c.morf, d.scores, atol=2e-5)


def test_patch_target_never_removes_its_patch_and_every_other_patch_goes_once():
    model = layout_model("cls", num_classes=5, dtype=torch.float64)
    x = layout_image(model)
    d = deletion_order(model, x, target="patch:6", steps=4)
    n = model.patch_embed.num_patches
    assert sorted(d.order.tolist()) == [j for j in range(n) if j != 6]
    assert d.map.reshape(-1)[6] == 0.0 and (d.map >= 0).all()
    vals = d.map.reshape(-1)[d.order]
    assert (np.diff(vals) <= 1e-7).all()  # never rising along the removal order


def test_progress_and_more_steps_than_patches():
    model = layout_model("cls", num_classes=5)
    x = layout_image(model)
    seen = []
    d = deletion_order(model, x, target="embedding", steps=40, progress=lambda i, s: seen.append((i, s)))
    n = model.patch_embed.num_patches  # 16: one patch a step
    assert seen == [(i, n) for i in range(1, n + 1)] and d.sizes.tolist() == [1] * n
    assert explain(model, x, method="deletion:steps=40").passes.startswith(f"{n} steps")  # the steps it really ran


def test_explain_runs_it_as_a_method_and_leaves_the_model_alone():
    model = layout_model("registers", num_classes=5)
    x = layout_image(model)
    before = hook_state(model)
    e, r = explain_all(model, x, methods=["deletion:steps=6", "rollout"], target="class")
    assert e.method == Method("deletion", steps=6) and e.method.label == "deletion:steps=6"
    assert e.uses_target and not r.uses_target and e.passes.startswith("6 steps, each a forward")
    assert e.target.kind == "class" and len(e.predictions) == 5
    np.testing.assert_array_equal(e.map, deletion(model, x, target="class", steps=6))
    with torch.inference_mode():  # a caller's inference mode: the walk still gets its gradients
        np.testing.assert_allclose(explain(model, x, method="deletion:steps=6", target="class").map, e.map)
    assert hook_state(model) == before and all(p.grad is None for p in model.parameters())
    assert Method.parse("deletion") == Method("deletion", steps=32)


def test_bad_settings_and_models_are_refused():
    model = layout_model("cls", num_classes=5)
    x = layout_image(model)
    for bad in ("deletion:steps=1", "deletion:steps=x", "deletion:discard=0.5", "rollout:steps=4"):
        with pytest.raises(ParameterError):
            Method.parse(bad)
    for steps in (1, 2.5, True):
        with pytest.raises(ParameterError, match="at least 2"):
            deletion_order(model, x, steps=steps)
    with pytest.raises(ParameterError, match="whole number"):
        Method("deletion", steps=2.5)
    assert deletion_order(model, x, steps=np.int64(3)).sizes.size == 3
    maxpool = layout_model("avg_pool", num_classes=5)
    maxpool.global_pool = "max"  # a pool over the patches' own streams that presence weights cannot express
    with pytest.raises(ModelError, match="'max' pooling"):
        deletion(maxpool, layout_image(maxpool))
    backbone = layout_model("cls")
    with pytest.raises(ModelError, match="no classifier head"):
        deletion(backbone, layout_image(backbone), target="class")
    assert explain(backbone, layout_image(backbone), method="deletion:steps=4").predictions == ()
    with pytest.raises(ParameterError):
        deletion(model, torch.randn(1, 3, 16, 16))


def test_half_precision_and_threads_on_one_shared_model():
    model = layout_model("registers", num_classes=5)
    images = [layout_image(model, seed=s) for s in range(3)]
    want = [deletion(model, x, target="embedding", steps=5) for x in images]
    # as on a GPU: the walk in bf16, its softmax in fp32
    bf = layout_model("registers", num_classes=5, dtype=torch.bfloat16)
    d_bf = deletion_order(bf, layout_image(bf), steps=4)
    vals = d_bf.map.reshape(-1)[d_bf.order]
    assert np.isfinite(d_bf.map).all() and (d_bf.map >= 0).all() and (np.diff(vals) <= 1e-6).all()

    def work(worker, rep):
        i = (worker + rep) % len(images)
        return i, deletion(model, images[i], target="embedding", steps=5)

    got = in_threads(work, workers=3, rounds=2)
    assert len(got) == 6
    for i, heat in got.values():
        np.testing.assert_allclose(heat, want[i], rtol=1e-5, atol=1e-6)
