"""The position-embedding experiment against independent references: timm's own forward on an image whose patches
were moved by hand (the shuffle), timm's blocks called by hand without position embeddings (the removal), timm's
logits (the predictions). The walk's own permutation test (an image shuffled, test_walk.py) is not repeated here:
these check the experiment's variants, their un-permuting and their maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitviz.analysis.rollout import rollout_matrices, rollout_row, tokens_to_grid
from vitviz.errors import ModelError, ParameterError
from vitviz.experiments.position import patch_permutation, position_experiment
from vitviz.models.labels import top_predictions
from vitviz.walk.capture import capture_attention

from .helpers import hook_state, naive_rollout, tiny_vit

ALL = ("no_position", "shuffled", "shuffled_no_position")


def _model(**kwargs):
    return tiny_vit(img_size=32, patch_size=8, depth=2, **kwargs).double()


def _image(seed=0):
    return torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _without_positions(model):
    """The same ViT with its position embeddings zero: a ViT without positions (a copy; the model is not changed)."""
    bare = _model()
    bare.load_state_dict({**model.state_dict(), "pos_embed": torch.zeros_like(model.pos_embed)})
    return bare


def _shuffle_image(x, perm, p=8):
    """The image with its p×p patches moved by hand: position i (row-major) gets patch perm[i]."""
    B, C, H, W = x.shape
    gh, gw = H // p, W // p
    blocks = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, p, p)[:, perm]
    return blocks.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def _hand_without_positions(model, x):
    """timm's modules called by hand: patch embedding, the prefix tokens prepended, no position embedding added,
    every block, the final norm."""
    patches = model.patch_embed(x)
    prefix = [model.cls_token.expand(x.shape[0], -1, -1)]
    if model.reg_token is not None:
        prefix.append(model.reg_token.expand(x.shape[0], -1, -1))
    t = model.norm_pre(torch.cat([*prefix, patches], dim=1))
    for blk in model.blocks:
        t = blk(t)
    return model.norm(t)


def test_shuffled_patches_are_timms_forward_on_the_shuffled_image_put_back_in_order():
    model = _model()
    x = _image()
    res = position_experiment(model, x, variants=ALL, seed=3)
    perm = torch.as_tensor(res.permutation)
    assert torch.equal(perm, patch_permutation(16, seed=3)) and sorted(perm.tolist()) == list(range(16))
    assert not torch.equal(perm, torch.arange(16))
    p = model.num_prefix_tokens
    with torch.no_grad():
        ref = model.forward_features(_shuffle_image(x, perm))  # shuffled order: position i holds patch perm[i]
    back = torch.argsort(perm)
    ref = torch.cat([ref[:, :p], ref[:, p:][:, back]], dim=1)[0]  # patch j back at p + j
    torch.testing.assert_close(torch.from_numpy(res.variant("shuffled").features), ref)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(res.variant("intact").features), model.forward_features(x)[0])
    assert res.variant("intact").cosine == pytest.approx(1.0)
    assert res.variant("shuffled").cosine < 0.999, "with position embeddings a shuffle changes the CLS embedding"


def test_without_position_embeddings_a_shuffle_changes_nothing_but_the_order():
    """A ViT whose position embeddings are zero: the shuffled run, put back in order, is the intact one to float
    precision (tokens, CLS embedding, attention map); zeroing its (zero) embeddings changes nothing either."""
    bare = _without_positions(_model())
    x = _image(1)
    res = position_experiment(bare, x, variants=ALL, seed=5)
    intact = res.variant("intact")
    for name in ALL:
        v = res.variant(name)
        torch.testing.assert_close(torch.from_numpy(v.features), torch.from_numpy(intact.features))
        torch.testing.assert_close(torch.from_numpy(v.embedding), torch.from_numpy(intact.embedding))
        np.testing.assert_allclose(v.attention_map, intact.attention_map, rtol=1e-6, atol=1e-7)
        assert v.cosine == pytest.approx(1.0, abs=1e-9)
    # the map is not symmetric under the shuffle: were the tokens not put back, it would differ
    moved = intact.attention_map.reshape(-1)[res.permutation].reshape(4, 4)
    assert np.abs(moved - intact.attention_map).max() > 1e-6


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "no_embed_class": True}])
def test_removing_the_position_embeddings_is_the_hand_built_forward_without_them(kwargs):
    model = _model(**kwargs)
    x = _image(2)
    before = hook_state(model)
    pos = model.pos_embed.detach().clone()
    res = position_experiment(model, x, variants=("no_position",))
    with torch.no_grad():
        hand = _hand_without_positions(model, x)[0]
        torch.testing.assert_close(torch.from_numpy(res.variant("no_position").features), hand)
        assert (model.forward_features(x)[0] - hand).abs().max() > 1e-3  # the positions did matter
    assert res.variant("no_position").cosine < 0.999
    assert torch.equal(model.pos_embed, pos) and hook_state(model) == before  # the model is untouched


def test_predictions_and_maps_of_the_intact_run_are_the_models_own():
    model = tiny_vit(img_size=32, patch_size=8, depth=3, num_classes=7)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    res = position_experiment(model, x, variants=("no_position",), k=3)
    with torch.no_grad():
        expected = top_predictions(model(x)[0], k=3)
    got = res.variant("intact").predictions
    assert [p.index for p in got] == [p.index for p in expected]
    np.testing.assert_allclose([p.probability for p in got], [p.probability for p in expected], rtol=1e-4)
    attn = capture_attention(model, x)
    row = rollout_row(rollout_matrices(attn), start=0, end=2, source=0)
    np.testing.assert_allclose(res.variant("intact").attention_map,
                               tokens_to_grid(row, num_prefix_tokens=1, grid=(4, 4)).numpy(), rtol=1e-4, atol=1e-6)
    ranged = position_experiment(model, x, variants=(), start=1, discard=0.5).variant("intact").attention_map
    naive = naive_rollout(attn, start=1, end=2, fusion="mean", ratio=0.5)[1:]  # the app's map: layers 1.., discard
    np.testing.assert_allclose(ranged, naive.reshape(4, 4), rtol=1e-4, atol=1e-6)
    last = position_experiment(model, x, variants=(), map_kind="last_layer").variant("intact").attention_map
    np.testing.assert_allclose(last, attn[-1].mean(0)[0, 1:].reshape(4, 4).numpy(), rtol=1e-4, atol=1e-6)
    assert position_experiment(tiny_vit(), torch.randn(1, 3, 32, 32)).variant("intact").predictions == ()


def test_bad_inputs_are_refused_with_a_sentence():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ParameterError, match="unknown variant"):
        position_experiment(model, x, variants=("upside_down",))
    with pytest.raises(ParameterError, match="unknown attention map"):
        position_experiment(model, x, map_kind="everything")
    with pytest.raises(ParameterError, match="one image"):
        position_experiment(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ParameterError, match="was not run"):
        position_experiment(model, x, variants=("no_position",)).variant("shuffled")
    with pytest.raises(ModelError, match="position embedding"):
        position_experiment(tiny_vit(pos_embed="none"), x)
