"""Evaluation over images: rows equal the per-image computation, summaries equal hand statistics, files read back."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitviz.errors import ModelError, ParameterError
from vitviz.evaluate import (
    RANDOM_DRAWS,
    MethodSummary,
    Row,
    bootstrap_interval,
    evaluate,
    prepare_image,
    summarize,
    summary_markdown,
    write_plot,
    write_rows_csv,
    write_summary_csv,
)
from vitviz.explain import explain, random_map
from vitviz.metrics.faithfulness import faithfulness
from vitviz.models import describe_model

from .helpers import tiny_vit


def _photos(n=3):
    rng = np.random.default_rng(0)
    return [(f"img{i}", Image.fromarray(rng.integers(0, 256, size=(40 + 7 * i, 52, 3), dtype=np.uint8)))
            for i in range(n)]


def test_rows_are_each_image_times_each_method_with_random_always_included():
    model = tiny_vit(num_classes=6)
    info = describe_model(model)
    photos = _photos()
    seen = []
    rows = evaluate(model, photos, methods=["chefer", "rollout:start=1"],
                    progress=lambda d, t, n: seen.append((d, t, n)))
    assert seen == [(1, 3, "img0"), (2, 3, "img1"), (3, 3, "img2")]
    assert [(r.image, r.method) for r in rows] == [
        (name, m) for name, _ in photos for m in ("chefer", "rollout:start=1", "random")]
    for i, (name, photo) in enumerate(photos):
        x = prepare_image(photo, info)
        mine = [r for r in rows if r.image == name]
        e = explain(model, x, method="chefer")
        direct = faithfulness(model, x, e.map, target=e.target)
        assert mine[0].target == e.target.label and mine[0].target_description == e.target_description
        assert mine[0].score == pytest.approx(direct.score, abs=1e-6)
        assert mine[0].morf == pytest.approx(tuple(direct.morf), abs=1e-6)
        draws = [faithfulness(model, x, random_map(info.grid, seed=i * RANDOM_DRAWS + k), target=e.target)
                 for k in range(RANDOM_DRAWS)]  # seeded per image, RANDOM_DRAWS of them averaged
        assert mine[2].score == pytest.approx(np.mean([d.score for d in draws]), abs=1e-6)
        assert mine[2].morf == pytest.approx(tuple(np.mean([d.morf for d in draws], axis=0)), abs=1e-6)
        for r in mine:
            assert r.score == pytest.approx(r.lerf_auc - r.morf_auc) and r.score_kind == "probability"
            assert len(r.morf) == len(r.lerf) == len(r.fractions) == 10 and r.perturbation == "tokens"


def test_prepare_image_equals_timms_eval_transform():
    model = tiny_vit(img_size=48, num_classes=3)
    photo = _photos(2)[1][1]
    cfg = {**timm.data.resolve_data_config(model=model), "input_size": (3, 48, 48)}  # the size the model is built at
    want = timm.data.create_transform(**cfg)(photo).unsqueeze(0)
    got = prepare_image(photo, describe_model(model))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_backbone_gets_the_embedding_target_and_never_a_class():
    model = tiny_vit()
    rows = evaluate(model, _photos(1), methods=["raw"], perturbations=("pixels",))
    assert {r.target for r in rows} == {"embedding"} and {r.score_kind for r in rows} == {"cosine"}
    with pytest.raises(ModelError, match="no classifier head"):
        evaluate(model, _photos(1), methods=["raw"], target="class")
    with pytest.raises(ParameterError):
        evaluate(model, [], methods=["raw"])


def _row(method, score, morf=0.5):
    return Row(image="i", method=method, target="embedding", target_description="", perturbation="tokens",
               score_kind="cosine", morf_auc=morf, lerf_auc=morf + score, score=score, seconds=0.1, curve_seconds=0.2,
               fractions=(0.0, 0.5), morf=(1.0, morf), lerf=(1.0, morf + score))


def test_summary_means_and_a_reproducible_bootstrap_interval():
    rng = np.random.default_rng(5)
    values = rng.normal(0.2, 0.1, size=400)
    rows = [_row("a", float(v)) for v in values] + [_row("b", 0.3, morf=0.4)]
    a, b = summarize(rows)
    assert (a.method, a.n, b.method, b.n) == ("a", 400, "b", 1)
    assert a.score == pytest.approx(values.mean()) and a.lerf_auc == pytest.approx(0.5 + values.mean())
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)  # the normal interval the bootstrap approaches
    assert a.score_low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert a.score_high == pytest.approx(values.mean() + half, abs=0.15 * half)
    assert (b.score_low, b.score_high) == pytest.approx((0.3, 0.3))
    assert summarize(rows) == [a, b]  # fixed seed: the same interval every time
    assert b.morf == pytest.approx((1.0, 0.4)) and b.lerf == pytest.approx((1.0, 0.7))
    assert bootstrap_interval([1.0, 2.0, 3.0], resamples=2000)[0] >= 1.0
    with pytest.raises(ParameterError):
        bootstrap_interval([])


def test_writers_read_back(tmp_path):
    rows = [_row("chefer", 0.25), _row("random", 0.01), _row("chefer", 0.35)]
    summaries = summarize(rows)
    with write_rows_csv(rows, tmp_path / "rows.csv").open() as f:
        back = list(csv.DictReader(f))
    assert [r["method"] for r in back] == ["chefer", "random", "chefer"]
    assert float(back[2]["score"]) == pytest.approx(0.35) and back[0]["morf"] == "1 0.5"
    with write_summary_csv(summaries, tmp_path / "summary.csv").open() as f:
        back = list(csv.DictReader(f))
    assert [(r["method"], int(r["n"])) for r in back] == [("chefer", 2), ("random", 1)]
    assert float(back[0]["score"]) == pytest.approx(0.30)
    table = summary_markdown(summaries)
    lines = table.strip().splitlines()
    assert lines[2].startswith("| chefer | tokens | target | 2 | 0.300 [") and lines[3].startswith("| random |")
    png = write_plot(summaries, tmp_path / "curves.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1180, 480)
        px = np.asarray(im.convert("RGB"))
    left, right = px[:, 50:380], px[:, 420:750]  # both panels have coloured curve pixels
    for panel in (left, right):
        assert ((panel[..., 0] != panel[..., 1]) | (panel[..., 1] != panel[..., 2])).any()
    with pytest.raises(ParameterError):
        write_plot([], tmp_path / "none.png")
    assert isinstance(summaries[0], MethodSummary)


def test_several_measures_share_one_explanation_and_sensitivity_rows_are_correlations():
    """Rows for every perturbation x read-out (each equal to the curves measured alone) and sensitivity-n rows."""
    from vitviz.metrics.faithfulness import curves
    from vitviz.metrics.sensitivity import sensitivity_n

    model = tiny_vit()
    info = describe_model(model)
    (name, photo), = _photos(1)
    rows = evaluate(model, [(name, photo)], methods=["rollout"], perturbations=("tokens", "blur"),
                    readouts=("cls", "mean"), sensitivity=True)
    measures = [(r.perturbation, r.readout) for r in rows if r.method == "rollout"]
    assert measures == [("tokens", "cls"), ("tokens", "mean"), ("blur", "cls"), ("blur", "mean"),
                        ("sensitivity-n", "cls"), ("sensitivity-n", "mean")]
    x = prepare_image(photo, info)
    e = explain(model, x, method="rollout")
    blur_mean = [r for r in rows if (r.method, r.perturbation, r.readout) == ("rollout", "blur", "mean")][0]
    alone = curves(model, x, [e.map], target=e.target, perturbation="blur", readout="mean")[0]
    assert blur_mean.score == pytest.approx(alone.score, abs=1e-6)
    sens = [r for r in rows if (r.method, r.perturbation, r.readout) == ("rollout", "sensitivity-n", "cls")][0]
    assert sens.score == pytest.approx(sensitivity_n(model, x, [e.map], target=e.target, readout="cls")[0].score,
                                       abs=1e-9)
    assert sens.score_kind == "correlation" and sens.morf == () and np.isnan(sens.morf_auc)


def test_a_map_that_ranks_nothing_is_a_failure_row_not_a_score(tmp_path, capsys):
    """With the final norm's weight at 0 the embedding is constant, every gradient 0, and Chefer's map flat: the row
    says so (no score, the reason), the summary leaves it out, the CLI prints it and analyze's summary names it."""
    import json

    from safetensors.torch import save_file

    from vitviz.cli import main

    model = tiny_vit()
    with torch.no_grad():
        model.norm.weight.zero_()
    rows = evaluate(model, _photos(1), methods=["chefer", "rollout"])
    chefer = [r for r in rows if r.method == "chefer"][0]
    assert np.isnan(chefer.score) and "constant" in chefer.note
    assert np.isfinite([r for r in rows if r.method == "rollout"][0].score)
    assert "chefer" not in {s.method for s in summarize(rows)}
    path = tmp_path / "flat.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={
        "arch": "vit_tiny_patch16_224", "kwargs": json.dumps(dict(embed_dim=32, depth=3, num_heads=4))})
    img = tmp_path / "a.png"
    _photos(1)[0][1].save(img)
    assert main(["evaluate", str(img), "--out", str(tmp_path / "e"), "--model", str(path), "--img-size", "32",
                 "--methods", "chefer;rollout", "--quiet"]) == 0
    assert "chefer: no score: This map is constant" in capsys.readouterr().err
    assert main(["analyze", str(img), "--out", str(tmp_path / "a"), "--model", str(path), "--img-size", "32",
                 "--method", "chefer", "--quiet"]) == 0
    row = next(csv.DictReader((tmp_path / "a" / "summary.csv").open()))
    assert "constant" in row["map_note"]


def test_the_curves_plot_names_its_axes_ticks_and_every_label_whole(tmp_path, monkeypatch):
    """Issue 19 item 13: the legend keeps method labels whole (colons included) inside the image, the y axis has a
    title and round ticks, the x axis ticks."""
    from PIL import ImageDraw

    drawn = []
    real = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *a, **k):
        drawn.append((xy, text, k.get("font")))
        return real(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    rows = [_row("rollout:start=1,discard=0.9", 0.25), _row("random", 0.01)]
    path = write_plot(summarize(rows), tmp_path / "c.png", size=(1180, 480))
    texts = [t for _xy, t, _f in drawn]
    assert "rollout:start=1,discard=0.9 (+0.250)" in texts
    (xy, _t, font), = [d for d in drawn if d[1].startswith("rollout:start")]
    assert xy[0] + font.getlength(_t) <= 1180  # inside the image
    assert any("cosine" in t or "score" in t for t in texts)  # a y title
    assert "fraction of patches removed" in texts and {"0", "0.3", "0.6"} <= set(texts)  # x ticks
    ticks = [float(t) for t in texts if t.replace(".", "", 1).replace("-", "", 1).isdigit()]
    assert all(abs(v * 100 - round(v * 100)) < 1e-6 for v in ticks)  # round values
    assert Image.open(path).size == (1180, 480)
