"""Head ablation against a forward written out here by hand from each block's qkv and proj weights (a head's output
removed, or replaced by its mean over the tokens), against timm's own forward (nothing ablated), and the batched
table against one pass per head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitviz.errors import ParameterError
from vitviz.experiments.ablation import _walk, ablate, check_heads, head_table, layer_heads, reference
from vitviz.walk.blocks import embed
from vitviz.walk.capture import capture_attention

from .helpers import hook_state, tiny_vit

L, H = 3, 4


def _model(num_classes=6):
    return tiny_vit(img_size=32, patch_size=8, depth=L, num_classes=num_classes).double()


def _image(seed=0):
    return torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _hand(model, x, *, off=(), mode="zero"):
    """timm's pre-norm blocks by hand: per head softmax(q_h·k_hᵀ/√d)·v_h from the qkv weights; a head in ``off``
    outputs 0 (zero) or its mean over the tokens at every token (mean); then the proj weights, the MLP, the head.
    Returns (embedding (D,), logits (C,))."""
    t = embed(model, x)[0]
    for layer, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(t)
        T, d = h.shape[0], a.head_dim
        qkv = (h @ a.qkv.weight.T + a.qkv.bias).reshape(T, 3, H, d)
        heads = []
        for j in range(H):
            q, k, v = qkv[:, 0, j], qkv[:, 1, j], qkv[:, 2, j]
            out = torch.softmax(q @ k.T / math.sqrt(d), dim=-1) @ v  # (T, d)
            if (layer, j) in off:
                out = torch.zeros_like(out) if mode == "zero" else out.mean(0, keepdim=True).expand(T, d)
            heads.append(out)
        t = t + blk.ls1(torch.cat(heads, -1) @ a.proj.weight.T + a.proj.bias)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    feats = model.norm(t)[None]
    return model.forward_head(feats, pre_logits=True)[0], model.forward_head(feats)[0]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_nothing_is_the_plain_forward(mode):
    model, x = _model(), _image()
    with torch.no_grad():
        t = embed(model, x)
        plain = model.forward_features(x)
        torch.testing.assert_close(model.norm(_walk(model, t, [()], mode)), plain, rtol=1e-12, atol=1e-12)
        ref = reference(model, x)
        torch.testing.assert_close(ref.logits, model(x)[0])
    assert ref.target == int(model(x)[0].argmax())


@pytest.mark.parametrize(("mode", "off"), [("zero", ((1, 2),)), ("mean", ((1, 2),)), ("zero", ((0, 0), (2, 3))),
                                           ("mean", ((1, 0), (1, 1), (1, 2), (1, 3)))])
def test_ablating_heads_is_the_hand_built_forward_without_them(mode, off):
    model, x = _model(), _image(1)
    before = hook_state(model)
    got = ablate(model, x, off, mode=mode, target=4)
    with torch.no_grad():
        emb0, _ = _hand(model, x)
        emb, logits = _hand(model, x, off=off, mode=mode)
        intact = model(x)[0]
    assert got.heads == tuple(sorted(off))
    assert got.logit == pytest.approx(float(logits[4]), rel=1e-9)
    assert got.probability == pytest.approx(float(logits.softmax(-1)[4]), rel=1e-9)
    assert got.effect == pytest.approx(float(intact.softmax(-1)[4] - logits.softmax(-1)[4]), abs=1e-9)
    assert got.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(emb, emb0, dim=0)), abs=1e-12)
    assert abs(got.effect) > 1e-6 and got.cosine < 1 - 1e-8, "removing heads must change the answer"
    assert hook_state(model) == before


def test_the_attention_under_an_ablation_is_the_intact_one_up_to_the_ablated_layer():
    model, x = _model(0), _image(2)
    got = ablate(model, x, [(1, 2)], attention=True)
    with torch.no_grad():
        intact = capture_attention(model, x, store_dtype=torch.float64).numpy()
    np.testing.assert_allclose(got.attention[:2], intact[:2], rtol=1e-10, atol=1e-12)  # computed before it acts
    assert np.abs(got.attention[2] - intact[2]).max() > 1e-6
    np.testing.assert_allclose(got.attention.sum(-1), 1.0, rtol=1e-10)
    assert got.probability is None and got.effect == pytest.approx(1 - got.cosine)


@pytest.mark.parametrize(("mode", "num_classes"), [("zero", 6), ("mean", 0)])
def test_the_batched_table_is_one_pass_per_head(mode, num_classes):
    model, x = _model(num_classes), _image(3)
    table = head_table(model, x, mode=mode, batch_size=5)  # 12 heads in chunks of 5, 5, 2
    assert table.effect.shape == (L, H)
    for layer in range(L):
        for head in range(H):
            one = ablate(model, x, [(layer, head)], mode=mode, ref=table.reference)
            assert table.cosine[layer, head] == pytest.approx(one.cosine, abs=1e-12)
            assert table.effect[layer, head] == pytest.approx(one.effect, abs=1e-12)
            if num_classes:
                assert table.probability[layer, head] == pytest.approx(one.probability, rel=1e-10)
                assert table.logit[layer, head] == pytest.approx(one.logit, rel=1e-10)
    ranked = table.ranked()
    assert len(ranked) == L * H and [e for *_, e in ranked] == sorted(table.effect.ravel().tolist(), reverse=True)
    assert table.measure == ("probability" if num_classes else "cosine")


def test_bad_inputs_are_refused_with_a_sentence():
    model, x = _model(), _image()
    with pytest.raises(ParameterError, match="layer 3 does not exist"):
        ablate(model, x, [(3, 0)])
    with pytest.raises(ParameterError, match="head 4 does not exist"):
        ablate(model, x, [(0, 4)])
    with pytest.raises(ParameterError, match="head -1 does not exist"):
        check_heads(model, [(0, -1)])
    with pytest.raises(ParameterError, match="at least one head"):
        ablate(model, x, [])
    with pytest.raises(ParameterError, match="unknown ablation"):
        head_table(model, x, mode="noise")
    with pytest.raises(ParameterError, match="layer 5 does not exist"):
        layer_heads(model, 5)
    with pytest.raises(ParameterError, match="no classifier head"):
        reference(_model(0), x, target=1)
    with pytest.raises(ParameterError, match="class 9 does not exist"):
        reference(model, x, target=9)
    assert layer_heads(model, 2) == ((2, 0), (2, 1), (2, 2), (2, 3))


def test_the_layer_head_figure_draws_the_table_with_layer_0_on_top():
    from vitviz.figures import layer_head_figure

    values = np.arange(12, dtype=float).reshape(3, 4) - 5
    fig = layer_head_figure(values, colorbar_title="effect", marked=[(2, 1)])
    heat = fig.data[0]
    np.testing.assert_array_equal(np.asarray(heat.z), values)
    assert heat.zmid == 0 and fig.layout.yaxis.autorange == "reversed"
    (box,) = fig.layout.shapes
    assert (box.x0, box.x1, box.y0, box.y1) == (0.5, 1.5, 1.5, 2.5)
    with pytest.raises(ParameterError, match="layers, heads"):
        layer_head_figure(np.zeros(3))
