"""The one walk of the blocks against a forward written out here by hand, head by head, for every intervention it
takes: head scales (ablation), replaced position embeddings, relevance rules (constants in the backward), the
interrupt. The capture's equality with timm's and Hugging Face's attention is tested in test_attention.py."""

from __future__ import annotations

import math

import pytest
import torch

from vitviz.errors import ModelError
from vitviz.walk.blocks import Interventions, KeptProbs, Rules, embed, walk

from .helpers import tiny_vit


def _model(**kwargs):
    return tiny_vit(img_size=32, patch_size=8, depth=2, **kwargs).double()


def _layer_norm(norm, x, constant: bool):
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(norm.eps).sqrt()
    return (x - mu) / (sigma.detach() if constant else sigma) * norm.weight + norm.bias


def _linear(x, lin, gamma: float):
    """x·wᵀ + b; with γ > 0 the generalised γ-rule from every contribution x_j·w_kj held apart (T, out, in)."""
    z = x @ lin.weight.T + lin.bias
    if gamma == 0.0:
        return z
    c = x[..., None, :] * lin.weight
    zp = c.clamp(min=0).sum(-1) + lin.bias.clamp(min=0)
    zn = c.clamp(max=0).sum(-1) + lin.bias.clamp(max=0)
    boosted = z + gamma * torch.where(z > 0, zp, zn)
    return boosted * (z / boosted).detach()


def hand_forward(model, t, *, scale=None, rules: Rules | None = None):
    """Pre-norm timm blocks written out: per head softmax(q_h·k_hᵀ/√d)·v_h, each head's output times scale[l, h];
    under ``rules`` the softmax, 1/σ of each LayerNorm and GELU's slope are detached, by these formulas, and every
    linear layer (all of qkv too) follows the γ-rule, in the blocks of ``rules.gamma_blocks`` only."""
    r = rules or Rules(False, False, False)
    for layer, blk in enumerate(model.blocks):
        first, last = r.gamma_blocks or (0, len(model.blocks))
        gamma = r.gamma if first <= layer <= last else 0.0
        a = blk.attn
        h = _layer_norm(blk.norm1, t, r.constant_norms)
        T, H, d = h.shape[1], a.num_heads, a.head_dim
        qkv = _linear(h[0], a.qkv, gamma).reshape(T, 3, H, d)
        heads = []
        for j in range(H):
            q, k, v = qkv[:, 0, j], qkv[:, 1, j], qkv[:, 2, j]
            p = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
            out = (p.detach() if r.constant_attention else p) @ v
            heads.append(out * (1.0 if scale is None else scale[layer, j]))
        t = t + blk.ls1(_linear(torch.cat(heads, -1), a.proj, gamma)[None])
        z = _linear(_layer_norm(blk.norm2, t, r.constant_norms), blk.mlp.fc1, gamma)
        g = torch.nn.functional.gelu(z)
        if r.identity_activations:
            g = z * (g / z).detach()
        t = t + blk.ls2(_linear(g, blk.mlp.fc2, gamma))
    return t


def test_the_plain_walk_is_the_hand_forward_and_timms():
    model = _model()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        t = embed(model, x)
        ours = walk(model, t, probs=KeptProbs())
        torch.testing.assert_close(ours, hand_forward(model, t))
        torch.testing.assert_close(model.norm(ours), model.forward_features(x))


def test_a_head_scale_of_zero_removes_that_heads_output_and_ones_change_nothing():
    model = _model()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    L, H = len(model.blocks), model.blocks[0].attn.num_heads
    scale = torch.ones(L, H, dtype=torch.float64)
    scale[1, 2] = 0.0
    scale[0, 0] = 0.0
    with torch.no_grad():
        t = embed(model, x)
        plain = walk(model, t, probs=KeptProbs())
        same = walk(model, t, probs=KeptProbs(), interventions=Interventions(head_scale=torch.ones(L, H)))
        cut = walk(model, t, probs=KeptProbs(), interventions=Interventions(head_scale=scale))
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    torch.testing.assert_close(cut, hand_forward(model, t, scale=scale))
    assert (cut - plain).abs().max() > 1e-3, "removing heads must change the output"


@pytest.mark.parametrize("kwargs", [{}, {"no_embed_class": True}, {"reg_tokens": 2},
                                    {"arch": "deit_tiny_distilled_patch16_224"}])
def test_replaced_position_embeddings_are_added_instead_of_the_models(kwargs):
    model = tiny_vit(img_size=32, patch_size=8, depth=2, **kwargs)
    x = torch.randn(1, 3, 32, 32)
    new = torch.randn_like(model.pos_embed)
    with torch.no_grad():
        own = embed(model, x)
        torch.testing.assert_close(embed(model, x, pos_embed=model.pos_embed), own)
        swapped = embed(model, x, pos_embed=new)
    rows = model.pos_embed.shape[1]
    torch.testing.assert_close(swapped[:, -rows:] - new, own[:, -rows:] - model.pos_embed)  # the same tokens under
    torch.testing.assert_close(swapped[:, :-rows], own[:, :-rows])  # prefix tokens without a position: untouched
    with pytest.raises(ModelError, match="do not fit"):
        embed(model, x, pos_embed=new[:, 1:])


def _shuffle_patches(x, perm, p=8):
    """The image with its p×p patches moved: patch perm[i] (row-major) goes to position i."""
    B, C, H, W = x.shape
    g = W // p
    blocks = x.reshape(B, C, H // p, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, p, p)[:, perm]
    return blocks.reshape(B, H // p, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_without_position_embeddings_a_vit_is_permutation_equivariant():
    """The image's patches shuffled: without position embeddings the patch outputs shuffle the same way and the
    CLS token is unchanged, to float precision; with them the CLS token changes."""
    model = _model()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    xs = _shuffle_patches(x, perm)
    p = model.num_prefix_tokens
    zero = torch.zeros_like(model.pos_embed)
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed(xs), model.patch_embed(x)[:, perm])  # the shuffle is right
        out = walk(model, embed(model, x, pos_embed=zero), probs=KeptProbs())
        out_s = walk(model, embed(model, xs, pos_embed=zero), probs=KeptProbs())
        torch.testing.assert_close(out_s[:, p:], out[:, p:][:, perm])
        torch.testing.assert_close(out_s[:, :p], out[:, :p])
        cls, cls_s = (walk(model, embed(model, v), probs=KeptProbs())[:, 0] for v in (x, xs))
        assert (cls - cls_s).abs().max() > 1e-3


@pytest.mark.parametrize("rules", [Rules(), Rules(True, False, False), Rules(False, True, False),
                                   Rules(False, False, True), Rules(gamma=0.5), Rules(False, False, False, 0.25),
                                   Rules(gamma=0.5, gamma_blocks=(0, 0)), Rules(gamma=0.5, gamma_blocks=(1, 1))])
def test_relevance_rules_change_the_backward_only_as_their_formulas_say(rules):
    model = _model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # timm starts the biases at zero: the γ-rule's bias terms must be exercised
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        t0 = embed(model, x)
    grads = []
    for run in ("walk", "hand"):
        t = t0.clone().requires_grad_()
        out = (walk(model, t, probs=KeptProbs(), interventions=Interventions(rules=rules)) if run == "walk"
               else hand_forward(model, t, rules=rules))
        score = out[0, 0] @ torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
        (g,) = torch.autograd.grad(score, t)
        grads.append((out.detach(), g))
    (out_w, g_w), (out_h, g_h) = grads
    torch.testing.assert_close(out_w, out_h)  # the forward is unchanged by the rules
    torch.testing.assert_close(g_w, g_h)
    with torch.no_grad():
        torch.testing.assert_close(out_w, walk(model, t0, probs=KeptProbs()))
    t = t0.clone().requires_grad_()
    plain = walk(model, t, probs=KeptProbs())
    (g_plain,) = torch.autograd.grad(plain[0, 0] @ torch.linspace(-1, 1, plain.shape[-1], dtype=plain.dtype), t)
    assert (g_plain - g_w).abs().max() > 1e-6, "a rule must change the gradient"


def test_the_interrupt_is_asked_before_every_block():
    model = _model()
    asked = []
    with torch.no_grad():
        walk(model, embed(model, torch.randn(1, 3, 32, 32, dtype=torch.float64)), probs=KeptProbs(),
             interventions=Interventions(interrupt=lambda: asked.append(len(asked))))
    assert asked == list(range(len(model.blocks)))
