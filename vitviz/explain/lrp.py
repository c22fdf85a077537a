"""Relevance propagation: AttnLRP (Achtibat et al., ICML 2024) with CP-LRP inside attention, from one forward and
one backward.

The relevance of an input is input × the gradient of a walk whose backward follows LRP's rules instead of the chain
rule (:class:`vitviz.walk.blocks.Rules`): the softmax probabilities are constants (CP-LRP: relevance flows through
the values), each LayerNorm's 1/σ is a constant (the identity rule for normalisation), GELU passes relevance on
unchanged (the identity rule); ``gamma`` > 0 adds the γ-rule on the blocks' linear layers (each output's
contributions of its own sign weighted 1 + γ). What stays is linear in the tokens given those constants, so with
the layers' biases at zero the relevance of all tokens sums to the score exactly (Euler: s = Σ_i t_i·∂s/∂t_i);
biases absorb the rest (tests/test_lrp.py measures both). The map sums each patch token's relevance over its channels:

    R_j = Σ_c t_{j,c} · ∂̃s/∂t_{j,c}       (``at="tokens"``: the embedded tokens, position embeddings included)
    R_j = Σ_{pixels of patch j} Σ_c x · ∂̃s/∂x   (``at="pixels"``)

Nothing is patched on torch or on the model (lxt patches torch's classes process-wide; a timm port patches
``Attention.forward``): the rules are arguments of the one walk, so other threads' methods are unaffected.
Refused with a sentence: attention-pool heads, and norms or MLPs that have no rule yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ModelError, ParameterError
from ..models.labels import has_head
from ..targets import ModelOutputs, Target, check_one_image, resolve_target, target_reference, target_score
from ..walk.blocks import Interventions, Rules, apply_norm, embed, softmax_probs, walk
from ._base import Geometry, MethodSpec, PassResult, Progress

__all__ = ["LRP", "LrpSettings", "RelevancePass", "relevance"]

_AT = ("tokens", "pixels")
# the γ-rule's default, by measurement (benchmarks/results-lrp-gamma.md: 10 photos, 5 held-out measures x 2 read-outs):
# 0.1 and 0.25 tie on mean rank, 0.25 has the better worst rank; γ = 0 scored near random on the default DINOv2
DEFAULT_GAMMA = 0.25


@dataclass(frozen=True)
class LrpSettings:
    at: str = "tokens"  # where input × gradient is taken: the embedded tokens or the pixels
    gamma: float = DEFAULT_GAMMA  # the γ-rule on the blocks' linear layers (Rules.gamma); 0: LRP-0

    def __post_init__(self) -> None:
        if self.at not in _AT:
            raise ParameterError(f"lrp: at={self.at!r}; choose one of {', '.join(_AT)}")
        Rules(gamma=self.gamma)  # a bad gamma is refused here, before any pass


def _readout(model: torch.nn.Module, t: torch.Tensor, rules: Rules) -> ModelOutputs:
    """The final norm and the head under the rules: token or average pooling (a distilled DeiT's two heads too)."""
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise ModelError(f"relevance propagation has no rule for {model.global_pool!r} pooling yet: choose another "
                         "method")
    feats = apply_norm(model.norm, t, rules)
    if model.global_pool == "avg":  # the mean of the patches, then fc_norm under the rule
        start = 0 if getattr(model, "pool_include_prefix", False) else int(model.num_prefix_tokens)
        embedding = apply_norm(model.fc_norm, feats[:, start:].mean(1), rules)
        logits = model.head(embedding) if has_head(model) else None
        return ModelOutputs(tokens=feats, embedding=embedding, logits=logits)
    if not isinstance(model.fc_norm, torch.nn.Identity):
        feats_head = feats.clone()
        feats_head[:, 0] = apply_norm(model.fc_norm, feats[:, 0], rules)
        return ModelOutputs(feats, feats_head[:, 0], model.head(feats_head[:, 0]) if has_head(model) else None)
    # token pooling is a linear read-out (a distilled DeiT averages its two tokens' heads)
    return ModelOutputs(tokens=feats, embedding=model.forward_head(feats, pre_logits=True),
                        logits=model.forward_head(feats) if has_head(model) else None)


def relevance(model: torch.nn.Module, x: torch.Tensor, *, target: Target | str = "auto", at: str = "tokens",
              gamma: float = DEFAULT_GAMMA, interrupt: Callable[[], None] | None = None,
              ) -> tuple[torch.Tensor, ModelOutputs, Target, float]:
    """AttnLRP's relevance of every token (1, T) (``at="tokens"``) or pixel (1, H, W), the outputs, the resolved
    target and its score, from one forward and one backward of the walk under :class:`Rules` (``gamma``: the
    γ-rule on the blocks' linear layers)."""
    LrpSettings(at, gamma)
    check_one_image(model, x)
    rules = Rules(gamma=gamma)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone().requires_grad_(at == "pixels")
        t = embed(model, x)
        if at == "tokens":
            t = t.detach().requires_grad_()
        out = _readout(model, walk(model, t, probs=softmax_probs,
                                   interventions=Interventions(rules=rules, interrupt=interrupt)), rules)
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

    def text(self, depth: int) -> str:
        return "1 forward + 1 backward (relevance rules)"

    def run(self, model: torch.nn.Module, x: torch.Tensor, target: Target | str, *, progress: Progress | None = None,
            interrupt: Callable[[], None] | None = None) -> PassResult:
        rel, out, resolved, _score = relevance(model, x, target=target, at=self.at, gamma=self.gamma,
                                               interrupt=interrupt)
        return PassResult(outputs=out, target=resolved, extra=rel[0], passes=self.text(len(model.blocks)))


def _map(s: LrpSettings, run: PassResult, geo: Geometry) -> torch.Tensor:
    gh, gw = geo.grid
    rel = run.extra
    if s.at == "tokens":
        return rel[geo.num_prefix_tokens:].reshape(gh, gw)
    ph, pw = rel.shape[0] // gh, rel.shape[1] // gw
    return rel.reshape(gh, ph, gw, pw).sum(dim=(1, 3))


LRP = MethodSpec(name="lrp", title="AttnLRP (Achtibat et al. 2024), CP-LRP in attention: relevance per patch",
                 settings=LrpSettings, needs=lambda s, geo: RelevancePass(s.at, s.gamma), map=_map)
