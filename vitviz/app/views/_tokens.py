"""What the token views share: naming tokens and the two images. (Their one layer is the section's control,
``ctx.token_layer``.)"""

from __future__ import annotations

from ..widgets import md_escape

__all__ = ["token_name", "image_titles"]


def image_titles(ctx) -> tuple[str, str]:
    """The Markdown names of the two images a view shows side by side: "**Your image** (cat.jpg)" and
    "**Second image**: dog.jpg" (file names escaped: shown as typed)."""
    second = ctx.second_image.source_name if ctx.second_image is not None else ""
    return f"**Your image** ({md_escape(ctx.image.source_name)})", f"**Second image**: {md_escape(second)}"


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
