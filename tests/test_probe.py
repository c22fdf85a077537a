"""Probing a backbone: the head equals a reference fit on the same embeddings (numpy least squares; scikit-learn's
logistic regression), the embeddings are what the head of the saved checkpoint reads, the checkpoint reloads with
its class names and predicts as the probe did, and the embeddings are computed once."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.helpers import require_extra
from vitviz.experiments.data import labelled_images, split
from vitviz.experiments.probe import embeddings, fit_head, fit_probe
from vitviz.experiments.train import save_checkpoint
from vitviz.models import get_model
from vitviz.models.build import model_source
from vitviz.models.labels import class_names


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A tiny random backbone (no head) saved as a checkpoint that names its architecture."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": "vit_tiny_patch16_224", "kwargs": '{"embed_dim": 32, "depth": 2, "num_heads": 2}'})
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of 8 images each: noise around a red, a green and a blue mean."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir()
        for i in range(8):
            base = np.full((40, 40, 3), 60.0)
            base[..., c] = 180
            Image.fromarray((base + rng.normal(0, 40, base.shape)).clip(0, 255).astype(np.uint8)).save(
                root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(backbone_file, folder):
    model, info = get_model(backbone_file)
    data = labelled_images(folder, img_size=32, crop_pct=info.crop_pct, interpolation=info.interpolation)
    return model, info, data


def test_ridge_equals_numpy_least_squares():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 3, rng.integers(0, 3, 40)
    w, b = fit_head(torch.from_numpy(x).float(), y, num_classes=3, method="ridge", l2=0.1)
    # the reference: standardised features, a column of ones (unpenalised), sqrt(l2 N) I rows below
    mu, sd = x.mean(0), x.std(0)
    z = np.hstack([(x - mu) / sd, np.ones((40, 1))])
    a = np.vstack([z, np.hstack([np.sqrt(0.1 * 40) * np.eye(6), np.zeros((6, 1))])])
    t = np.vstack([np.eye(3)[y], np.zeros((6, 3))])
    coef = np.linalg.lstsq(a, t, rcond=None)[0]
    want = z @ coef
    got = (torch.from_numpy(x).float() @ w.T + b).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_logistic_equals_scikit_learn():
    lm = require_extra("sklearn.linear_model", "train")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 5)) * 3 + 1, rng.integers(0, 3, 60)
    x[y == 1, 0] += 4
    l2 = 0.05
    w, b = fit_head(torch.from_numpy(x).float(), y, num_classes=3, method="logistic", l2=l2)
    mu, sd = x.mean(0), x.std(0)
    # sklearn minimises C * sum(cross-entropy) + ||W||^2 / 2; ours mean(cross-entropy) + l2/2 ||W||^2: C = 1 / (l2 N)
    ref = lm.LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10_000).fit((x - mu) / sd, y)
    got = torch.softmax(torch.from_numpy(x).float() @ w.T + b, -1).numpy()
    np.testing.assert_allclose(got, ref.predict_proba((x - mu) / sd), atol=2e-4)


def test_the_probe_is_measured_on_its_own_split(setup):
    model, info, data = setup
    probe = fit_probe(model, data, mean=info.mean, std=info.std, method="ridge", seed=3)
    train_idx, val_idx = split(data.labels, seed=3)
    feats = embeddings(model, data, mean=info.mean, std=info.std)
    w, b = fit_head(feats[train_idx], data.labels[train_idx], num_classes=3, method="ridge")
    torch.testing.assert_close(probe.weight, w)
    acc = (probe.logits(feats[val_idx]).argmax(-1).numpy() == data.labels[val_idx]).mean()
    assert probe.accuracy == pytest.approx(acc) and (probe.n_train, probe.n_val) == (len(train_idx), len(val_idx))
    assert probe.accuracy > 0.6  # the colours separate: three classes, chance 1/3


def test_the_probed_checkpoint_reloads_and_predicts_as_the_probe(setup, backbone_file, tmp_path):
    model, info, data = setup
    probe = fit_probe(model, data, mean=info.mean, std=info.std)
    source = model_source(backbone_file)
    path = save_checkpoint(tmp_path / "probed.safetensors",
                           probe.checkpoint(model, arch=source.arch, kwargs=source.kwargs))
    probed, _ = get_model(path)
    assert class_names(probed) == ("blue", "green", "red")
    m, s = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(data.pixels).permute(0, 3, 1, 2).float() / 255 - m) / s
    with torch.inference_mode():
        # the embedding the probe read is what timm's own forward puts under the head: compare with a plain forward
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(probed(x), pooled @ probe.weight.T + probe.bias, rtol=1e-5, atol=1e-5)


def test_embeddings_are_computed_once_per_model_and_images(setup):
    model, info, data = setup
    calls = []
    first = embeddings(model, data, mean=info.mean, std=info.std, key="k", progress=lambda i, n: calls.append(i))
    again = embeddings(model, data, mean=info.mean, std=info.std, key="k", progress=lambda i, n: calls.append(i))
    assert again is first and calls == [24]  # one batch of 24 images, computed the first time only


def test_cli_probe_prints_the_held_out_accuracy_and_saves_a_classifier(backbone_file, folder, tmp_path, capsys):
    from vitviz.cli import main

    out = tmp_path / "probe.safetensors"
    assert main(["probe", str(folder), "--out", str(out), "--model", str(backbone_file), "--img-size", "32",
                 "--threads", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("validation accuracy ") and float(last.split()[-1]) > 0.6
    probed, info = get_model(out)
    assert class_names(probed) == ("blue", "green", "red") and info.img_size == (32, 32)
