"""The house rules, checked: only the app package imports streamlit, short functions, a short entry point, views
registered in one list, one definition of the server options, the package root's API, and the installed commands."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import vitviz

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vitviz"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_app_package_imports_streamlit():
    offenders = [p.relative_to(ROOT) for p in _modules()
                 if "streamlit" in _imports(p) and (PACKAGE / "app") not in p.parents]
    assert not offenders, f"the library must not import streamlit: {offenders}"
    assert any("streamlit" in _imports(p) for p in (PACKAGE / "app").rglob("*.py")), "the check must see the app"


def test_no_function_runs_past_50_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def test_app_py_is_a_short_entry_point():
    lines = (ROOT / "app.py").read_text().splitlines()
    assert len(lines) < 80
    assert "streamlit" not in _imports(ROOT / "app.py"), "app.py only calls vitviz.app.main"


def test_every_view_module_is_registered_once_and_has_render():
    from vitviz.app.views import VIEWS

    found = {m.name for m in pkgutil.iter_modules([str(PACKAGE / "app" / "views")]) if not m.name.startswith("_")}
    assert {v.__name__.rsplit(".", 1)[1] for v in VIEWS} == found and len(VIEWS) == len(found)
    assert all(callable(v.render) and isinstance(v.TITLE, str) for v in VIEWS)
    assert len({v.TITLE for v in VIEWS}) == len(VIEWS)


def test_server_options_are_defined_once():
    """.streamlit/config.toml (for ``streamlit run app.py``) says what vitviz.app.config passes to ``vitviz app``."""
    from vitviz.app.config import SERVER_OPTIONS
    from vitviz.models.checkpoints import MAX_CHECKPOINT_UPLOAD_BYTES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    toml = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    flat = {f"{section}.{k}": v for section, opts in toml.items() for k, v in opts.items()}
    assert flat == SERVER_OPTIONS
    assert SERVER_OPTIONS["server.maxUploadSize"] * 10**6 == MAX_CHECKPOINT_UPLOAD_BYTES
    assert SERVER_OPTIONS["server.fileWatcherType"] == "none", "never watch the checkout (and its venv)"


def test_the_package_root_re_exports_the_main_api():
    from vitviz import Settings, analyze, explain, faithfulness, get_model, load_image, rollout_map

    assert analyze is importlib.import_module("vitviz.analysis.onepass").analyze
    assert rollout_map is importlib.import_module("vitviz.analysis.maps").rollout_map
    assert get_model is importlib.import_module("vitviz.models.build").get_model
    assert load_image is importlib.import_module("vitviz.inputs.image").load_image
    assert Settings is importlib.import_module("vitviz.settings").Settings
    assert explain is importlib.import_module("vitviz.explain") and callable(explain.explain)
    assert faithfulness is importlib.import_module("vitviz.metrics.faithfulness") and callable(faithfulness.curves)
    with pytest.raises(AttributeError):
        vitviz.not_a_thing  # noqa: B018


@pytest.mark.parametrize("package", ["vitviz", "vitviz.walk", "vitviz.models", "vitviz.inputs", "vitviz.analysis",
                                     "vitviz.explain", "vitviz.metrics", "vitviz.experiments",
                                     "vitviz.figures"])
def test_every_exported_name_imports(package):
    """Each name a package's ``__all__`` promises is really there (a lazy table can name a module or an attribute
    that does not exist: this imports each one)."""
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        try:
            getattr(module, name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, missing


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _edges(path: Path, known: set[str]) -> set[str]:
    """Modules of vitviz that ``path`` imports anywhere in it (function-level imports too): ``from X import y``
    counts X, and X.y where that is a module."""
    me = _module_name(path)
    base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            if mod in known:
                out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
    return out - {me}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    paths = _modules()
    known = {_module_name(p) for p in paths}
    graph = {_module_name(p): _edges(p, known) for p in paths}
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"], "the check must be able to find a cycle"
    assert "vitviz.targets" in graph["vitviz.explain.passes"], "the check must see the imports"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_layers_import_downwards_only():
    """Metrics never import methods (they take finished maps); the library never imports the CLI or the app."""
    paths = _modules()
    known = {_module_name(p) for p in paths}
    for p in paths:
        me, deps = _module_name(p), _edges(p, known)
        if me.startswith("vitviz.metrics"):
            assert not any(d.startswith("vitviz.explain") for d in deps), (me, deps)
        if not me.startswith(("vitviz.cli", "vitviz.app", "vitviz.__main__")):
            assert not any(d.startswith(("vitviz.cli", "vitviz.app")) for d in deps), (me, deps)


def test_no_library_module_runs_past_500_lines():
    long = [f"{p.relative_to(ROOT)} ({n})" for p in _modules() if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long


def test_version_needs_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, vitviz.cli as c; c.main(['--version'])"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == f"vitviz {vitviz.__version__}"
    probe = "import sys, vitviz; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() == "False"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vitviz_app_serves_the_page(tmp_path):
    """``vitviz app --port N`` with streamlit options passed through, started from outside the checkout."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "vitviz", "app", "--port", str(port), "--server.address",
                             "127.0.0.1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.monotonic() + 60, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body == "ok", proc.stdout.read1().decode() if proc.poll() is not None else "no answer"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert "<title>Streamlit</title>" in page or "streamlit" in page.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
