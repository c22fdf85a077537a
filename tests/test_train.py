"""Training a tiny ViT: it learns (loss falls, accuracy above chance), its checkpoint reloads through every vitviz
path with its class names and the same predictions, the images are fitted as the analysis fits them, and labelled
zips are read safely (typed errors for traversal, links, sizes)."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import require_extra, tiny_vit
from vitviz.errors import CheckpointError, ImageError, ModelError, ParameterError
from vitviz.experiments import data as vdata
from vitviz.experiments.train import TrainConfig, train_vit, training_data
from vitviz.models import get_model
from vitviz.models.labels import class_names, predict

# a ViT leaves its first plateau (loss ln C) only after some dozens of steps: three classes, small batches, a high lr
TINY = TrainConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, epochs=12, batch_size=16,
                   lr=5e-3, label_smoothing=0.0, augment=False, seed=0)


@pytest.fixture(scope="module")
def small_digits():
    """The digits 0, 1 and 2 among scikit-learn's first 400 (123 images)."""
    require_extra("sklearn", "train")
    d = training_data("digits", TINY, limit=400)
    keep = d.labels < 3
    return vdata.Labelled(d.pixels[keep], d.labels[keep], ("0", "1", "2"), "digits 0-2")


@pytest.fixture(scope="module")
def trained(small_digits):
    return train_vit(small_digits, TINY, threads=1)


def test_training_converges_on_a_small_subset(trained):
    losses = [s.loss for s in trained.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])  # the loss falls
    assert trained.val_accuracy > 0.6  # three classes: chance is 1/3
    assert trained.stopped is None and trained.class_names == ("0", "1", "2")
    measured = [s.val_accuracy for s in trained.history if s.val_accuracy is not None]
    assert len(measured) == TINY.epochs and measured[-1] == trained.val_accuracy


def test_training_is_reproducible_with_its_seed(small_digits, trained):
    again = train_vit(small_digits, replace(TINY, epochs=1), threads=1)
    first_epoch = [s.loss for s in trained.history if s.epoch == 1]
    # the same seed gives the same split, initialisation, batches and shifts: the first epoch's losses repeat (the lr
    # schedule differs only in its decay, which starts after the first epoch's warm-up)
    assert [s.loss for s in again.history] == pytest.approx(first_epoch, rel=1e-4)


def test_the_checkpoint_reloads_with_its_names_and_predictions(trained, small_digits, tmp_path):
    path = trained.save(tmp_path / "digits.safetensors")
    model, info = get_model(path)
    assert class_names(model) == trained.class_names
    assert (info.patch_size, info.img_size, info.embed_dim, info.depth) == (4, (16, 16), 32, 2)
    x = (torch.from_numpy(small_digits.pixels[:64]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        before, after = trained.model(x), model(x)
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    top = predict(model, x[:1])
    assert top[0].name == str(top[0].index) and top[0].index == int(before[0].argmax())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == ["0", "1", "2"]
    assert float(meta["val_accuracy"]) == pytest.approx(trained.val_accuracy, abs=1e-4)


def test_training_sees_what_the_analysis_sees(small_digits, trained, tmp_path):
    """A digit saved as an 8x8 PNG and fitted the way the analysis fits it for the trained model gives the training
    pixels exactly."""
    from sklearn.datasets import load_digits

    from vitviz.inputs.fit import fit_image
    from vitviz.inputs.image import load_image

    first = np.flatnonzero(load_digits().target[:400] < 3)[7]  # small_digits' eighth image
    gray = np.rint(load_digits().images[first] * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    model, info = get_model(trained.save(tmp_path / "d.safetensors"))
    fitted = fit_image(load_image(buf.getvalue()).image, input_size=info.img_size, crop_pct=info.crop_pct,
                       interpolation=info.interpolation)
    np.testing.assert_array_equal(fitted.pixels, small_digits.pixels[7])


def test_stop_ends_training_where_asked(small_digits):
    asked = []
    done = train_vit(small_digits, TINY, stop=lambda: len(asked) >= 2, progress=asked.append, threads=1)
    assert done.stopped == "stopped" and len([s for s in done.history if s.val_accuracy is None]) <= 2
    assert len(done.history) == 2 and 0 <= done.val_accuracy <= 1


def test_bad_settings_and_missing_scikit_learn_are_refused(monkeypatch):
    with pytest.raises(ParameterError, match="multiple of"):
        replace(TINY, embed_dim=30, num_heads=4).check()
    with pytest.raises(ParameterError, match="whole number"):
        replace(TINY, img_size=18).check()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModelError, match=r"pip install vitviz\[train\]"):
        vdata.digits(img_size=16)


def test_class_names_in_metadata_are_checked(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vitviz.models import load_source

    path = trained.save(tmp_path / "ok.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    for names, match in ((["a"] * 2, "one name per class"), (["ok"] * 2 + ["bad\x1b[31m"], "printable"),
                         ("digits", "one name per class")):
        bad = tmp_path / "bad.safetensors"
        save_file(state, str(bad), metadata={**meta, "class_names": json.dumps(names)})
        with pytest.raises(CheckpointError, match=match):
            load_source(bad)  # get_model would cache by path: the source is read afresh


def test_class_names_prefer_the_models_own_then_imagenet():
    model = tiny_vit(num_classes=3)
    assert class_names(model) is None
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ("cat", "dog", "fox")}
    assert class_names(model) == ("cat", "dog", "fox")
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ("cat", "dog")}  # not one per class: ignored
    assert class_names(model) is None
    imagenet = tiny_vit(num_classes=1000)
    assert class_names(imagenet)[207] == "golden retriever"


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_labelled_zip_reads_its_classes():
    data = _zip({"set/red/a.png": _png("red"), "set/red/b.png": _png("red"), "set/blue/c.png": _png("blue"),
                 "set/__MACOSX/red/._a.png": b"junk", "set/notes.txt": b"hello"})
    got = vdata.labelled_images(data, img_size=8, name="set.zip")
    assert got.class_names == ("blue", "red") and got.labels.tolist() == [0, 1, 1]
    assert got.pixels.shape == (3, 8, 8, 3) and got.pixels[0, 4, 4].tolist() == [0, 0, 255]


def test_unsafe_zips_are_refused():
    with pytest.raises(ImageError, match="outside the archive"):
        vdata.labelled_images(_zip({"red/a.png": _png("red"), "../evil/b.png": _png("blue")}), img_size=8)
    big = _zip({"red/a.png": bytes(vdata.MAX_UPLOAD_BYTES + 1), "blue/b.png": _png("blue")})  # zeros deflate small
    assert len(big) < 10**6
    with pytest.raises(ImageError, match="at most 50 MB"):
        vdata.labelled_images(big, img_size=8)
    link = zipfile.ZipInfo("red/a.png")
    link.external_attr = (0o120777 << 16)  # a symbolic link
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(link, "/etc/passwd")
        z.writestr("blue/b.png", _png("blue"))
    with pytest.raises(ImageError, match="is a link"):
        vdata.labelled_images(buf.getvalue(), img_size=8)
    with pytest.raises(ImageError, match="at least two"):
        vdata.labelled_images(_zip({"red/a.png": _png("red")}), img_size=8)


def test_a_zip_bomb_is_refused_before_inflating(monkeypatch):
    monkeypatch.setattr(vdata, "MAX_ZIP_BYTES", 10_000)
    with pytest.raises(ImageError, match="would expand"):
        vdata.labelled_images(_zip({"red/a.png": bytes(20_000), "blue/b.png": _png("blue")}), img_size=8)


def test_cli_train_prints_and_stores_the_validation_accuracy(tmp_path, capsys):
    require_extra("sklearn", "train")
    from safetensors import safe_open

    from vitviz.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["train", "digits", "--out", str(out), "--epochs", "1", "--img-size", "16", "--embed-dim", "16",
                 "--depth", "1", "--heads", "2", "--threads", "1", "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("validation accuracy ") and len(last.split()[-1]) == 5  # 0.xyz
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert f"{float(meta['val_accuracy']):.3f}" == last.split()[-1]
    assert json.loads(meta["kwargs"])["embed_dim"] == 16 and meta["arch"] == "vit_tiny_patch16_224"


def test_cli_analyze_names_the_trained_models_predictions(trained, tmp_path):
    import csv

    from tests.helpers import run_cli

    path = trained.save(tmp_path / "d.safetensors")
    img = tmp_path / "in" / "digit.png"
    img.parent.mkdir()
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))).save(img)
    assert run_cli([img], tmp_path / "out", path, "--img-size", "16") == 0
    row = next(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    arrays = np.load(tmp_path / "out" / "digit.npz")
    # the reference: timm's forward on the pixels the analysis saw, softmax by hand
    model, _ = get_model(path)
    x = (torch.from_numpy(arrays["pixels"]).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        p = model(x)[0].double().softmax(-1).numpy()
    order = np.argsort(-p)[:5]
    assert arrays["top5_indices"].tolist() == order.tolist()
    assert arrays["top5_names"].tolist() == [str(i) for i in order]
    np.testing.assert_allclose(arrays["top5_probabilities"], p[order], rtol=1e-5)
    assert row["top1"] == str(order[0]) and float(row["top1_p"]) == pytest.approx(p[order[0]], abs=1e-4)
