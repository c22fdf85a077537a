"""`vitviz analyze` on a folder of ordinary and bad images, with a tiny checkpoint (no network, no big model)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from vitviz.cli import main

from .helpers import tiny_vit


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    meta = {"arch": "vit_tiny_patch16_224", "kwargs": json.dumps(dict(embed_dim=32, depth=3, num_heads=4))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def write_images(folder):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(folder / "wide photo.jpg")
    Image.fromarray(rng.integers(0, 256, (70, 40), dtype=np.uint8)).save(folder / "gray.png")
    rotated = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: the model sees a 30 wide x 50 high image
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", exif=exif)
    (folder / "rotated.jpg").write_bytes(buf.getvalue())
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (folder / "notes.txt").write_text("ignored: not an image suffix")


def test_analyze_folder_writes_outputs_and_reports_the_bad_file(tmp_path, ckpt, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_images(src)
    code = main(["analyze", str(src), "--out", str(out), "--model", str(ckpt), "--img-size", "32",
                 "--start-layer", "0", "--save-attention", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1  # one image failed
    bad_lines = [line for line in err.splitlines() if "broken.jpg" in line]
    assert len(bad_lines) == 1 and "HTML" in bad_lines[0] and "3 of 4" in err
    rows = list(csv.DictReader((out / "summary.csv").open()))
    # every input once, in input order (folder sorted); the bad one as failed with its reason, no outputs
    assert [(r["stem"], r["status"]) for r in rows] == [("broken", "failed"), ("gray", "ok"), ("rotated", "ok"),
                                                        ("wide_photo", "ok")]
    assert "HTML" in rows[0]["error"] and not rows[0]["width"] and not (out / "broken.npz").exists()
    for stem in ("gray", "rotated", "wide_photo"):
        d = np.load(out / f"{stem}.npz")
        assert d["attention_map"].shape == (4, 4) and d["attention_map"].dtype == np.float32
        assert str(d["attention_map_kind"]) == "rollout"
        assert d["pos_sim"].shape == (16, 16)
        assert tuple(d["grid"]) == (4, 4) and int(d["patch_size"]) == 8 and int(d["num_prefix_tokens"]) == 1
        att = d["attention"]
        assert att.shape == (3, 4, 17, 17)
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
        settings = json.loads(str(d["settings"]))
        assert settings["start_layer"] == 0 and settings["end_layer"] == 2 and settings["head_fusion"] == "mean"
        png = Image.open(out / f"{stem}.png")
        assert png.size == (32, 32)
    # the box is in original pixels after EXIF rotation: a 30x50 (w x h) image, centre-cropped to a square
    box = np.load(out / "rotated.npz")["box"]
    left, top, right, bottom = box
    # timm eval with crop_pct 0.9: shorter side 30 -> floor(32 / 0.9) = 35 px, then a 32 px centre crop,
    # i.e. 32 * 30 / 35 = 27.43 original px wide, centred in the 30 x 50 image (heights round to whole pixels)
    assert right - left == pytest.approx(32 * 30 / 35, abs=1e-6)
    assert bottom - top == pytest.approx(32 * 30 / 35, abs=0.3)
    assert left == pytest.approx(round(1.5) * 30 / 35, abs=1e-6)  # torchvision centre crop: int(round((35 - 32) / 2))
    assert (top + bottom) / 2 == pytest.approx(25, abs=0.6)


def test_bad_arguments_exit_2_with_a_message(tmp_path, ckpt, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(img)
    assert main(["analyze", str(img), "--out", str(tmp_path / "o"), "--model", str(ckpt), "--discard", "1.5"]) == 2
    assert "discard ratio must be in [0, 1)" in capsys.readouterr().err
    assert main(["analyze", str(img), "--out", str(tmp_path / "o"), "--model", str(ckpt), "--patch-size", "40"]) == 2
    assert "patch size 40 is out of range: choose 8 to 16" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--model", str(ckpt)]) == 1


def test_python_dash_m_entry_point(tmp_path, ckpt):
    img = tmp_path / "b.png"
    Image.new("RGB", (33, 47), "red").save(img)
    proc = subprocess.run([sys.executable, "-m", "vitviz", "analyze", str(img), "--out", str(tmp_path / "o"),
                           "--model", str(ckpt), "--img-size", "32", "--fit", "whole"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    d = np.load(tmp_path / "o" / "b.npz")
    assert tuple(d["box"]) == (0, 0, 33, 47)  # whole image
    gh, gw = d["grid"]
    assert gh > gw  # portrait image, portrait grid


def test_output_names_never_collide():
    from pathlib import Path

    from vitviz.inputs.folders import output_stems

    names = output_stems([Path("x/a.jpg"), Path("y/a.png"), Path("a-2.jpg"), Path("A.gif"), Path("../../b c.png")])
    assert names == ["a", "a-2", "a-2-2", "A-3", "b_c"]
    assert len({n.lower() for n in names}) == len(names)


def test_bad_layer_range_refused_before_any_pass(tmp_path, ckpt, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(img)
    out = tmp_path / "o"
    assert main(["analyze", str(img), "--out", str(out), "--model", str(ckpt), "--end-layer", "7"]) == 2
    assert "layers must be in 0 to 2" in capsys.readouterr().err
    assert not (out / "a.npz").exists()


def _arrays(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _untimed(path):
    from vitviz.cli import TIMING_FIELDS

    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in csv.DictReader(path.open())]


def test_resume_keeps_whole_outputs_and_redoes_broken_or_missing_ones(tmp_path, ckpt, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_images(src)
    args = ["analyze", str(src), "--out", str(out), "--model", str(ckpt), "--img-size", "32", "--quiet"]
    assert main(args) == 1
    first = {s: _arrays(out / f"{s}.npz") for s in ("gray", "rotated", "wide_photo")}
    first_rows = _untimed(out / "summary.csv")
    data = (out / "gray.npz").read_bytes()
    (out / "gray.npz").write_bytes(data[: len(data) // 2])  # as a crash of the disk, not of vitviz, would leave it
    (out / "rotated.png").unlink()
    kept_inode = (out / "wide_photo.npz").stat().st_ino
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1  # the bad file is tried again and fails again
    err = capsys.readouterr().err
    assert "3 of 4 image(s)" in err and "(1 kept from an earlier run)" in err
    assert (out / "wide_photo.npz").stat().st_ino == kept_inode  # not written again
    for stem, arrays in first.items():  # the redone ones are the same, bit for bit
        again = _arrays(out / f"{stem}.npz")
        assert again.keys() == arrays.keys() and all(np.array_equal(again[k], arrays[k]) for k in arrays)
    assert _untimed(out / "summary.csv") == first_rows
    rows = {r["stem"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["wide_photo"]["forward_s"] == "" and rows["gray"]["forward_s"] != ""  # kept rows: not timed here


def test_resume_redoes_outputs_made_with_other_options_or_for_another_input(tmp_path, ckpt):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir(), b.mkdir()
    Image.new("RGB", (40, 40), "red").save(a / "x.png")
    Image.new("RGB", (40, 40), "blue").save(b / "x.png")
    base = ["analyze", "--out", str(out), "--model", str(ckpt), "--img-size", "32", "--quiet"]
    assert main([*base, str(a / "x.png"), "--discard", "0.5"]) == 0
    inode = (out / "x.npz").stat().st_ino
    assert main([*base, str(a / "x.png"), "--resume"]) == 0  # other options: done again
    assert (out / "x.npz").stat().st_ino != inode
    assert float(np.load(out / "x.npz")["discard_ratio"]) == pytest.approx(0.9)
    inode = (out / "x.npz").stat().st_ino
    assert main([*base, str(a / "x.png"), "--resume"]) == 0  # same options, same input: kept
    assert (out / "x.npz").stat().st_ino == inode
    assert main([*base, str(b / "x.png"), "--resume"]) == 0  # the name x now belongs to another image
    assert (out / "x.npz").stat().st_ino != inode
    assert np.load(out / "x.npz")["pixels"][0, 0].tolist() == [0, 0, 255]


def test_list_files_and_nested_folders_as_inputs(tmp_path, ckpt):
    (tmp_path / "d" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "d" / "deeper" / "r.png")
    Image.new("RGB", (40, 40), "green").save(tmp_path / "g.png")
    (tmp_path / "list.txt").write_text("g.png\nmissing.png\n")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "d"), str(tmp_path / "list.txt"), "--out", str(out), "--model", str(ckpt),
                 "--img-size", "32", "--quiet"]) == 1
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["stem"], r["status"]) for r in rows] == [("r", "ok"), ("g", "ok"), ("missing", "failed")]


def test_analyze_stores_the_default_explanation_and_the_tokens(tmp_path, ckpt):
    """npz: with ``--method default`` 'map' is vitviz.explain's map of the app's default method for that image (by
    its own method name), tokens equal the one pass's; without ``--method`` no explanation is computed."""
    import torch

    from vitviz.analysis.tokens import token_norms
    from vitviz.explain import DEFAULT_METHOD, explain
    from vitviz.inputs.image import to_tensor
    from vitviz.models import get_model

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / "a.png")
    assert main(["analyze", str(src), "--out", str(out), "--model", str(ckpt), "--img-size", "32", "--quiet",
                 "--save-features", "--method", "default"]) == 0
    with np.load(out / "a.npz") as d:
        model, info = get_model(str(ckpt), img_size=32, device="cpu")
        want = explain(model, to_tensor(d["pixels"], mean=info.mean, std=info.std), method=DEFAULT_METHOD)
        assert str(d["map_method"]) == DEFAULT_METHOD and str(d["map_target"]) == want.target_description
        np.testing.assert_allclose(d["map"], want.map, rtol=1e-5, atol=1e-7)
        assert d["tokens"].shape == (3, 17, 32)
        np.testing.assert_allclose(d["token_norms"], token_norms(torch.from_numpy(d["tokens"])), rtol=1e-6)
    row = next(csv.DictReader((out / "summary.csv").open()))
    assert row["map_method"] == DEFAULT_METHOD and len(row["outliers"].split()) == 3
    assert main(["analyze", str(src), "--out", str(tmp_path / "o2"), "--model", str(ckpt), "--img-size", "32",
                 "--quiet"]) == 0  # the default: no explanation (a dataset run costs about a forward pass)
    with np.load(tmp_path / "o2" / "a.npz") as d:
        assert "map" not in d.files and "tokens" not in d.files


def test_evaluate_writes_rows_summary_and_plot_with_random_included(tmp_path, ckpt, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / f"{i}.png")
    (src / "bad.jpg").write_bytes(b"not an image")
    assert main(["evaluate", str(src), "--out", str(out), "--model", str(ckpt), "--img-size", "32",
                 "--methods", "legrad;rollout:start=1,discard=0.5", "--steps", "4"]) == 0
    rows = list(csv.DictReader((out / "rows.csv").open()))
    assert sorted({r["method"] for r in rows}) == ["legrad", "random", "rollout:start=1,discard=0.5"]
    assert len(rows) == 2 * 3 and all(r["target"] == "embedding" for r in rows)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 / the declared floor 1.26
    for r in rows:  # score = LeRF AUC - MoRF AUC, by the trapezoid over the removed fractions written beside it
        x, morf, lerf = (np.array(r[k].split(), float) for k in ("fractions", "morf", "lerf"))
        assert float(r["score"]) == pytest.approx(trapezoid(lerf, x) - trapezoid(morf, x), abs=1e-5)
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {s["method"] for s in summary} == {r["method"] for r in rows} and (out / "curves.png").stat().st_size
    failures = list(csv.DictReader((out / "failures.csv").open()))
    assert len(failures) == 1 and failures[0]["image"].endswith("bad.jpg") and failures[0]["error"]
    assert "| method |" in capsys.readouterr().out
    assert main(["evaluate", str(src / "0.png"), "--out", str(out), "--model", str(ckpt), "--target", "class:3"]) == 2
    err = capsys.readouterr().err
    assert "head" in err and "Traceback" not in err  # a backbone has no class to explain


def test_an_unknown_method_is_one_sentence_naming_the_known_ones_before_any_model(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(img)
    missing = str(tmp_path / "no-such-model.safetensors")  # the method is refused before the model is looked for
    for argv in (["analyze", str(img), "--method", "nonsense"], ["evaluate", str(img), "--methods", "legrad;nonsense"]):
        assert main([*argv, "--out", str(tmp_path / "o"), "--model", missing]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "'nonsense'" in err and "rollout" in err and "deletion" in err, err
    proc = subprocess.run([sys.executable, "-m", "vitviz", "analyze", str(img), "--out", str(tmp_path / "o"),
                           "--method", "nonsense"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "deletion" in proc.stderr


def test_help_lists_every_registered_method_and_evaluates_defaults(capsys):
    from vitviz.evaluate import DEFAULT_METHODS
    from vitviz.explain.registry import METHODS

    for command in ("analyze", "evaluate"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert stop.value.code == 0
        assert all(m.name in out and m.title in out for m in METHODS), out
    assert all(f"  {m}\n" in out for m in DEFAULT_METHODS), out  # evaluate's default --methods, one a line


def test_building_the_parser_imports_no_torch():
    """(A choice given on the command line, like --fit whole, is checked against the library's list: that imports
    torch, as the run itself does.)"""
    probe = ("import sys, vitviz.cli as c; p = c.build_parser(); p.parse_args(['analyze', 'x', '--out', 'o']); "
             "p.parse_args(['evaluate', 'x', '--out', 'o']); p.parse_known_args(['app', '--host', '::1']); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


SHARED = ("images", "out", "model", "arch", "patch_size", "img_size", "fit", "device", "precision", "batch_size",
          "workers", "dist_timeout", "quiet")


def test_analyze_and_evaluate_share_their_options_and_defaults():
    from vitviz.cli import build_parser
    from vitviz.cli._common import resolve
    from vitviz.settings import DEFAULTS

    parser = build_parser()
    a, e = (resolve(parser.parse_args([command, "x.png", "--out", "o"])) for command in ("analyze", "evaluate"))
    assert {k: getattr(a, k) for k in SHARED} == {k: getattr(e, k) for k in SHARED}
    for key in ("model", "patch_size", "img_size", "fit", "device", "precision"):
        assert getattr(a, key) == getattr(DEFAULTS, key), key
    assert (a.start_layer, a.head_fusion, a.discard) == (DEFAULTS.start_layer, DEFAULTS.head_fusion,
                                                         DEFAULTS.discard_ratio)


def test_app_passes_port_host_and_streamlit_options_to_the_launcher(monkeypatch):
    import vitviz.app.launch

    calls = []
    monkeypatch.setattr(vitviz.app.launch, "launch", lambda **kwargs: calls.append(kwargs) or 0)
    assert main(["app", "--port", "8600", "--host", "0.0.0.0", "--server.headless", "true"]) == 0
    assert main(["app"]) == 0
    assert calls == [dict(port=8600, host="0.0.0.0", streamlit_args=["--server.headless", "true"]),
                     dict(port=8501, host=None, streamlit_args=[])]


def test_a_checkpoint_without_its_architecture_names_the_flag(tmp_path, capsys):
    model = tiny_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))  # no metadata
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(img)
    assert main(["analyze", str(img), "--out", str(tmp_path / "o"), "--model", str(bare), "--method", "none"]) == 2
    err = capsys.readouterr().err
    assert "architecture" in err and "--arch NAME" in err and len(err.strip().splitlines()) == 1, err


def test_library_messages_are_worded_for_the_terminal():
    from vitviz.cli._common import for_terminal
    from vitviz.errors import ModelUnavailableError, ParameterError

    text = for_terminal(ModelUnavailableError("the weights of 'x' are not on this server. Use the embedded default "
                                              "model or a checkpoint file."))
    assert "on this machine" in text and "server" not in text and "--model default or --model FILE" in text
    assert for_terminal(ParameterError("discard ratio must be in [0, 1), got 2")) == ("discard ratio must be in [0, "
                                                                                      "1), got 2")


def test_an_images_png_and_npz_are_written_as_one_even_when_interrupted_between_them(tmp_path, monkeypatch):
    """SIGINT right after the first rename (what Ctrl-C between the two files did): both files are there, then the
    interrupt arrives; a failing rename leaves neither file and no temp file."""
    import os
    import signal
    import threading

    from vitviz import export

    real = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(export.os, "replace", replace_then_interrupt)
    files = {tmp_path / "3.png": b"png", tmp_path / "3.npz": b"npz"}
    # another thread running, as torch's and a DataLoader's do: the kernel may hand it the signal
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            export.write_atomic_group(files)
    finally:
        signal.signal(signal.SIGINT, previous)
        stop.set()
    assert (tmp_path / "3.png").read_bytes() == b"png" and (tmp_path / "3.npz").read_bytes() == b"npz"

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "replace", refuse)
    with pytest.raises(OSError):
        export.write_atomic_group({tmp_path / "4.png": b"png", tmp_path / "4.npz": b"npz"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.npz", "3.png"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P is Python 3.11+")
def test_the_readmes_python_dash_m_advice_works_beside_a_folder_named_vitviz(tmp_path):
    """Issue 19 item 17: from a folder holding a ``vitviz`` folder (a clone), ``python -m vitviz`` imports that
    folder instead; the README's ``python -P -m vitviz`` works there, and ``--version`` imports no torch."""
    clone = tmp_path / "vitviz"  # a clone's folder: what the folder above it holds
    (clone / "vitviz").mkdir(parents=True)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    installed = subprocess.run([sys.executable, "-P", "-c", "import vitviz.cli"], cwd=tmp_path, env=env,
                               capture_output=True, timeout=120).returncode == 0
    if not installed:
        pytest.skip("vitviz is not installed in this interpreter (tests run from the checkout)")
    out = subprocess.run([sys.executable, "-P", "-m", "vitviz", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("vitviz "), out.stderr[-500:]
    assert "python -P -m vitviz" in (root / "README.md").read_text()


def _photo(path: Path, size=(50, 40), seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_the_png_is_drawn_as_the_app_draws_it_at_either_size(tmp_path, ckpt):
    """Issue 19, 16: one rendering for the CLI and the app. 'original' is byte for byte the app's download (the
    seen part of the original image at its resolution, crisp patch blocks); 'model' (the default) is the same
    drawing at the model's input size: crisp blocks, never a smooth upsampling of the map."""
    from vitviz.figures import overlay_original_png
    from vitviz.inputs.image import load_image

    img = _photo(tmp_path / "p.png")
    for png in ("original", "model"):
        out = tmp_path / png
        assert main(["analyze", str(img), "--out", str(out), "--model", str(ckpt), "--img-size", "32", "--png", png,
                     "--quiet"]) == 0
        d = np.load(out / "p.npz")
        drawn = (out / "p.png").read_bytes()
        if png == "original":
            app = overlay_original_png(load_image(img).image, tuple(d["box"]), d["attention_map"], opacity=0.6)
            assert drawn == app
            left, top, right, bottom = (round(v) for v in d["box"])
            assert Image.open(out / "p.png").size == (right - left, bottom - top)
        else:
            assert Image.open(out / "p.png").size == (32, 32)
    flat = tmp_path / "flat.png"  # a uniform image: every pixel's colour is its patch's value alone
    Image.new("RGB", (32, 32), (128, 128, 128)).save(flat)
    assert main(["analyze", str(flat), "--out", str(tmp_path / "flat"), "--model", str(ckpt), "--img-size", "32",
                 "--quiet"]) == 0
    rgb = np.asarray(Image.open(tmp_path / "flat" / "flat.png").convert("RGB")).reshape(4, 8, 4, 8, 3)
    assert (rgb == rgb[:, :1, :, :1]).all(), "each 8x8 patch is one colour (crisp blocks)"


def test_method_rollout_equal_to_the_analysis_reuses_it_without_a_second_pass(tmp_path, ckpt, monkeypatch):
    """Issue 19, 15: '--method rollout:start=1,discard=0.9' (the analysis's own settings) is the rollout already
    drawn: no explanation pass runs, and the stored map equals the library's explanation of it; '--method default'
    (AttnLRP since issue 20's measurement) and any other method run their pass."""
    import timm
    import torch

    import vitviz.explain
    from vitviz.explain import DEFAULT_METHOD, explain
    from vitviz.inputs.image import to_tensor
    from vitviz.models import get_model

    img = _photo(tmp_path / "p.png")
    calls = []
    real = vitviz.explain.explain
    monkeypatch.setattr(vitviz.explain, "explain", lambda *a, **k: calls.append(k["method"]) or real(*a, **k))
    for method in ("rollout:start=1,discard=0.9", "default", "chefer"):
        out = tmp_path / method.replace(":", "_").replace(",", "_").replace("=", "")
        assert main(["analyze", str(img), "--out", str(out), "--model", str(ckpt), "--img-size", "32",
                     "--method", method, "--quiet"]) == 0
    assert calls == [DEFAULT_METHOD, "chefer"], "only the methods that are not the drawn rollout run a pass"
    d = np.load(tmp_path / "rollout_start1_discard0.9" / "p.npz")
    assert str(d["map_method"]) == "rollout:start=1,discard=0.9" and "attention" in str(d["map_target"])
    model, info = get_model(str(ckpt), patch_size=8, img_size=(32, 32))
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    x = to_tensor(d["pixels"], mean=info.mean, std=info.std)  # what the model saw, as stored
    with torch.no_grad():
        ref = explain(model, x, method="rollout:start=1,discard=0.9").map
    np.testing.assert_allclose(d["map"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d["map"], d["attention_map"])
