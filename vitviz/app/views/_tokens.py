"""What the token views share: naming tokens. (Their one layer is the section's control, ``ctx.token_layer``.)"""

from __future__ import annotations

__all__ = ["token_name"]


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
