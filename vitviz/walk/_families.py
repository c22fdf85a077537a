"""timm's ViT families as the walk reads them: which blocks and attentions, and what positions they carry per walk.

- ``vit``: ``VisionTransformer`` (ViT, DeiT, DINOv2, SigLIP image towers) with ``Block``/``ResPostBlock`` and the
  standard ``Attention``; absolute position embeddings added to the tokens;
- ``eva``: ``Eva`` (EVA-02, DINOv3, the ``vit_*_rope_*`` and PE models) with ``EvaBlock``/``EvaBlockPostNorm`` and
  ``EvaAttention``/``AttentionRope``: rotary embeddings (RoPE) turn q and k of the patch tokens (prefix tokens are
  left unturned), optional absolute position embeddings, SwiGLU MLPs, a norm inside attention, layer-scale γ;
- ``beit``: ``Beit`` (BEiT, BEiT-2): a relative position bias added to the attention logits (each block's own
  table, a shared one, or both), layer-scale γ, q and v biases.

Everything here reads the model and returns tensors; nothing is set on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import Attention, AttentionRope, Mlp
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from ..errors import ModelError

__all__ = ["FAMILIES", "Positions", "family", "has_class_token", "num_reg_tokens", "check_family", "embed_tokens",
           "positions", "block_bias", "qkv", "expand_kv", "rotate", "is_plain_mlp", "own_blocks"]

FAMILIES = {"vit": VisionTransformer, "eva": Eva, "beit": Beit}
_BLOCKS = {"vit": ((Block, ResPostBlock), (Attention,)),
           "eva": ((EvaBlock, EvaBlockPostNorm), (EvaAttention, AttentionRope)),
           "beit": ((BeitBlock,), (BeitAttention,))}


def family(model: torch.nn.Module) -> str | None:
    """``"vit"``, ``"eva"`` or ``"beit"``: the timm model class ``model`` is; None for any other model."""
    return next((name for name, cls in FAMILIES.items() if isinstance(model, cls)), None)


def has_class_token(model: torch.nn.Module) -> bool:
    """Whether the sequence starts with a CLS token (VisionTransformer says so; Eva and Beit hold a ``cls_token``)."""
    own = getattr(model, "has_class_token", None)
    return bool(own) if own is not None else getattr(model, "cls_token", None) is not None


def num_reg_tokens(model: torch.nn.Module) -> int:
    """Register tokens after the CLS token (Eva keeps them as ``reg_token`` without counting them)."""
    own = getattr(model, "num_reg_tokens", None)
    if own is not None:
        return int(own)
    reg = getattr(model, "reg_token", None)
    return int(reg.shape[1]) if reg is not None else 0


def check_family(model: torch.nn.Module) -> str:
    """The family of ``model``; a :class:`ModelError` naming what vitviz cannot read otherwise."""
    name = type(model).__name__
    fam = family(model)
    if fam is None:
        raise ModelError(f"{name} is not a plain Vision Transformer: vitviz needs a timm VisionTransformer, Eva "
                         "(EVA-02, DINOv3) or Beit (global self-attention over patch tokens)")
    if fam == "vit" and getattr(model, "pos_embed", None) is None:
        raise ModelError(f"{name} has no absolute position embedding (a VisionTransformer with rotary or relative "
                         "positions is not supported)")
    blocks, attentions = _BLOCKS[fam]
    for i, blk in enumerate(model.blocks):
        if type(blk) not in blocks or type(getattr(blk, "attn", None)) not in attentions:
            raise ModelError(
                f"block {i} of {name} is a {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}: "
                f"vitviz reads {name} blocks of type {', '.join(b.__name__ for b in blocks)} with "
                f"{', '.join(a.__name__ for a in attentions)} only")
    if fam == "eva" and getattr(model, "dynamic_img_size", False) and getattr(model, "rope_mixed", False):
        raise ModelError(f"{name} mixes learned rotary frequencies with dynamic image sizes: not supported")
    return fam


def embed_tokens(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, 3, H, W) -> (B, T, C) as the family's own forward embeds them (before ``norm_pre``), and the number of
    position-embedding rows added to the last rows of the sequence (0 without an absolute position embedding)."""
    fam = family(model)
    pos = getattr(model, "pos_embed", None)
    rows = 0 if pos is None else int(pos.shape[1])
    if fam == "vit":
        return model._pos_embed(model.patch_embed(x)), rows
    if fam == "eva":  # Eva's _pos_embed also returns the rotary embedding, which the walk rebuilds
        t, _rope = model._pos_embed(model.patch_embed(x))
        return t, rows
    t = model.patch_embed(x)  # Beit: CLS, then its absolute position embedding when it has one
    t = torch.cat((model.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
    return (t if pos is None else t + pos), rows


@dataclass(frozen=True)
class Positions:
    """What a family's blocks read besides the tokens, made once per walk from the model's own modules.

    ``rope``: Eva's rotary embedding, sin and cos concatenated, (N, 2d) for the N patches, (B, 1, K, 2d) for the K
    patches each sequence kept, or with a rotation per layer ("mixed") a leading L; ``shared_bias``: Beit's shared
    relative position bias (H, T, T); ``index`` (B, T'): where each token of a shortened sequence sits in the full one.
    """

    rope: torch.Tensor | None = None
    shared_bias: torch.Tensor | None = None
    rope_per_layer: bool = False
    index: torch.Tensor | None = None

    def rope_of(self, layer: int) -> torch.Tensor | None:
        return self.rope[layer] if self.rope is not None and self.rope_per_layer else self.rope

    def bias_of(self, rel: torch.Tensor) -> torch.Tensor:
        """A relative position bias (H, T, T) of the full sequence -> (1, H, T, T), or (B, H, T', T') read at the
        tokens each shortened sequence kept."""
        if self.index is None:
            return rel[None]
        i = self.index
        return rel[:, i[:, :, None], i[:, None, :]].transpose(0, 1)


def positions(model: torch.nn.Module, *, patches: torch.Tensor | None = None) -> Positions:
    """The rotary embedding (Eva) or shared relative position bias (Beit) at the grid in use; empty for a ViT.

    ``patches`` (B, K): the sequences hold the prefix tokens and these patches only (token removal; a ViT's positions
    travel with its tokens, here they are read at the kept patches).
    """
    fam = family(model)
    index = None
    if patches is not None and fam != "vit":
        p = int(model.num_prefix_tokens)
        prefix = torch.arange(p, device=patches.device).expand(patches.shape[0], -1)
        index = torch.cat([prefix, patches + p], dim=1)
    if fam == "eva" and model.rope is not None:
        grid = [int(v) for v in model.patch_embed.grid_size]
        # as Eva._pos_embed: a rotary module with a fixed grid holds its embedding, the others build it for a shape
        if getattr(model, "dynamic_img_size", False) or not hasattr(model.rope, "feat_shape"):
            rope = model.rope.get_embed(shape=grid)
        else:
            rope = model.rope.get_embed()
        mixed = bool(getattr(model, "rope_mixed", False))
        if patches is not None:  # (B, 1, K, 2d), or (L, B, H, K, 2d) per layer
            rope = rope[:, :, patches].permute(0, 2, 1, 3, 4) if mixed else rope[patches][:, None]
        return Positions(rope=rope, rope_per_layer=mixed, index=index)
    if fam == "beit" and model.rel_pos_bias is not None:
        return Positions(shared_bias=_gather_bias(model.rel_pos_bias.relative_position_bias_table,
                                                  model.rel_pos_bias.relative_position_index), index=index)
    return Positions(index=index)


def _gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """BEiT's relative position bias: table (R, H) read at the index (T, T) of each query-key offset -> (H, T, T)."""
    return table[index].permute(2, 0, 1)


def block_bias(attn: torch.nn.Module, shared: torch.Tensor | None) -> torch.Tensor | None:
    """The logit bias (H, T, T) of a Beit attention: its own relative position bias plus the shared one."""
    table = getattr(attn, "relative_position_bias_table", None)
    own = None if table is None else _gather_bias(table, attn.relative_position_index)
    if own is None:
        return shared
    return own if shared is None else own + shared


def qkv(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T, d), k and v (B, H_kv, T, d) of an Eva or Beit attention, q and k normed by the attention's own
    q/k norms (if any); H_kv < H for grouped-query attention (:func:`expand_kv` after the rotation)."""
    B, T, _ = x.shape
    H = attn.num_heads
    if attn.qkv is not None:
        bias = getattr(attn, "q_bias", None)
        if bias is not None:  # EVA/BEiT: q and v biases, k none (a zero buffer)
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        out = torch.nn.functional.linear(x, attn.qkv.weight, bias if bias is not None else attn.qkv.bias)
        q, k, v = out.reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(B, T, H, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, T, -1, q.shape[-1]).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, T, -1, q.shape[-1]).transpose(1, 2)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return q, k, v


def expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each k/v head repeated for its group of query heads (head h reads kv head h // g)."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _turn(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool) -> torch.Tensor:
    """x·cos + x̃·sin, x̃ the 90° turn of each pair of channels: (x_i, x_{i+d/2}) with ``half``, else (x_2i, x_2i+1)."""
    if half:
        a, b = x.chunk(2, dim=-1)
        turned = torch.cat([-b, a], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return (x * cos + turned * sin).to(x.dtype)


def rotate(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor,
           rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al. 2021) on q and k (B, H, T, d) of the patch tokens; the prefix tokens keep theirs unturned."""
    if rope is None:
        return q, k
    npt = int(attn.num_prefix_tokens)
    sin, cos = rope.chunk(2, dim=-1)
    half = bool(getattr(attn, "rotate_half", False))
    q = torch.cat([q[:, :, :npt], _turn(q[:, :, npt:], sin, cos, half)], dim=2)
    k = torch.cat([k[:, :, :npt], _turn(k[:, :, npt:], sin, cos, half)], dim=2)
    return q, k


def is_plain_mlp(mlp: torch.nn.Module) -> bool:
    """Whether ``mlp`` is timm's fc1-act-norm-fc2 ``Mlp`` (relevance rules exist for it; not for gated MLPs)."""
    return type(mlp) is Mlp


def own_blocks(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The family's own block forwards (timm's fused attention, no probabilities): (B, T, C) -> (B, T, C), un-normed.

    A ViT's ``model.blocks(tokens)``; Eva's and Beit's blocks take the rotary embedding or shared bias besides.
    """
    fam = family(model)
    if fam == "vit":
        return model.blocks(tokens)
    pos = positions(model)
    for layer, blk in enumerate(model.blocks):
        if fam == "eva":
            tokens = blk(tokens, rope=pos.rope_of(layer))
        else:
            tokens = blk(tokens, shared_rel_pos_bias=None if pos.shared_bias is None else pos.shared_bias[None])
    return tokens
