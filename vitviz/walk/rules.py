"""Relevance propagation's rules, as arguments of the one walk: each layer's forward value is unchanged and its
backward is the rule's (the gradient trick: y = z·(y/z) with the ratio a constant, so input × gradient hands each
output's relevance on in the rule's proportions). Nothing is patched on torch or on the model.

The rules are AttnLRP's (Achtibat et al., ICML 2024) for ViTs: CP-LRP inside attention (the probabilities are
constants), the identity rule for normalisation (1/σ or 1/rms a constant) and for element-wise activations
(y = x·(f(x)/x)), the uniform rule for the product of a gated MLP's two branches (each gets half of the product's
relevance), and optionally the generalised γ-rule on the linear layers (Montavon et al. 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, RmsNorm, SwiGLU

from ..errors import ModelError, ParameterError

__all__ = ["Rules", "apply_norm", "apply_linear", "apply_mlp", "gamma_rule", "uniform_product"]

_RMS_NORMS = (RmsNorm, torch.nn.RMSNorm)


@dataclass(frozen=True)
class Rules:
    """Backward rules of relevance propagation, as constants in the backward (the forward is unchanged).

    ``constant_attention``: the softmax probabilities A are constants, so relevance flows through the values only
    (CP-LRP, Ali et al. 2022; AttnLRP's recommendation for ViTs). ``constant_norms``: a LayerNorm's 1/σ (a RmsNorm's
    1/rms) is a constant, the centring stays (the identity rule for normalisation). ``identity_activations``:
    GELU/SiLU pass relevance on unchanged, y = x · (f(x)/x) with the ratio constant (the identity rule); a gated
    MLP's product then splits its relevance evenly between its two branches (the uniform rule). ``gamma``: the
    generalised γ-rule on the blocks' linear layers (the value projection, the attention's output projection, the
    MLP's): each output's contributions x_j·w_jk of its own sign are weighted 1 + γ, so relevance favours what
    supports the output over what cancels (Montavon et al. 2019; γ = 0 is LRP-0, the plain gradient × input).
    ``gamma_blocks`` (first, last): the γ-rule in these blocks only (counted from 0, both included), LRP-0 in the
    others, as in Montavon et al.'s composites that give layers of different depth different rules; ``None``: every
    block. The walk asks :meth:`at` for each block's rules.
    """

    constant_attention: bool = True
    constant_norms: bool = True
    identity_activations: bool = True
    gamma: float = 0.0
    gamma_blocks: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not (self.gamma >= 0.0 and math.isfinite(self.gamma)):
            raise ParameterError(f"gamma must be a finite number of at least 0, got {self.gamma!r}")
        if self.gamma_blocks is not None and not 0 <= self.gamma_blocks[0] <= self.gamma_blocks[1]:
            raise ParameterError(f"the γ-rule's blocks must be a range first <= last from 0, got {self.gamma_blocks}")

    def at(self, layer: int) -> Rules:
        """The rules of block ``layer``: these, or LRP-0 outside ``gamma_blocks``."""
        if self.gamma_blocks is None:
            return self
        first, last = self.gamma_blocks
        return replace(self, gamma_blocks=None) if first <= layer <= last else replace(self, gamma=0.0,
                                                                                       gamma_blocks=None)


def apply_norm(norm: torch.nn.Module, x: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """``norm(x)``; under ``constant_norms`` a LayerNorm's 1/σ or a RmsNorm's 1/rms is a constant of the backward."""
    if rules is None or not rules.constant_norms or isinstance(norm, torch.nn.Identity):
        return norm(x)
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    elif not isinstance(norm, _RMS_NORMS):
        raise ModelError(f"relevance propagation has no rule for a {type(norm).__name__} normalisation yet: choose "
                         "another method")
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # torch's RMSNorm: eps=None means this
    y = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    if getattr(norm, "weight", None) is not None:
        y = y * norm.weight
    return y + norm.bias if getattr(norm, "bias", None) is not None else y


def apply_linear(linear: torch.nn.Module, x: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """``linear(x)``; under the γ-rule the same forward value with the γ-rule's backward (:func:`gamma_rule`)."""
    y = linear(x)
    if rules is None or rules.gamma == 0.0:
        return y
    return gamma_rule(x, y, linear.weight, linear.bias, rules.gamma)


def gamma_rule(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               gamma: float) -> torch.Tensor:
    """y = x·wᵀ + b, the same value, with a backward through z_k + γ·(z_k⁺ if y_k > 0 else z_k⁻), z_k⁺/z_k⁻ the
    sums of output k's positive/negative contributions x_j·w_kj (bias included), times the constant y_k / that:
    x_j·∂̃/∂x_j then hands output k's relevance to the inputs in proportion to x_j·w_kj + γ·(x_j·w_kj of y_k's sign).

    Σ_j (x_j·w_kj)⁺ = (Σ_j |x_j|·|w_kj| + Σ_j x_j·w_kj) / 2, so one product (|x|·|w|ᵀ) joins the layer's own, in the
    forward and in the backward: the rule costs a second linear layer, not the four of x⁺, x⁻ times w⁺, w⁻."""
    plain = y if b is None else y - b
    zp = (F.linear(x.abs(), w.abs()) + plain) / 2  # the positive contributions
    if b is not None:
        zp = zp + b.clamp(min=0)
    zn = y - zp  # the negative ones: y is their sum
    z = y + gamma * torch.where(y > 0, zp, zn)
    z_safe = torch.where(z == 0, torch.ones_like(z), z)  # z = 0 only where every contribution is 0: y = 0 too
    return z * (y / z_safe).detach()


def _activation(act: torch.nn.Module, x: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """``act(x)``; under ``identity_activations``, x · (act(x)/x) with the ratio a constant of the backward."""
    y = act(x)
    if rules is None or not rules.identity_activations:
        return y
    ratio = torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x))
    return x * ratio.detach()


def uniform_product(a: torch.Tensor, b: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """a ⊙ b; under ``identity_activations`` its gradient halved, so input × gradient gives each factor half of the
    product's relevance (AttnLRP's uniform rule: a·∂(ab)/∂a = b·∂(ab)/∂b = ab, twice the relevance without it)."""
    y = a * b
    if rules is None or not rules.identity_activations:
        return y
    return 0.5 * y + 0.5 * y.detach()


def apply_mlp(mlp: torch.nn.Module, x: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """timm's ``Mlp`` (fc1, act, norm, fc2), ``SwiGLU`` (act(fc1_g) ⊙ fc1_x, norm, fc2) and ``GluMlp`` (fc1 split in
    two halves, one through act, their product) with the rules; dropouts are identities in eval mode."""
    if rules is None:
        return mlp(x)
    if type(mlp) is Mlp:
        hidden = _activation(mlp.act, apply_linear(mlp.fc1, x, rules), rules)
    elif type(mlp) is SwiGLU:  # EVA-02, DINOv3's large models: two projections, one gated
        gate = _activation(mlp.act, apply_linear(mlp.fc1_g, x, rules), rules)
        hidden = uniform_product(gate, apply_linear(mlp.fc1_x, x, rules), rules)
    elif type(mlp) is GluMlp:  # one projection split into value and gate halves
        first, second = apply_linear(mlp.fc1, x, rules).chunk(2, dim=getattr(mlp, "chunk_dim", -1))
        hidden = (uniform_product(first, _activation(mlp.act, second, rules), rules) if mlp.gate_last else
                  uniform_product(_activation(mlp.act, first, rules), second, rules))
    else:
        raise ModelError(f"relevance propagation has no rule for a {type(mlp).__name__} MLP yet: choose another "
                         "method")
    return apply_linear(mlp.fc2, apply_norm(mlp.norm, hidden, rules), rules)
