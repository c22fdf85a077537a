"""Sensitivity-n against a loop written here: one set at a time through timm's own blocks, numpy's correlation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitviz.metrics.sensitivity import random_sets, sensitivity_n
from vitviz.targets import embed_tokens, head_outputs

from .helpers import layout_image, layout_model


def _naive(model, x, heat, *, counts, samples, seed, protect=None):
    p = model.num_prefix_tokens
    with torch.no_grad():
        t = embed_tokens(model, x)
        full = head_outputs(model, model.blocks(t))
        ref = full.embedding[0] if protect is None else full.tokens[0, p + protect]

        def y(seq, position):
            out = head_outputs(model, model.blocks(seq))
            f = out.embedding[0] if protect is None else out.tokens[0, position]
            return float(F.cosine_similarity(f, ref, dim=0))

        y0 = y(t, p + (protect or 0))
        rs = []
        for c, n in enumerate(counts):
            sums, drops = [], []
            for s in random_sets(16, int(n), samples, seed=seed + c, protect=protect):
                kept = [j for j in range(16) if j not in set(s.tolist())]
                seq = torch.cat([t[:, :p], t[:, p:][:, kept]], dim=1)
                position = p + kept.index(protect) if protect is not None else None
                drops.append(y0 - y(seq, position))
                sums.append(heat.reshape(-1)[s].sum())
            rs.append(np.corrcoef(sums, drops)[0, 1])
    return np.array(rs)


@pytest.mark.parametrize(("layout", "target", "protect"), [("cls", "embedding", None), ("registers", "patch:5", 5)])
def test_sensitivity_n_equals_a_loop_over_the_sets(layout, target, protect):
    model = layout_model(layout)
    x = layout_image(model)
    heat = np.random.default_rng(1).random((4, 4))
    (got,) = sensitivity_n(model, x, [heat], target=target, samples=12, seed=4)
    want = _naive(model, x, heat, counts=got.counts, samples=12, seed=4, protect=protect)
    np.testing.assert_allclose(got.r, want, rtol=1e-5, atol=1e-6)
    assert got.score == pytest.approx(float(np.mean(want)), abs=1e-6)
    if protect is not None:
        assert all(protect not in random_sets(16, 8, 5, seed=s, protect=protect) for s in range(5))


def test_a_map_of_the_exact_single_patch_effects_correlates_and_a_constant_one_is_undefined():
    model = layout_model("cls")
    x = layout_image(model)
    with torch.no_grad():
        t = embed_tokens(model, x)
        full = head_outputs(model, model.blocks(t)).embedding[0]
        effect = np.array([1 - float(F.cosine_similarity(head_outputs(model, model.blocks(
            torch.cat([t[:, :1], t[:, 1:][:, [k for k in range(16) if k != j]]], 1))).embedding[0], full, dim=0))
            for j in range(16)])
    good, flat = sensitivity_n(model, x, [effect.reshape(4, 4), np.ones((4, 4))], target="embedding", samples=24)
    assert good.r[0] > 0.5  # small sets: removal effects nearly add up
    assert np.isnan(flat.r).all() and np.isnan(flat.score)
