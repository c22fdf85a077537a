"""What a new user waits for, measured in a real browser (issue 13's rows): runs the browser test's first-visit test
(``vitviz app`` started fresh, headless Chromium) and prints its timings as a table.

    .venv/bin/python benchmarks/latency.py [--out benchmarks/results-latency.md]

Targets on an idle 2-core CPU: first page <= 5 s after the server starts, upload -> figure <= 1.5 s and a sidebar
control -> updated view <= 1 s on a warm server. The server warms its caches while it starts (vitviz.app.launch);
the first example is the one it warmed. Timings on a loaded machine are upper bounds: check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"server start to first page": 5.0, "upload to figure": 1.5, "sidebar control to updated view": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "latency.json"
        env = {**os.environ, "VITVIZ_LATENCY_JSON": str(report), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py",
                        "-k", "first_visit"], cwd=ROOT, env=env, check=True)
        timings = json.loads(report.read_text())
    load = os.getloadavg()[0]
    lines = [f"Browser latency (headless Chromium, `vitviz app`, load average {load:.2f} at the end)", "",
             "| step | seconds | target |", "|---|---:|---:|"]
    for step, seconds in timings.items():
        target = TARGETS.get(step)
        verdict = "" if target is None else f"≤ {target:g} s {'met' if seconds <= target else 'missed'}"
        lines.append(f"| {step} | {seconds:.2f} | {verdict} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
