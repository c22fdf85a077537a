"""The Experiments section through AppTest: both views render on a tiny classifier and on a backbone, show their
numbers, and the numbers are the library's on the image the analysis ran on; moving a control never runs the
analysis pass again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import streamlit as st
import timm
import torch
from streamlit.testing.v1 import AppTest

import vitviz.analysis.onepass

APP = str(Path(__file__).resolve().parents[1] / "app.py")
ARCH = "vit_tiny_patch16_224"  # 3 heads, P = 16
DEPTH, HEADS, CLASSES = 2, 3, ("cat", "dog", "bird", "fish", "frog")
TIMEOUT = 60


def _checkpoint(path: Path, num_classes: int) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=num_classes, img_size=64, depth=DEPTH)
    meta = {"arch": ARCH, "kwargs": json.dumps({"depth": DEPTH, "img_size": 64})}
    if num_classes:
        meta["class_names"] = json.dumps(list(CLASSES))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


@pytest.fixture(params=[len(CLASSES), 0], ids=["classifier", "backbone"])
def app_model(request, tmp_path, monkeypatch) -> list[int]:
    """Fresh caches, a tiny checkpoint (with a head or without) as the app's model, and a count of analysis passes."""
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setenv("VITVIZ_APP_MODEL", str(_checkpoint(tmp_path / "tiny.safetensors", request.param)))
    monkeypatch.delenv("VITVIZ_APP_ARCH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("VITVIZ_CHECKPOINT_DIR", raising=False)
    seen: list[int] = []
    real = vitviz.analysis.onepass.analyze_batch

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vitviz.analysis.onepass, "analyze_batch", counting)
    return seen


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _open(view: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="example").set_value("cat.jpg").run()
    at.slider(key="img_size").set_value(64).run()  # a 4 x 4 grid: the tests stay fast
    at.segmented_control(key="section").set_value("Experiments")
    at.session_state["tab_experiments"] = view
    return at.run()


def _text(at: AppTest) -> str:
    return "\n".join(m.value for block in (at.tabs or [at.main]) for m in block.markdown)


def _charts(at: AppTest) -> set[str]:
    return {el.key for el in at.get("plotly_chart")}


def test_remove_positions_shows_the_variants_side_by_side(app_model):
    at = _open("Remove positions")
    _ok(at)
    assert {"Remove positions", "Head ablation"} <= {t.label for t in at.tabs}  # the section's other views beside
    assert _charts(at) == {"fig_posx_intact", "fig_posx_no_position", "fig_posx_shuffled",
                           "fig_posx_shuffled_no_position", "fig_posx_mosaic"}
    text = _text(at)
    cosines = re.findall(r"with the intact run: \*\*(1 − [0-9.e-]+|[0-9.]+)\*\*", text)
    assert len(cosines) == 3 and "with the intact run: the reference" in text
    assert min(float(c) for c in cosines if not c.startswith("1 − ")) < 0.9999  # no positions: a real change
    assert ("Predicts class" in text) == _has_head(at)
    if _has_head(at):
        assert any(f"'{name}'" in text for name in CLASSES)  # the checkpoint's own class names
    passes = len(app_model)
    at.radio(key="posx_map").set_value("last_layer").run()
    _ok(at)
    assert "last layer's CLS attention" in "\n".join(c.value for c in at.tabs[0].caption)
    assert len(app_model) == passes  # the analysis pass is not run again; the experiment is its own cached pass


def _has_head(at: AppTest) -> bool:
    return not any("No class predictions" in c.value for c in at.caption)


def test_head_ablation_table_on_a_button_then_heads_ablated_together(app_model):
    at = _open("Head ablation")
    _ok(at)
    head, passes = _has_head(at), len(app_model)
    assert _charts(at) == set() and "Pick heads above" in at.info[0].value
    if head:
        assert any(f"'{name}'" in at.selectbox(key="ablate_target").options[0] for name in CLASSES)
    at.button(key="ablate_run").click().run()
    _ok(at)
    assert _charts(at) == {"fig_ablate_table"}
    text = _text(at)
    assert ("the probability of '" in text) if head else ("1 − cosine" in text)
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([-+0-9.e]+) \|", text, flags=re.M)
    assert len(rows) == DEPTH * HEADS
    effects = [float(r[3]) for r in rows]
    assert effects == sorted(effects, reverse=True)
    options = at.multiselect(key="ablate_heads").options
    assert len(options) == DEPTH * HEADS
    at.multiselect(key="ablate_heads").set_value(["0:1", "1:2"]).run()
    _ok(at)
    assert _charts(at) == {"fig_ablate_table", "fig_ablate_intact", "fig_ablate_ablated", "fig_ablate_heads"}
    assert "Without 2 head(s)" in _text(at)
    at.radio(key="ablate_mode").set_value("mean").run()  # another mode: the table waits for its button again
    _ok(at)
    assert "fig_ablate_table" not in _charts(at) and at.button(key="ablate_run")
    assert len(app_model) == passes
