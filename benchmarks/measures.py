"""The default explanation chosen by measures no method optimizes: a report from ``vitviz evaluate``'s rows.

``.venv/bin/python benchmarks/measures.py ROWS.csv --out benchmarks/results-measures.md [--costs COSTS.csv]``

The rows come from one ``vitviz evaluate`` run over the shared photos with every perturbation and read-out and
``--sensitivity-n`` (the exact command is in the report). For each method and measure: the mean score over the
photos with a 95% percentile-bootstrap interval. The rule: greedy deletion removes tokens to lower the CLS
embedding's cosine, so token removal read by the CLS embedding is its own objective; every other measure (token
removal read by the mean patch token; mean fill, blur and ROAD imputation read by either; sensitivity-n read by
either) is one no method here was built to maximise. Each method is ranked on each of those measures (1 = best),
and the default is the method with the best mean rank among those that cost at most ``--max-cost`` plain forwards
(``--costs``: a CSV of method,ratio measured side by side, e.g. by ``benchmarks/faithfulness.py --timing``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vitviz.evaluate import bootstrap_interval  # noqa: E402

OWN = ("tokens", "cls")  # greedy deletion's own objective
ORDER = ("tokens", "pixels", "blur", "road", "sensitivity-n")


def read_rows(path: Path) -> dict[tuple[str, str, str], list[float]]:
    """(method, perturbation, readout) -> the finite scores over the photos."""
    scores: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            v = float(r["score"])
            if np.isfinite(v):
                scores[(r["method"], r["perturbation"], r["readout"])].append(v)
    return scores


def measures(scores) -> list[tuple[str, str]]:
    found = {(p, r) for _m, p, r in scores}
    return sorted(found, key=lambda m: (ORDER.index(m[0]) if m[0] in ORDER else 99, m[1]))


def mean_ranks(scores, methods: list[str]) -> dict[str, float]:
    """The mean rank of each method over the held-out measures (the random baseline not ranked)."""
    ranked = defaultdict(list)
    for measure in measures(scores):
        if measure == OWN:
            continue
        means = {m: np.mean(scores[(m, *measure)]) for m in methods if (m, *measure) in scores}
        for rank, m in enumerate(sorted(means, key=lambda k: -means[k]), start=1):
            ranked[m].append(rank)
    return {m: float(np.mean(v)) for m, v in ranked.items()}


def report(scores, costs: dict[str, float], max_cost: float, command: str) -> str:
    methods = sorted({m for m, _p, _r in scores if m != "random"})
    ranks = mean_ranks(scores, methods)
    ms = measures(scores)
    cheap = [m for m in methods if costs.get(m, float("inf")) <= max_cost]
    default = min(cheap, key=lambda m: ranks[m]) if cheap else None
    head = "| method | " + " | ".join(f"{p} · {r}" + (" (deletion's own)" if (p, r) == OWN else "") for p, r in ms)
    lines = [head + " | mean rank (held-out) | cost × forward |", "|---|" + "---|" * (len(ms) + 2)]
    for m in sorted([*methods, "random"], key=lambda k: ranks.get(k, 99)):
        cells = []
        for measure in ms:
            v = scores.get((m, *measure))
            if not v:
                cells.append("—")
                continue
            lo, hi = bootstrap_interval(v)
            cells.append(f"{np.mean(v):.3f} [{lo:.3f}, {hi:.3f}]")
        rank = f"{ranks[m]:.2f}" if m in ranks else "—"
        cost = f"{costs[m]:.2f}" if m in costs else "—"
        name = f"**{m}**" if m == default else m
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rank} | {cost} |")
    n = max(len(v) for v in scores.values())
    text = [f"Photos: {n}. Command: `{command}`.", "", *lines, ""]
    if default:
        text.append(f"Default by the rule (best mean rank over the held-out measures among methods costing ≤ "
                    f"{max_cost:g}× a forward): **{default}**.")
    return "\n".join(text) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--costs", type=Path, help="CSV: method,ratio (cost as a multiple of the plain forward)")
    ap.add_argument("--max-cost", type=float, default=3.0)
    ap.add_argument("--command", default="vitviz evaluate ...")
    args = ap.parse_args(argv)
    costs = {}
    if args.costs:
        with args.costs.open(newline="") as f:
            costs = {r["method"]: float(r["ratio"]) for r in csv.DictReader(f)}
    text = report(read_rows(args.rows), costs, args.max_cost, args.command)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
