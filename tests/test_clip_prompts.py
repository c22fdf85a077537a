"""Text prompts as targets for CLIP-style models (open_clip, the optional extra vitviz[clip]).

A tiny random-weight open_clip model is made here (``open_clip.create_model`` with a config of our own: no download)
and checked against open_clip's own encoders: the image tower vitviz walks gives ``encode_image``, the prompt target's
score is the cosine of ``encode_image`` with ``encode_text``, its gradient is finite differences, zero-shot
probabilities are softmax(logit_scale · cos) by hand; every registered method and the faithfulness curves accept the
prompt target (or refuse it with a sentence).
"""

from __future__ import annotations

import csv
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitviz.errors import ModelError, ParameterError, VitvizError
from vitviz.explain import METHODS, Target, explain, explain_all
from vitviz.explain.passes import attention_gradients
from vitviz.metrics.faithfulness import curves
from vitviz.targets import describe_target, prompt_target, resolve_target

from .helpers import hook_state, require_extra

open_clip = require_extra("open_clip", "clip")

from vitviz.models.clip import clip_model, imagenet_classes, load_clip, zero_shot  # noqa: E402 - after the extra

EMBED = 16
CFG = dict(embed_dim=EMBED,
           vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2.0),
           text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2))


def tiny_open_clip(*, quick_gelu: bool = True, seed: int = 0):
    """A tiny random open_clip CLIP (image 32 px, patch 8, width 32, 2 layers; text width 32, 2 layers, context 16;
    joint embedding 16), its attention and positions spread so that maps have structure."""
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32", pretrained=None, quick_gelu=quick_gelu, **CFG)
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "in_proj_weight" in name:
                p.normal_(0, 0.5)
            elif name in ("positional_embedding", "class_embedding"):
                p.normal_(0, 1.0)
            elif "ln_" in name:  # every LayerNorm its own weights: a swapped norm would show
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.5)
    return model.eval()


@functools.cache
def tiny_clip(quick_gelu: bool = True):
    """The ClipModel of a tiny open_clip model, and that model (shared by the tests, read only)."""
    oc = tiny_open_clip(quick_gelu=quick_gelu)
    return clip_model(oc, name="tiny"), oc


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_bundled_tokenizer_needs_no_download():
    tok = open_clip.get_tokenizer("ViT-B-32")  # the BPE vocabulary ships inside the package
    assert type(tok).__name__ == "SimpleTokenizer"
    assert tok(["a dog"]).shape == (1, 77)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_the_image_tower_equals_open_clips_encode_image(quick_gelu):
    clip, oc = tiny_clip(quick_gelu)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = oc.encode_image(x)
        got = clip.image(x)
    assert type(clip.image.blocks[0].mlp.act).__name__ == ("QuickGELU" if quick_gelu else "GELU")
    assert got.shape == (3, EMBED)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(clip.image.head.bias.abs().max()) == 0.0  # the projection has no bias


def test_the_prompt_score_is_the_cosine_of_open_clips_own_encoders():
    clip, oc = tiny_clip()
    x = image()
    target = prompt_target(clip.text, "a dog")
    with torch.no_grad():
        e = oc.encode_image(x)[0]
        t = oc.encode_text(open_clip.SimpleTokenizer(context_length=16)(["a dog"]))[0]
    want = float(e @ t / (e.norm() * t.norm()))
    g = attention_gradients(clip.image, x, target=target, layers=[-1])
    assert g.target == target and g.target.kind == "prompt"
    assert g.score == pytest.approx(want, abs=1e-5)
    logits = clip.image(x)[0]
    assert describe_target(clip.image, target, logits) == f"the prompt 'a dog' (cos = {want:.2g})"


def test_the_prompts_gradient_equals_finite_differences():
    """∂s/∂A of the last layer through the walk = (s(A + εE) - s(A - εE)) / 2ε by a hand forward of the tower."""
    clip, _oc = tiny_clip()
    model, x = clip.image.double(), image().double()
    try:
        target = prompt_target(clip.text, "a red car")
        t = torch.tensor(target.text_embedding, dtype=torch.float64)
        g = attention_gradients(model, x, target=target, layers=[-1]).gradients[0]  # (H, T, T)

        def score(delta):
            with torch.no_grad():
                tok = model.norm_pre(model._pos_embed(model.patch_embed(x)))
                tok = model.blocks[0](tok)
                blk = model.blocks[1]
                h = blk.norm1(tok)
                B, T, C = h.shape
                q, k, v = blk.attn.qkv(h).reshape(B, T, 3, 4, C // 4).permute(2, 0, 3, 1, 4)
                a = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1) + delta
                tok = tok + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, T, C))
                tok = tok + blk.mlp(blk.norm2(tok))
                e = model.head(model.norm(tok)[:, 0])[0]
                return float(e @ t / e.norm())

        eps = 1e-6
        for h, i, j in [(0, 0, 1), (1, 0, 0), (3, 2, 5), (2, 16, 7)]:
            d = torch.zeros(1, 4, 17, 17, dtype=torch.float64)
            d[0, h, i, j] = eps
            fd = (score(d) - score(-d)) / (2 * eps)
            assert float(g[h, i, j]) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    finally:
        clip.image.float()


def test_zero_shot_probabilities_are_the_softmax_of_scaled_cosines():
    clip, oc = tiny_clip()
    x = image(3)
    classes = ["cat", "dog", "car"]
    with torch.no_grad():
        e = F.normalize(oc.encode_image(x), dim=-1)[0]
        tok = open_clip.SimpleTokenizer(context_length=16)
        t = F.normalize(oc.encode_text(tok([f"a photo of a {c}." for c in classes])), dim=-1)
        probs = (oc.logit_scale.exp() * t @ e).softmax(-1)
    with torch.no_grad():
        got = zero_shot(clip, clip.image(x)[0], classes, k=3)
    assert [p.name for p in got] == [classes[i] for i in probs.argsort(descending=True).tolist()]
    for p in got:
        assert p.probability == pytest.approx(float(probs[p.index]), abs=1e-6)
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)  # open_clip's initial scale
    with pytest.raises(ParameterError, match="class names"):
        zero_shot(clip, clip.image(x)[0], [])
    names = imagenet_classes()  # timm's ImageNet-1k label info, each its first lemma
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever"


def test_a_prompt_target_is_one_frozen_value_and_is_checked_against_the_model():
    clip, _oc = tiny_clip()
    target = prompt_target(clip, "a dog")  # a ClipModel or its text encoder
    assert target == prompt_target(clip.text, " a dog ") and hash(target) == hash(prompt_target(clip.text, "a dog"))
    assert target.label == "prompt:a dog" and len(target.text_embedding) == EMBED
    assert np.linalg.norm(target.text_embedding) == pytest.approx(1.0, abs=1e-6)
    assert Target.parse("prompt:A Dog") == Target("prompt", text="A Dog")  # the text kept as written
    with pytest.raises(ParameterError, match="no text embedding"):
        resolve_target(clip.image, Target.parse("prompt:a dog"), None)
    with pytest.raises(ParameterError, match="prompt"):
        Target("class", 1, text="a dog")
    with pytest.raises(ParameterError, match="some text"):
        prompt_target(clip.text, "  ")
    other = tiny_clip(False)[0]
    wrong = Target("prompt", text="x", text_embedding=(1.0,) * 8)
    with pytest.raises(ModelError, match="head"):
        resolve_target(other.image, wrong, None)


def test_the_prompt_reaches_the_map_and_the_curves():
    """The map and the curves follow the prompt: another prompt, another gradient map and another score."""
    clip, _oc = tiny_clip()
    x = image(5)
    a, b = prompt_target(clip.text, "a dog"), prompt_target(clip.text, "a red car")
    ea, eb = (explain(clip.image, x, method="gradxattn", target=t) for t in (a, b))
    assert not np.allclose(ea.map, eb.map)
    c = curves(clip.image, x, [ea.map], target=ea.target)[0]
    with torch.no_grad():
        e = clip.image(x)[0]
    assert c.morf[0] == pytest.approx(float(e @ torch.tensor(a.text_embedding) / e.norm()), abs=1e-5)
    assert c.score_kind == "cosine"


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: s.name)
def test_every_method_takes_the_prompt_target(spec):
    """The method x prompt table: each registered method runs on the prompt target (none refuses it here)."""
    clip, _oc = tiny_clip()
    x = image(7)
    target = prompt_target(clip.text, "a photo of a dog")
    label = "deletion:steps=2" if spec.name == "deletion" else spec.name
    before = hook_state(clip.image)
    try:
        e = explain_all(clip.image, x, methods=[label], target=target)[0]
    except VitvizError as exc:  # a refusal is a sentence
        assert str(exc).endswith((".", ")")) or " " in str(exc)
        pytest.fail(f"{spec.name} refused the prompt target: {exc}")
    assert e.map.shape == (4, 4) and np.isfinite(e.map).all()
    assert e.target == target and e.target_description.startswith("the prompt 'a photo of a dog'")
    assert e.predictions == ()  # the projection's outputs are no classes
    c = curves(clip.image, x, [e.map], target=e.target, perturbation="pixels")[0]
    assert np.isfinite(c.score)
    assert hook_state(clip.image) == before  # the shared tower holds nothing of the request


def test_offline_a_hub_clip_name_fails_fast_and_says_so(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="cannot be reached"):
        load_clip("clip:ViT-B-32/laion2b_s34b_b79k")
    with pytest.raises(ParameterError, match="TAG"):
        load_clip("clip:ViT-B-32")
    with pytest.raises(ModelError, match="not an open_clip model"):
        load_clip("clip:ViT-Q-99/x")


TINY_NAME = "vitviz-tiny-clip"


def register_tiny(folder) -> str:
    """``clip:vitviz-tiny-clip``: the tiny config registered with open_clip (no pretrained tags: random weights)."""
    import json

    path = folder / f"{TINY_NAME}.json"
    path.write_text(json.dumps({**CFG, "quick_gelu": True}))
    open_clip.add_model_config(path)
    return f"clip:{TINY_NAME}"


def test_the_cli_explains_a_prompt_and_writes_zero_shot_predictions(tmp_path, capsys):
    from PIL import Image

    from vitviz.cli import main

    name = register_tiny(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    common = [str(tmp_path / "a.png"), "--model", name, "--img-size", "32", "--quiet"]
    assert main(["analyze", *common, "--out", str(tmp_path / "an"), "--method", "gradxattn", "--prompt", "a dog",
                 "--prompts", "cat,dog,car"]) == 0
    with np.load(tmp_path / "an" / "a.npz") as d:
        assert str(d["map_target"]).startswith("the prompt 'a dog' (cos = ")
        assert sorted(d["top5_names"]) == ["car", "cat", "dog"]  # zero-shot, stored as a classifier's top 5
        assert d["top5_probabilities"].sum() == pytest.approx(1.0, abs=1e-5)
    with (tmp_path / "an" / "summary.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["top1"] in ("cat", "dog", "car")
    assert main(["analyze", *common, "--out", str(tmp_path / "plain"), "--method", "gradxattn"]) == 0
    with np.load(tmp_path / "plain" / "a.npz") as d:  # no prompt: the embedding, never a "class" of the projection
        assert str(d["map_target"]).startswith("the image's own CLS embedding") and "top5_names" not in d
    assert main(["evaluate", *common, "--out", str(tmp_path / "ev"), "--methods", "rollout", "--prompts",
                 "cat,dog", "--random-draws", "1", "--steps", "2"]) == 0
    rows = (tmp_path / "ev" / "rows.csv").read_text()
    assert "prompt:a photo of a " in rows  # the top zero-shot class's prompt is what was explained
    assert main(["analyze", str(tmp_path / "a.png"), "--out", str(tmp_path / "x"), "--prompt", "a dog"]) != 0
    assert "need a CLIP model: use --model clip:NAME/TAG" in capsys.readouterr().err
