"""Relevance propagation: AttnLRP (Achtibat et al., ICML 2024) with CP-LRP inside attention, from one forward and
one backward.

The relevance of an input is input × the gradient of a walk whose backward follows LRP's rules instead of the chain rule
(:class:`vitviz.walk.blocks.Rules`): the softmax probabilities are constants (CP-LRP: relevance flows through the
values), each LayerNorm's 1/σ is a constant (the identity rule for normalisation), GELU passes relevance on unchanged
(the identity rule); ``gamma`` > 0 adds the γ-rule on the blocks' linear layers (each output's contributions of its own
sign weighted 1 + γ), in blocks ``gamma_from`` … ``gamma_to`` only if asked (LRP-0 in the others, a composite as in
Montavon et al. 2019; the head follows the last block). What stays is linear in the tokens given those constants, so
with the layers' biases at zero the relevance of all tokens sums to the score exactly (Euler: s = Σ_i t_i·∂s/∂t_i);
biases absorb the rest (tests/test_lrp.py measures both). The map sums each patch token's relevance over its channels:

    R_j = Σ_c t_{j,c} · ∂̃s/∂t_{j,c}       (``at="tokens"``: the embedded tokens, position embeddings included)
    R_j = Σ_{pixels of patch j} Σ_c x · ∂̃s/∂x   (``at="pixels"``)

Nothing is patched on torch or on the model (lxt patches torch's classes process-wide; a timm port patches
``Attention.forward``): the rules are arguments of the one walk, so other threads' methods are unaffected.
Gated MLPs (SwiGLU) split the product's relevance evenly between its branches (the uniform rule); RmsNorm's 1/rms
is a constant like LayerNorm's 1/σ; an attention-pool head ("map", SigLIP's) is read like a block's attention
(its probabilities constant). Refused with a sentence: norms, MLPs and pooling heads that have no rule yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import AttentionPoolLatent

from ..errors import ModelError, ParameterError
from ..models.labels import has_head
from ..targets import ModelOutputs, Target, check_one_image, resolve_target, target_reference, target_score
from ..walk.blocks import Interventions, embed, softmax_probs, walk
from ..walk.rules import Rules, apply_linear, apply_mlp, apply_norm, gamma_rule
from ._base import Geometry, MethodSpec, PassResult, Progress, layer_index

__all__ = ["LRP", "LrpSettings", "RelevancePass", "relevance"]

_AT = ("tokens", "pixels")
# the γ-rule's default, by measurement (benchmarks/results-lrp-gamma.md: 10 photos, 5 held-out measures x 2 read-outs):
# 0.1 and 0.25 tie on mean rank, 0.25 has the better worst rank; γ = 0 scored near random on the default DINOv2
DEFAULT_GAMMA = 0.25


@dataclass(frozen=True)
class LrpSettings:
    at: str = "tokens"  # where input × gradient is taken: the embedded tokens or the pixels
    gamma: float = DEFAULT_GAMMA  # the γ-rule on the blocks' linear layers (Rules.gamma); 0: LRP-0
    gamma_from: int = 0  # the γ-rule in blocks gamma_from … gamma_to only, LRP-0 elsewhere; -k: the last k blocks
    gamma_to: int = -1  # the head follows the last block

    def __post_init__(self) -> None:
        if self.at not in _AT:
            raise ParameterError(f"lrp: at={self.at!r}; choose one of {', '.join(_AT)}")
        Rules(gamma=self.gamma)  # a bad gamma is refused here, before any pass


def _attention_pool(pool: torch.nn.Module, x: torch.Tensor, rules: Rules) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` (SigLIP's "map" head) under the rules: its latent queries' probabilities are
    constants (CP-LRP, as in the blocks), relevance flows through the values, the projection and its MLP."""
    B, N, _ = x.shape
    H, d, Q = pool.num_heads, pool.head_dim, pool.latent_len
    if pool.pos_embed is not None:
        x = x + pool.pos_embed[None].to(x.dtype)
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, Q, H, d).transpose(1, 2)
    kv = pool.kv(x)
    if rules.gamma != 0.0:  # the value half only: the keys feed the constant probabilities
        bias = None if pool.kv.bias is None else pool.kv.bias[H * d:]
        kv = torch.cat([kv[..., :H * d], gamma_rule(x, kv[..., H * d:], pool.kv.weight[H * d:], bias, rules.gamma)],
                       -1)
    k, v = kv.reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    a = softmax_probs(0, pool.q_norm(q), pool.k_norm(k), pool.scale, None).detach()
    out = apply_linear(pool.proj, (a.to(v.dtype) @ v).transpose(1, 2).reshape(B, Q, H * d), rules)
    if pool.mlp is not None:
        out = out + apply_mlp(pool.mlp, apply_norm(pool.norm, out, rules), rules)
    return out[:, 0] if pool.pool == "token" else out.mean(1) if pool.pool == "avg" else out


def _pooled(model: torch.nn.Module, feats: torch.Tensor, rules: Rules) -> torch.Tensor:
    """The head's input from the normed tokens (B, T, C): an attention pool's output, or the patches' mean."""
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        if type(pool) is not AttentionPoolLatent or pool.pool not in ("token", "avg"):
            raise ModelError(f"relevance propagation has no rule for a {type(pool).__name__} pooling head yet: "
                             "choose another method")
        include = getattr(model, "pool_include_prefix", True)  # a ViT drops its prefix tokens first, Eva does not
        return _attention_pool(pool, feats if include else feats[:, int(model.num_prefix_tokens):], rules)
    start = 0 if getattr(model, "pool_include_prefix", False) else int(model.num_prefix_tokens)
    return feats[:, start:].mean(1)


def _readout(model: torch.nn.Module, t: torch.Tensor, rules: Rules) -> ModelOutputs:
    """The final norm and the head under the rules: attention, average or token pooling (a distilled DeiT's two
    heads too)."""
    if getattr(model, "attn_pool", None) is None and model.global_pool not in ("token", "avg"):
        raise ModelError(f"relevance propagation has no rule for {model.global_pool!r} pooling yet: choose another "
                         "method")
    feats = apply_norm(model.norm, t, rules)
    if getattr(model, "attn_pool", None) is not None or model.global_pool == "avg":  # then fc_norm under the rule
        embedding = apply_norm(model.fc_norm, _pooled(model, feats, rules), rules)
        logits = model.head(embedding) if has_head(model) else None
        return ModelOutputs(tokens=feats, embedding=embedding, logits=logits)
    if not isinstance(model.fc_norm, torch.nn.Identity):
        feats_head = feats.clone()
        feats_head[:, 0] = apply_norm(model.fc_norm, feats[:, 0], rules)
        return ModelOutputs(feats, feats_head[:, 0], model.head(feats_head[:, 0]) if has_head(model) else None)
    # token pooling is a linear read-out (a distilled DeiT averages its two tokens' heads)
    return ModelOutputs(tokens=feats, embedding=model.forward_head(feats, pre_logits=True),
                        logits=model.forward_head(feats) if has_head(model) else None)


def _rules(gamma: float, gamma_from: int, gamma_to: int, depth: int) -> Rules:
    # gamma_from=-k: the last k blocks, every block of a model with fewer
    first = max(gamma_from + depth, 0) if gamma_from < 0 else layer_index(gamma_from, depth, "the γ-rule's first block")
    last = layer_index(gamma_to, depth, "the γ-rule's last block")
    if first > last:
        raise ParameterError(f"lrp: the γ-rule's blocks run from {gamma_from} to {gamma_to}, which is none of them")
    return Rules(gamma=gamma, gamma_blocks=None if (first, last) == (0, depth - 1) else (first, last))


def relevance(model: torch.nn.Module, x: torch.Tensor, *, target: Target | str = "auto", at: str = "tokens",
              gamma: float = DEFAULT_GAMMA, gamma_from: int = 0, gamma_to: int = -1,
              interrupt: Callable[[], None] | None = None) -> tuple[torch.Tensor, ModelOutputs, Target, float]:
    """AttnLRP's relevance of every token (1, T) (``at="tokens"``) or pixel (1, H, W), the outputs, the resolved
    target and its score, from one forward and one backward of the walk under :class:`Rules` (``gamma``: the
    γ-rule on the linear layers of blocks ``gamma_from`` … ``gamma_to``, and of the head if it covers the last)."""
    LrpSettings(at, gamma, gamma_from, gamma_to)
    check_one_image(model, x)
    rules = _rules(gamma, gamma_from, gamma_to, len(model.blocks))
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone().requires_grad_(at == "pixels")
        t = embed(model, x)
        if at == "tokens":
            t = t.detach().requires_grad_()
        out = _readout(model, walk(model, t, probs=softmax_probs,
                                   interventions=Interventions(rules=rules, interrupt=interrupt)),
                       rules.at(len(model.blocks) - 1))
        resolved = resolve_target(model, target, None if out.logits is None else out.logits[0].detach())
        score = target_score(model, resolved, out, target_reference(model, resolved, out))[0]
        leaf = t if at == "tokens" else x
        (grad,) = torch.autograd.grad(score, leaf)
    rel = (leaf.detach() * grad).sum(-1 if at == "tokens" else 1)
    detached = ModelOutputs(out.tokens.detach(), out.embedding.detach(),
                            None if out.logits is None else out.logits.detach())
    return rel, detached, resolved, float(score.detach())


@dataclass(frozen=True)
class RelevancePass:
    """One forward + one backward under the LRP rules."""

    at: str
    gamma: float = DEFAULT_GAMMA
    gamma_from: int = 0
    gamma_to: int = -1

    def text(self, depth: int) -> str:
        return "1 forward + 1 backward (relevance rules)"

    def run(self, model: torch.nn.Module, x: torch.Tensor, target: Target | str, *, progress: Progress | None = None,
            interrupt: Callable[[], None] | None = None) -> PassResult:
        rel, out, resolved, _score = relevance(model, x, target=target, at=self.at, gamma=self.gamma,
                                               gamma_from=self.gamma_from, gamma_to=self.gamma_to, interrupt=interrupt)
        return PassResult(outputs=out, target=resolved, extra=rel[0], passes=self.text(len(model.blocks)))


def _map(s: LrpSettings, run: PassResult, geo: Geometry) -> torch.Tensor:
    gh, gw = geo.grid
    rel = run.extra
    if s.at == "tokens":
        return rel[geo.num_prefix_tokens:].reshape(gh, gw)
    ph, pw = rel.shape[0] // gh, rel.shape[1] // gw
    return rel.reshape(gh, ph, gw, pw).sum(dim=(1, 3))


LRP = MethodSpec(name="lrp", title="AttnLRP (Achtibat et al. 2024), CP-LRP in attention: relevance per patch",
                 settings=LrpSettings, map=_map,
                 needs=lambda s, geo: RelevancePass(s.at, s.gamma, s.gamma_from, s.gamma_to))
