"""Where vitviz's overhead comes from, and what would remove it: measured alternatives, not library code.

``.venv/bin/python benchmarks/experiments.py [--cases default-p14 default-p8] [--groups capture after threads memory]``

Groups (each timed interleaved, as in bench.py; ratios against the plain fused forward):

- ``capture``: timm's own unfused forward (explicit softmax, nothing kept), vitviz's ``attention_forward`` as it
  is (fp32 and fp16 storage, and kept on the device), and two rewrites of the capture loop written here:
  ``inplace`` (logits by ``baddbmm`` straight into one preallocated (L, B, H, T, T) buffer, softmax in place there:
  no per-layer copy, no ``torch.stack``) and ``sdpa+probs`` (SDPA for the block output, probabilities computed
  on the side).
- ``after``: the steps after the pass (pos-embed similarity, ``rollout_matrices``, ``rollout_all``, grid + astype)
  and in-place / top-k-direction rewrites of ``rollout_matrices``.
- ``threads``: ``rollout_table`` and the whole analysis at 1 thread vs the process setting.
- ``memory``: peak RSS delta of ``attention_forward`` vs the ``inplace`` capture (a fresh subprocess each).

Every rewrite is checked against vitviz's own result before it is timed (max abs difference printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from _timing import median_ms, min_ms  # noqa: E402

from vitviz.analysis.maps import rollout_table  # noqa: E402
from vitviz.analysis.posembed import patch_pos_embed, pos_embed_similarity  # noqa: E402
from vitviz.analysis.rollout import rollout_all, rollout_matrices, tokens_to_grid  # noqa: E402
from vitviz.walk.capture import attention_forward  # noqa: E402

__all__ = [
    "capture_inplace",
    "capture_sdpa_probs",
    "rollout_matrices_inplace",
    "discard_by_keep",
    "rollout_all_abnar",
    "main",
]


# -------------------------------------------------------------------------------------------- capture rewrites


def _qkv(attn, x: torch.Tensor):
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, H, T, d)
    return attn.q_norm(q), attn.k_norm(k), v


def _probs_into(q: torch.Tensor, k: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ·scale) written into ``out`` (B, H, T, T) in place: one buffer, no temporaries of (T, T)."""
    B, H, T, d = q.shape
    flat = out.view(B * H, T, T)
    torch.baddbmm(flat, q.reshape(B * H, T, d), k.reshape(B * H, T, d).transpose(1, 2), beta=0, alpha=scale, out=flat)
    return torch.ops.aten._softmax.out(out, -1, False, out=out)


def _attn_inplace(attn, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q, k, v = _qkv(attn, x)
    probs = _probs_into(q, k, attn.scale, out)
    y = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
    return attn.proj(attn.norm(y))


def _attn_sdpa(attn, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q, k, v = _qkv(attn, x)
    _probs_into(q, k, attn.scale, out)  # the picture, on the side
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
    return attn.proj(attn.norm(y))


def _walk(model, x: torch.Tensor, attn_fn, *, store_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Blocks walked as vitviz does, each layer's probabilities written into one (L, B, H, T, T) buffer.

    With a ``store_dtype`` other than the compute dtype, each layer is computed in one reused (B, H, T, T) scratch
    and copied into the (smaller) store.
    """
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    B, T, _ = t.shape
    shape = (len(model.blocks), B, model.blocks[0].attn.num_heads, T, T)
    buf = torch.empty(shape, device=t.device, dtype=store_dtype or t.dtype)
    scratch = None if buf.dtype == t.dtype else torch.empty(shape[1:], device=t.device, dtype=t.dtype)
    for layer, blk in enumerate(model.blocks):
        out = buf[layer] if scratch is None else scratch
        if type(blk) is ResPostBlock:
            t = t + blk.norm1(attn_fn(blk.attn, t, out))
            t = t + blk.norm2(blk.mlp(t))
        else:
            t = t + blk.ls1(attn_fn(blk.attn, blk.norm1(t), out))
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        if scratch is not None:
            buf[layer].copy_(scratch)
    model.norm(t)
    return buf.transpose(0, 1)  # (B, L, H, T, T), a view: no copy


def capture_inplace(model, x: torch.Tensor, *, store_dtype: torch.dtype | None = None) -> torch.Tensor:
    return _walk(model, x, _attn_inplace, store_dtype=store_dtype)


def capture_sdpa_probs(model, x: torch.Tensor) -> torch.Tensor:
    return _walk(model, x, _attn_sdpa)


# -------------------------------------------------------------------------------------------- rollout rewrites


def rollout_matrices_inplace(attn: torch.Tensor) -> torch.Tensor:
    """Mean fusion, no discard: (L, H, T, T) -> (L, T, T) with one new tensor, identity and row norm in place."""
    a = attn.mean(dim=-3)
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return a.div_(a.sum(dim=-1, keepdim=True))


def discard_by_keep(a: torch.Tensor, ratio: float, *, keep_column: int = 0) -> torch.Tensor:
    """``discard_lowest`` choosing the smaller top-k: keep the largest (T·T - num) when that is fewer entries."""
    T = a.shape[-1]
    num = int(ratio * T * (T - 1))
    keep = T * T - num  # the protected column (T entries, +inf) is always among the kept
    if num == 0 or num <= keep:
        from vitviz.analysis.rollout import discard_lowest

        return discard_lowest(a, ratio, keep_column=keep_column)
    flat = a.reshape(-1, T * T)
    cand = flat.clone()
    cand.view(-1, T, T)[:, :, keep_column] = float("inf")
    idx = cand.topk(keep, dim=-1, largest=True, sorted=False).indices
    return torch.zeros_like(flat).scatter_(-1, idx, flat.gather(-1, idx)).view(a.shape)


def rollout_all_abnar(mats: torch.Tensor, *, source: int = 0) -> torch.Tensor:
    """Every range in one sweep in Abnar & Zuidema's order: [a, b] = row ``source`` of Â_b ··· Â_a (later layers
    on the left, as vit-explain's ``result = Â_l @ result``). Sweeping the start a downward, the rows of all ends
    b > a advance together: the same cost as ``rollout_all``. (L, T, T) -> (L, L, T), NaN for a > b.
    """
    L, T, _ = mats.shape
    out = torch.full((L, L, T), float("nan"), dtype=mats.dtype, device=mats.device)
    rows = mats[:, source, :].clone()  # rows[b] = e_sᵀ Â_b ··· Â_a so far; starts as e_sᵀ Â_b
    for a in range(L - 1, -1, -1):
        if a < L - 1:
            rows[a + 1:] = rows[a + 1:] @ mats[a]
        out[a, a:] = rows[a:]
    return out


def _full_products(mats: torch.Tensor, start: int, end: int) -> torch.Tensor:
    result = torch.eye(mats.shape[-1], dtype=mats.dtype)
    for layer in range(start, end + 1):
        result = mats[layer] @ result  # vit-explain / Abnar & Zuidema order
    return result[0]


# ------------------------------------------------------------------------------------------------------ groups


def _table(title: str, times: dict[str, list[float]], floor: float | None = None) -> str:
    rows = [f"### {title}", "", "| variant | median ms | min ms |" + (" × plain |" if floor else ""),
            "|---|---:|---:|" + ("---:|" if floor else "")]
    for k, v in times.items():
        med = median_ms(v)
        rows.append(f"| {k} | {med:.2f} | {min_ms(v):.2f} |" + (f" {med / floor:.2f} |" if floor else ""))
    return "\n".join(rows) + "\n"


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
    return f"- {name}: max |Δ| vs vitviz = {(got.float() - want.float()).abs().max().item():.2e}"


def capture_group(case: bench.Case, args) -> str:
    model, x = case.model, case.x
    unfused = copy.deepcopy(model)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    with torch.inference_mode():
        ref = attention_forward(model, x).attention
        notes = [_check("inplace", capture_inplace(model, x), ref),
                 _check("inplace fp16", capture_inplace(model, x, store_dtype=torch.float16), ref),
                 _check("sdpa+probs", capture_sdpa_probs(model, x), ref)]
    t = bench.time_interleaved({
        "plain (fused SDPA)": lambda: model(x),
        "timm unfused, nothing kept": lambda: unfused(x),
        "attention_forward (fp32, to CPU, stack)": lambda: attention_forward(model, x),
        "attention_forward (fp16 storage)": lambda: attention_forward(model, x, store_dtype=torch.float16),
        "attention_forward (store_device=None)": lambda: attention_forward(model, x, store_device=None),
        "inplace: baddbmm + softmax into one buffer": lambda: capture_inplace(model, x),
        "inplace, fp16 store (fp32 scratch per layer)": lambda: capture_inplace(model, x, store_dtype=torch.float16),
        "sdpa+probs: SDPA output, probs on the side": lambda: capture_sdpa_probs(model, x),
    }, device=case.device, repeats=args.repeats, warmup=args.warmup)
    floor = median_ms(t["plain (fused SDPA)"])
    return _table(f"capture — {case.name} ({case.info.num_tokens} tokens)", t, floor) + "\n".join(notes) + "\n"


def after_group(case: bench.Case, args) -> str:
    info = case.info
    with torch.inference_mode():
        att = attention_forward(case.model, case.x).attention[0].numpy()
    A = torch.from_numpy(att)
    mats = rollout_matrices(A)
    table = rollout_all(mats)
    mats_d = rollout_matrices(A, discard_ratio=0.9)
    notes = [_check("rollout_matrices_inplace", rollout_matrices_inplace(A), mats)]
    fused = A.mean(dim=-3)
    keep = discard_by_keep(fused, 0.9)
    keep = keep + torch.eye(keep.shape[-1])
    notes.append(_check("discard_by_keep (0.9)", keep / keep.sum(-1, keepdim=True), mats_d))
    L, abnar = mats.shape[0], rollout_all_abnar(mats)
    for a, b in ((0, L - 1), (1, L - 1), (L // 4, 3 * L // 4)):
        want = _full_products(mats.double(), a, b)
        notes.append(f"- range {a}..{b}: max |Δ| vs full products Â_b···Â_a: rollout_all_abnar "
                     f"{(abnar[a, b].double() - want).abs().max().item():.1e}, vitviz rollout_all "
                     f"{(table[a, b].double() - want).abs().max().item():.1e}")
    grid = dict(num_prefix_tokens=info.num_prefix_tokens, grid=info.grid)
    t = bench.time_interleaved({
        "pos-sim (patch_pos_embed + cosine + numpy)":
            lambda: pos_embed_similarity(patch_pos_embed(case.model)).cpu().numpy().astype(np.float32),
        "rollout_matrices (mean)": lambda: rollout_matrices(A),
        "rollout_matrices_inplace (mean)": lambda: rollout_matrices_inplace(A),
        "rollout_matrices (mean, discard 0.9)": lambda: rollout_matrices(A, discard_ratio=0.9),
        "discard_by_keep (0.9) on fused": lambda: discard_by_keep(fused, 0.9),
        "rollout_all": lambda: rollout_all(mats),
        "rollout_all_abnar (same sweep, Abnar order)": lambda: rollout_all_abnar(mats),
        "tokens_to_grid + numpy + astype": lambda: tokens_to_grid(table, **grid).numpy().astype(np.float32),
        "rollout_table (all of it)": lambda: rollout_table(att, info=info),
    }, device=torch.device("cpu"), repeats=args.repeats, warmup=args.warmup)
    return _table(f"after the pass — {case.name} ({info.num_tokens} tokens)", t) + "\n".join(notes) + "\n"


def _with_threads(n: int, fn):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def threads_group(case: bench.Case, args) -> str:
    with torch.inference_mode():
        att = attention_forward(case.model, case.x).attention[0].numpy()
    n = torch.get_num_threads()
    t = bench.time_interleaved({
        f"plain, {n} threads": lambda: case.model(case.x),
        "plain, 1 thread": _with_threads(1, lambda: case.model(case.x)),
        f"full analysis, {n} threads": lambda: bench.full_analysis(case),
        "full analysis, 1 thread": _with_threads(1, lambda: bench.full_analysis(case)),
        f"rollout_table, {n} threads": lambda: rollout_table(att, info=case.info),
        "rollout_table, 1 thread": _with_threads(1, lambda: rollout_table(att, info=case.info)),
    }, device=case.device, repeats=args.repeats, warmup=args.warmup)
    return _table(f"threads — {case.name} ({case.info.num_tokens} tokens)", t)


def _memory_child(case_name: str, variant: str) -> dict:
    case = bench.build_case(case_name, device=torch.device("cpu"), dtype=torch.float32)
    fn = {"plain": lambda: case.model(case.x),
          "attention_forward": lambda: attention_forward(case.model, case.x).attention,
          "attention_forward fp16": lambda: attention_forward(case.model, case.x, store_dtype=torch.float16).attention,
          "inplace": lambda: capture_inplace(case.model, case.x),
          "inplace fp16": lambda: capture_inplace(case.model, case.x, store_dtype=torch.float16)}[variant]
    with torch.inference_mode():
        fn()
    before, delta = bench.peak_memory(fn, device=torch.device("cpu"))
    return dict(before=before, delta=delta)


def memory_group(case: bench.Case, args) -> str:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    rows = [f"### peak RSS delta — {case.name} ({case.info.num_tokens} tokens)", "",
            "| variant | peak delta MiB | × plain |", "|---|---:|---:|"]
    found = {}
    for v in ("plain", "attention_forward", "attention_forward fp16", "inplace", "inplace fp16"):
        cmd = [sys.executable, __file__, "--_memory", case.name, v, "--threads", str(args.threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        found[v] = json.loads(done.stdout.strip().splitlines()[-1])["delta"]
        rows.append(f"| {v} | {found[v] / 2**20:.1f} | {found[v] / max(found['plain'], 1):.2f} |")
    return "\n".join(rows) + "\n"


GROUPS = {"capture": capture_group, "after": after_group, "threads": threads_group, "memory": memory_group}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["default-p14", "default-p8"], choices=list(bench.CASES))
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory:
        print(json.dumps(_memory_child(*args._memory)))
        return 0
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}\n")
    for name in args.cases:
        case = bench.build_case(name, device=torch.device("cpu"), dtype=torch.float32)
        for g in args.groups:
            print(GROUPS[g](case, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
