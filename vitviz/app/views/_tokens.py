"""What the token views share: the layer they look at (one control for all of them) and naming tokens."""

from __future__ import annotations

import streamlit as st

from ..state import keep

__all__ = ["layer_ui", "token_name"]


def layer_ui(ctx, label: str = "Layer (the token views share it)") -> int:
    depth = ctx.info.depth
    keep("tokens_layer", lambda v: isinstance(v, int) and 0 <= v < depth, depth - 1)
    return st.selectbox(label, list(range(depth)), key="tokens_layer",
                        help="Block outputs are numbered from 0, as timm's blocks and the other layer controls.")


def token_name(info, t: int) -> str:
    """'CLS', 'register 2', 'distillation', or 'patch 17 (row 1, col 3)' for token index t."""
    regs = info.num_reg_tokens
    cls = int(info.has_class_token)
    if t < cls:
        return "CLS"
    if t < cls + regs:
        return f"register {t - cls}"
    if t < info.num_prefix_tokens:
        return "distillation"
    r, c = divmod(t - info.num_prefix_tokens, info.grid[1])
    return f"patch {t - info.num_prefix_tokens} (row {r}, col {c})"
