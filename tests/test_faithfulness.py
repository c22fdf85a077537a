"""Deletion / insertion-side curves against sequences and images built by hand, and AUCs computed by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitviz.metrics.faithfulness as faith
from vitviz.errors import ParameterError
from vitviz.explain import Target, embed_tokens
from vitviz.metrics.faithfulness import auc, curves, faithfulness, removal_orders, removed_counts, run_kept

from .helpers import LAYOUTS, hook_state, layout_image, layout_model


def eager(model):
    """A private copy running timm's unfused attention."""
    ref = copy.deepcopy(model)
    for blk in ref.blocks:
        blk.attn.fused_attn = False
    return ref


def hand_tokens(ref, x, kept):
    """Final normed tokens of the model on [prefix tokens, kept patches] built by hand, through timm's eager blocks.

    Patches by unfold + matmul with the patch-embedding weights; position embeddings added by hand (prefix rows
    only when the model embeds them); prefix tokens in timm's order (CLS, registers or distillation token).
    """
    proj = ref.patch_embed.proj
    p = proj.kernel_size[0]
    cols = F.unfold(x, kernel_size=p, stride=p)  # (1, 3·p·p, N), patches in row-major order
    patches = cols.transpose(1, 2) @ proj.weight.reshape(proj.out_channels, -1).T + proj.bias  # (1, N, C)
    prefix = [ref.cls_token]
    for name in ("reg_token", "dist_token"):
        if getattr(ref, name, None) is not None:
            prefix.append(getattr(ref, name))
    prefix = torch.cat(prefix, dim=1)  # (1, P, C)
    pos = ref.pos_embed[0]
    if ref.no_embed_class:
        patches = patches + pos
    else:
        prefix, patches = prefix + pos[: prefix.shape[1]], patches + pos[prefix.shape[1]:]
    seq = torch.cat([prefix, patches[:, list(kept)]], dim=1)
    with torch.no_grad():
        for blk in ref.blocks:
            seq = blk(seq)
        return ref.norm(seq)


def hand_embedding(ref, x, kept):
    feats = hand_tokens(ref, x, kept)
    with torch.no_grad():
        return ref.forward_head(feats, pre_logits=True)[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_token_removal_equals_the_model_on_a_hand_built_sequence(layout):
    model = layout_model(layout)
    x = layout_image(model)
    n = model.patch_embed.num_patches
    kept = sorted(np.random.default_rng(1).choice(n, size=n // 2, replace=False).tolist())
    with torch.inference_mode():
        tokens = embed_tokens(model, x)
        part = run_kept(model, tokens, torch.tensor([kept, kept[::-1]]))  # the order in the sequence is free
        whole = run_kept(model, tokens, torch.arange(n)[None])
    ref = eager(model)
    want = hand_tokens(ref, x, kept)
    torch.testing.assert_close(part.tokens[0], want[0], atol=2e-5, rtol=1e-4)
    p = model.num_prefix_tokens
    torch.testing.assert_close(part.tokens[1, p:], want[0, p:].flip(0), atol=2e-5, rtol=1e-4)
    full = hand_tokens(ref, x, range(n))
    torch.testing.assert_close(whole.tokens[0], full[0], atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(whole.tokens, model.forward_features(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_curves_score_the_hand_built_sequences_in_the_maps_order(layout):
    """A map rising with the patch index: MoRF keeps patches 0..N-k-1, LeRF keeps k..N-1; cosine to the full image."""
    model = layout_model(layout)
    x = layout_image(model)
    gh, gw = model.patch_embed.grid_size
    n = gh * gw
    heat = np.arange(n, dtype=np.float32).reshape(gh, gw)
    c = faithfulness(model, x, heat, target="embedding")
    ref = eager(model)
    full = hand_embedding(ref, x, range(n))
    ks = removed_counts(n, 10)
    np.testing.assert_array_equal(c.removed, ks)
    for i, k in enumerate(ks):
        morf = F.cosine_similarity(hand_embedding(ref, x, range(n - k)), full, dim=0)
        lerf = F.cosine_similarity(hand_embedding(ref, x, range(k, n)), full, dim=0)
        assert c.morf[i] == pytest.approx(float(morf), abs=2e-5)
        assert c.lerf[i] == pytest.approx(float(lerf), abs=2e-5)
    assert c.morf[0] == pytest.approx(1.0, abs=1e-5) and c.score_kind == "cosine"
    assert c.score == pytest.approx(c.lerf_auc - c.morf_auc)


def test_class_target_records_probability_and_logit_of_the_top1_class():
    model = layout_model("registers", num_classes=7)
    x = layout_image(model)
    gh, gw = model.patch_embed.grid_size
    n = gh * gw
    heat = np.arange(n, dtype=np.float32)[::-1].reshape(gh, gw).copy()  # MoRF removes from patch 0 upward
    c = faithfulness(model, x, heat, target="class")
    with torch.no_grad():
        top = int(model(x)[0].argmax())
    assert c.target == Target("class", top) and c.score_kind == "probability"
    ref = eager(model)
    for i, k in enumerate(removed_counts(n, 10)):
        feats = hand_tokens(ref, x, range(k, n))
        with torch.no_grad():
            logits = ref.forward_head(feats)[0]
        assert c.morf[i] == pytest.approx(float(logits.softmax(-1)[top]), abs=1e-5)
        assert c.morf_logit[i] == pytest.approx(float(logits[top]), abs=1e-4)


def test_patch_target_keeps_its_patch_and_scores_its_feature():
    model = layout_model()
    x = layout_image(model)
    gh, gw = model.patch_embed.grid_size
    n, p = gh * gw, model.num_prefix_tokens
    probe = n - 1
    heat = np.arange(n, dtype=np.float32).reshape(gh, gw)  # the probe patch is the most relevant: never removed
    c = faithfulness(model, x, heat, target=Target("patch", probe))
    ref = eager(model)
    full = hand_tokens(ref, x, range(n))
    ks = removed_counts(n - 1, 10)
    np.testing.assert_array_equal(c.removed, ks)
    for i, k in enumerate(ks):
        kept = list(range(n - 1 - k)) + [probe]  # MoRF removes n-2, n-3, ... below the probe
        feats = hand_tokens(ref, x, kept)
        want = F.cosine_similarity(feats[0, -1], full[0, p + probe], dim=0)
        assert c.morf[i] == pytest.approx(float(want), abs=2e-5)


def test_pixel_perturbation_fills_removed_patches_with_the_channel_mean():
    model = layout_model("non_square", num_classes=5)
    x = layout_image(model)
    gh, gw = model.patch_embed.grid_size
    ps = model.patch_embed.patch_size[0]
    n = gh * gw
    heat = np.random.default_rng(0).random((gh, gw)).astype(np.float32)
    c = faithfulness(model, x, heat, target="class:3", perturbation="pixels")
    morf_order = np.argsort(-heat.reshape(-1))
    mean = [float(x[0, ch].mean()) for ch in range(3)]
    for i, k in enumerate(removed_counts(n, 10)):
        filled = x.clone()
        for patch in morf_order[:k]:
            r, col = divmod(int(patch), gw)
            for ch in range(3):
                filled[0, ch, r * ps : (r + 1) * ps, col * ps : (col + 1) * ps] = mean[ch]
        with torch.no_grad():
            prob = model(filled)[0].softmax(-1)[3]
        assert c.morf[i] == pytest.approx(float(prob), abs=1e-5)
    assert c.perturbation == "pixels"


def test_removed_counts_orders_and_areas_by_hand():
    np.testing.assert_array_equal(removed_counts(256, 10), [0, 26, 51, 77, 102, 128, 154, 179, 205, 230])
    np.testing.assert_array_equal(removed_counts(16, 10), [0, 2, 3, 5, 6, 8, 10, 11, 13, 14])
    np.testing.assert_array_equal(removed_counts(15, 5), [0, 3, 6, 9, 12])
    morf, lerf = removal_orders(np.array([[0.5, 0.2], [0.5, 0.9]]))
    np.testing.assert_array_equal(morf, [3, 0, 2, 1])  # ties (0.5, 0.5) by index in both orders
    np.testing.assert_array_equal(lerf, [1, 0, 2, 3])
    morf, lerf = removal_orders(np.array([[0.5, 0.2], [0.5, 0.9]]), protect=3)
    np.testing.assert_array_equal(morf, [0, 2, 1])
    assert auc(np.array([0.0, 0.1, 0.2]), np.array([1.0, 0.5, 0.25])) == pytest.approx(0.1 * 1.5 / 2 + 0.1 * 0.75 / 2)
    assert auc(np.arange(10) / 10, 1 - np.arange(10) / 10) == pytest.approx(0.9 - 0.81 / 2)  # ∫₀^0.9 (1 - x) dx
    model = layout_model()
    c = faithfulness(model, layout_image(model), np.random.default_rng(2).random((4, 4)), target="embedding")
    assert c.morf_auc == pytest.approx(sum(0.1 * (c.morf[i] + c.morf[i + 1]) / 2 for i in range(9)))
    assert c.lerf_auc == pytest.approx(sum(0.1 * (c.lerf[i] + c.lerf[i + 1]) / 2 for i in range(9)))
    np.testing.assert_allclose(c.fractions, np.arange(10) / 10)


def test_a_constant_map_scores_zero_and_random_maps_about_zero():
    model = layout_model("registers")
    x = layout_image(model)
    flat = faithfulness(model, x, np.ones((4, 4)), target="embedding")
    assert flat.score == pytest.approx(0.0, abs=1e-6)  # the same inputs both ways
    scores = [c.score for c in curves(model, x, [np.random.default_rng(s).random((4, 4)) for s in range(80)],
                                      target="embedding")]
    se = np.std(scores) / np.sqrt(len(scores))
    assert se > 0 and abs(np.mean(scores)) < 3 * se
    ref = eager(model)  # an informative map by hand: how far each patch's removal alone turns the embedding
    full = hand_embedding(ref, x, range(16))
    occlusion = [1 - float(F.cosine_similarity(hand_embedding(ref, x, [k for k in range(16) if k != j]), full, dim=0))
                 for j in range(16)]
    structured = faithfulness(model, x, np.array(occlusion).reshape(4, 4), target="embedding")
    assert structured.score > 3 * se  # the test can tell a map from noise


def test_reversed_map_swaps_the_curves_and_batching_changes_nothing(monkeypatch):
    model = layout_model("cls", num_classes=4)
    x = layout_image(model)
    maps = [np.random.default_rng(s).random((4, 4)) for s in range(3)]
    together = curves(model, x, maps + [-maps[0]])
    np.testing.assert_allclose(together[3].morf, together[0].lerf, atol=1e-6)
    np.testing.assert_allclose(together[3].lerf, together[0].morf, atol=1e-6)
    calls = []
    real = faith.run_kept

    def counting(model_, tokens, keep):
        calls.append(tuple(keep.shape))
        return real(model_, tokens, keep)

    monkeypatch.setattr(faith, "run_kept", counting)
    alone = faithfulness(model, x, maps[1])
    n = 16
    assert calls == [(2, n - k) for k in removed_counts(n, 10)[1:]]  # one batch of 2 per step
    np.testing.assert_allclose(alone.morf, together[1].morf, atol=1e-6)
    monkeypatch.setattr(faith, "_BATCH_BYTES", 1)  # chunks of one sequence
    for pert in ("tokens", "pixels"):
        small = curves(model, x, maps, perturbation=pert)
        monkeypatch.setattr(faith, "_BATCH_BYTES", 256 * 2**20)
        big = curves(model, x, maps, perturbation=pert)
        monkeypatch.setattr(faith, "_BATCH_BYTES", 1)
        for a, b in zip(small, big, strict=True):
            np.testing.assert_allclose(a.morf, b.morf, atol=1e-6)
            np.testing.assert_allclose(a.lerf_logit, b.lerf_logit, atol=1e-5)


def test_curves_leave_the_model_alone_and_refuse_bad_input():
    model = layout_model(num_classes=3)
    x = layout_image(model)
    before = hook_state(model)
    faithfulness(model, x, np.ones((4, 4)), perturbation="pixels")
    faithfulness(model, x, np.ones((4, 4)))
    assert hook_state(model) == before and all(p.grad is None for p in model.parameters())
    for heat, kwargs in [(np.ones((4, 5)), {}), (np.full((4, 4), np.nan), {}), (np.ones((4, 4)), {"steps": 1}),
                         (np.ones((4, 4)), {"perturbation": "noise"}), (np.ones((4, 4)), {"target": "patch:16"}),
                         (np.ones((4, 4)), {"readout": "entropy"})]:
        with pytest.raises(ParameterError):
            faithfulness(model, x, heat, **kwargs)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("perturbation", ["tokens", "blur"])
def test_the_curves_ask_the_interrupt_before_every_batch_and_stop_when_it_raises(perturbation):
    """An abandoned job stops inside its curves: interrupt() is asked before each batch of perturbed passes (at least
    once per step), a raise stops the passes there, and asking changes no score."""
    model = layout_model("cls")
    x = layout_image(model)
    heat = np.random.default_rng(0).random(tuple(int(v) for v in model.patch_embed.grid_size))
    asked = []
    got = curves(model, x, [heat], target="embedding", perturbation=perturbation, steps=4,
                 interrupt=lambda: asked.append(1))
    want = curves(model, x, [heat], target="embedding", perturbation=perturbation, steps=4)
    assert len(asked) >= 1 and got[0].score == want[0].score

    def stop():
        raise _Stop

    with pytest.raises(_Stop):
        curves(model, x, [heat], target="embedding", perturbation=perturbation, steps=4, interrupt=stop)
