"""AttnLRP (CP-LRP in attention) against properties that hold by the rules' own equations: with every bias at zero
the network under the rules is linear in its tokens given the constants, so the relevance of all tokens sums to the
score exactly (Euler); the pixel relevance of a patch equals its token's when the patch embedding has no bias and
no position embedding is added; the walk's rules themselves are checked against a hand forward in test_walk.py."""

from __future__ import annotations

import pytest
import torch

from vitviz.errors import ModelError, ParameterError
from vitviz.explain import explain
from vitviz.explain.lrp import relevance

from .helpers import hook_state, in_threads, tiny_vit

LAYOUTS = {
    "cls": {},
    "registers": {"reg_tokens": 2},
    "distilled": {"arch": "deit_tiny_distilled_patch16_224"},
    "post_norm_qk": {"block_fn": "post", "qk_norm": True},
    "avg_pool": {"global_pool": "avg", "class_token": False, "fc_norm": True},
}


def _model(layout: str, *, num_classes: int = 4, zero_bias: bool = False):
    kwargs = dict(LAYOUTS[layout])
    if kwargs.pop("block_fn", None) == "post":
        from timm.models.vision_transformer import ResPostBlock

        kwargs["block_fn"] = ResPostBlock
    if layout == "avg_pool":
        kwargs["class_token"] = True  # vitviz needs a CLS token; the head still averages the patches
    model = tiny_vit(img_size=32, patch_size=8, depth=2, num_classes=num_classes, **kwargs).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # timm initialises biases at zero: give them values, or take them away
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.zeros_like(p) if zero_bias else 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("target", ["embedding", "class", "patch:5"])
def test_with_zero_biases_the_relevance_of_all_tokens_is_the_score(layout, target):
    model = _model(layout, zero_bias=True)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    rel, _out, _t, score = relevance(model, x, target=target)
    assert abs(score) > 1e-3
    assert float(rel.sum()) == pytest.approx(score, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", ["cls", "avg_pool"])
def test_with_biases_conservation_is_only_approximate_and_the_map_is_the_patch_tokens(layout):
    model = _model(layout)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    rel, _out, _t, score = relevance(model, x, target="embedding")
    assert abs(float(rel.sum()) - score) > 1e-6  # the biases hold some of the score: not conserved exactly
    e = explain(model, x, method="lrp", target="embedding")
    p = model.num_prefix_tokens
    assert e.map.shape == (4, 4)
    torch.testing.assert_close(torch.tensor(e.map, dtype=torch.float64), rel[0, p:].reshape(4, 4).float().double())


def test_pixel_relevance_per_patch_equals_the_tokens_without_bias_or_position():
    model = _model("cls", zero_bias=True)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    tokens = explain(model, x, method="lrp:at=tokens", target="class").map
    pixels = explain(model, x, method="lrp:at=pixels", target="class").map
    torch.testing.assert_close(torch.from_numpy(pixels), torch.from_numpy(tokens), rtol=1e-5, atol=1e-6)


def test_lrp_leaves_no_state_and_threads_agree():
    model = _model("registers").float()
    x = torch.randn(1, 3, 32, 32)
    before = hook_state(model)
    alone = explain(model, x, method="lrp", target="class").map
    got = in_threads(lambda w, r: explain(model, x, method="lrp", target="class").map, workers=4, rounds=2)
    for m in got.values():  # other threads' BLAS splits may differ in the last bits
        torch.testing.assert_close(torch.from_numpy(m), torch.from_numpy(alone), rtol=1e-5, atol=1e-7)
    assert hook_state(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert torch.nn.functional.softmax.__module__ == "torch.nn.functional"  # nothing patched process-wide
    assert type(model.blocks[0].attn).forward.__module__ == "timm.layers.attention"


def test_unsupported_heads_and_settings_are_refused_with_a_sentence():
    model = tiny_vit(img_size=32, patch_size=8, depth=2, global_pool="max")
    with pytest.raises(ModelError, match="no rule for 'max' pooling"):
        explain(model, torch.randn(1, 3, 32, 32), method="lrp", target="embedding")
    with pytest.raises(ParameterError, match="at="):
        explain(_model("cls"), torch.randn(1, 3, 32, 32, dtype=torch.float64), method="lrp:at=logits")


def test_the_gamma_rule_of_a_linear_layer_equals_its_equation_by_loops():
    """Rules.gamma on one linear layer (Montavon et al. 2019, the generalised γ-rule): the forward value is the
    layer's own; input × modified gradient hands output k's relevance r_k to input j in proportion to
    z_jk + γ·(z_jk of y_k's sign), z_jk = x_j·w_jk, the bias a sink of its own. Loops over j and k as reference."""
    from vitviz.walk.blocks import Rules, apply_linear

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(5, 4).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 5, generator=g, dtype=torch.float64))
        lin.bias.copy_(0.5 * torch.randn(4, generator=g, dtype=torch.float64))
    x = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    r = torch.randn(4, generator=g, dtype=torch.float64)  # the relevance arriving at the outputs
    for gamma in (0.0, 0.5, 2.0):
        out = apply_linear(lin, x, Rules(gamma=gamma))
        y = lin(x).detach()
        torch.testing.assert_close(out.detach(), y)
        (grad,) = torch.autograd.grad((out * (r / y)).sum(), x)
        got = (x.detach() * grad).numpy()
        w, b, xv = lin.weight.detach().numpy(), lin.bias.detach().numpy(), x.detach().numpy()
        want = [0.0] * 5
        for k in range(4):
            def boost(z, k=k, gamma=gamma, y=y):
                return z + gamma * (max(z, 0.0) if y[k] > 0 else min(z, 0.0))
            zs = [boost(xv[j] * w[k, j]) for j in range(5)]
            den = sum(zs) + boost(b[k])
            for j in range(5):
                want[j] += zs[j] / den * float(r[k])
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["cls", "registers", "post_norm_qk"])
def test_with_zero_biases_the_gamma_rule_still_conserves_the_score(layout):
    """Each γ-layer hands on all it receives (bias zero), so Euler still holds: Σ relevance = score; and the map
    differs from LRP-0's (the rule is applied)."""
    model = _model(layout, zero_bias=True)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    rel, _out, _t, score = relevance(model, x, target="class", gamma=0.25)
    plain, *_ = relevance(model, x, target="class", gamma=0.0)
    assert float(rel.sum()) == pytest.approx(score, rel=1e-9, abs=1e-12)
    assert (rel - plain).abs().max() > 1e-6 * plain.abs().max()
    with pytest.raises(ParameterError, match="gamma"):
        explain(model, x, method="lrp:gamma=-1")


@pytest.mark.parametrize("layout", ["cls", "registers"])
def test_the_gamma_rule_in_some_blocks_only_conserves_and_lies_between(layout):
    """γ in the first block only (``gamma_to=0``): conservation still holds with zero biases, the map is neither
    LRP-0's nor the all-block γ map's, and the same range said from the end (gamma_from=-depth) gives the same map;
    the last k blocks of a model with fewer are all of them. Other ranges outside the model, or empty, are refused
    with a ParameterError. (The walk's per-block rules are checked
    against a hand forward in test_walk.py.)"""
    model = _model(layout, zero_bias=True)
    depth = len(model.blocks)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    first, _out, _t, score = relevance(model, x, target="class", gamma=0.25, gamma_to=0)
    assert float(first.sum()) == pytest.approx(score, rel=1e-9, abs=1e-12)
    every, *_ = relevance(model, x, target="class", gamma=0.25)
    plain, *_ = relevance(model, x, target="class", gamma=0.0)
    for other in (every, plain):
        assert (first - other).abs().max() > 1e-6 * other.abs().max()
    same, *_ = relevance(model, x, target="class", gamma=0.25, gamma_from=-depth, gamma_to=-depth)
    torch.testing.assert_close(same, first, rtol=0, atol=0)
    more, *_ = relevance(model, x, target="class", gamma=0.25, gamma_from=-depth - 2)  # "the last k": all there are
    torch.testing.assert_close(more, every, rtol=0, atol=0)
    for bad in (f"gamma_from={depth}", "gamma_from=1,gamma_to=0", f"gamma_to={-depth - 1}"):
        with pytest.raises(ParameterError, match="block"):
            explain(model, x, method=f"lrp:{bad}")


def test_a_gated_mlp_after_a_rmsnorm_passes_relevance_as_its_rules_written_out_say():
    """RmsNorm then timm's SwiGLU, relevance passed message by message (LRP-0 through each linear layer:
    R_i = Σ_k x_i·w_ki / z_k · R_k with z_k the layer's output, bias included; the identity rule through the norm and
    SiLU; the uniform rule splitting the product's relevance in halves), against input × the walk rules' gradient."""
    from timm.layers import RmsNorm, SwiGLU

    from vitviz.walk.rules import Rules, apply_mlp, apply_norm

    g = torch.Generator().manual_seed(4)
    norm, mlp = RmsNorm(6).double(), SwiGLU(6, 8).double()
    with torch.no_grad():
        for p in [*norm.parameters(), *mlp.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(1, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 3, 6, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((c * apply_mlp(mlp, apply_norm(norm, x, Rules()), Rules())).sum(), x)
    with torch.no_grad():
        n = norm(x)
        gate, up = mlp.fc1_g(n), mlp.fc1_x(n)
        hidden = torch.nn.functional.silu(gate) * up
        out = mlp.fc2(hidden)
        r_hidden = torch.einsum("btk,jk,btj->btk", hidden, mlp.fc2.weight, c * out / out)
        r_n = (torch.einsum("bti,ki,btk->bti", n, mlp.fc1_g.weight, r_hidden / 2 / gate)
               + torch.einsum("bti,ki,btk->bti", n, mlp.fc1_x.weight, r_hidden / 2 / up))
    torch.testing.assert_close(x.detach() * grad, r_n)  # the identity rule: the norm hands R_n on to x unchanged
