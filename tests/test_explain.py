"""Explanations against independent references: finite differences, timm's eager path and the papers' equations.

The references run timm's own unfused forward on a private deep copy of the model (``fused_attn`` off, the
probabilities read, or perturbed, at ``attn_drop`` with hooks on the copy only), and compute the maps with full
matrices and loops, one layer and one backward at a time, exactly as the equations are written.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vitviz.errors import ModelError, ParameterError, VitvizError
from vitviz.explain import Method, Target, attention_gradients, explain, explain_all
from vitviz.models.labels import class_name, class_names, has_head, label_set, predict, top_predictions

from .helpers import LAYOUTS, hook_state, in_threads, layout_image, layout_model, naive_rollout, tiny_vit


class EagerProbe:
    """timm's eager forward on a private copy; each layer's probabilities (optionally + a delta) and block output."""

    def __init__(self, model):
        self.ref = copy.deepcopy(model)
        self.delta: dict[int, torch.Tensor] = {}
        self.probs: list[torch.Tensor] = []
        self.outs: list[torch.Tensor] = []
        for layer, blk in enumerate(self.ref.blocks):
            blk.attn.fused_attn = False
            blk.attn.attn_drop.register_forward_hook(self._probe(layer))
            blk.register_forward_hook(lambda _m, _i, out: self.outs.append(out))

    def _probe(self, layer):
        def hook(_m, _i, out):
            out = out + self.delta[layer] if layer in self.delta else out
            self.probs.append(out)
            return out
        return hook

    def run(self, x):
        self.probs, self.outs = [], []
        return self.ref.forward_features(x)

    def score(self, feats, target: Target, ref):
        """The target read from normed tokens by timm's own head: y_c, ⟨f(x), f⟩ or ⟨g_p(x), g_p⟩."""
        if target.kind == "class":
            return self.ref.forward_head(feats)[0, target.index]
        if target.kind == "embedding":
            return self.ref.forward_head(feats, pre_logits=True)[0] @ ref
        return feats[0, self.ref.num_prefix_tokens + target.index] @ ref

    def reference(self, feats, target: Target):
        if target.kind == "embedding":
            return self.ref.forward_head(feats, pre_logits=True)[0].detach()
        if target.kind == "patch":
            return feats[0, self.ref.num_prefix_tokens + target.index].detach()
        return None


TARGETS = {"class": Target("class", 2), "embedding": Target("embedding"), "patch": Target("patch", 5)}


@pytest.mark.parametrize("per_layer", [False, True], ids=["total", "per_layer"])
@pytest.mark.parametrize("kind", list(TARGETS))
def test_gradients_equal_finite_differences(kind, per_layer):
    """⟨∂s/∂A_l, D⟩ equals (s(A_l + εD) - s(A_l - εD)) / 2ε through timm's eager path, in double precision.

    per_layer: s_l is read from layer l's own output through the final norm and head (LeGrad), and only A_l moves.
    """
    model = layout_model("registers", num_classes=5 if kind == "class" else 0, dtype=torch.float64)
    x = layout_image(model)
    target = TARGETS[kind]
    got = attention_gradients(model, x, target=target, per_layer=per_layer)
    probe = EagerProbe(model)
    with torch.no_grad():
        ref = probe.reference(probe.run(x), target)
        torch.testing.assert_close(got.attention, torch.cat(probe.probs), rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(3)
    eps = 1e-6

    def s(layer, delta):
        probe.delta = {layer: delta}
        feats = probe.run(x)
        return float(probe.score(probe.ref.norm(probe.outs[layer]) if per_layer else feats, target, ref))

    with torch.no_grad():
        for layer in range(len(model.blocks)):
            for _ in range(2):
                d = torch.randn(got.gradients.shape[1:], generator=g, dtype=torch.float64)
                fd = (s(layer, eps * d) - s(layer, -eps * d)) / (2 * eps)
                analytic = float((got.gradients[layer] * d).sum())
                assert abs(analytic) > 1e-6, "a zero gradient would make this check vacuous"
                assert fd == pytest.approx(analytic, rel=1e-6, abs=1e-9)


def _eager_total(model, x, target):
    """A_l and ∂s/∂A_l (L, H, T, T) by one backward through timm's eager path."""
    probe = EagerProbe(model)
    feats = probe.run(x)
    ref = probe.reference(feats, target)
    grads = torch.autograd.grad(probe.score(feats, target, ref), probe.probs)
    return torch.cat(probe.probs).detach().double(), torch.cat(grads).double()


def _eager_per_layer(model, x, target):
    """∂s_l/∂A_l for each layer l by its own backward, s_l read from block l's output (LeGrad)."""
    probe = EagerProbe(model)
    feats = probe.run(x)
    ref = probe.reference(feats, target)
    grads = []
    for layer in range(len(model.blocks)):
        s_l = probe.score(probe.ref.norm(probe.outs[layer]), target, ref)
        grads.append(torch.autograd.grad(s_l, probe.probs[layer], retain_graph=True)[0])
    return torch.cat(grads).double()


def _grid(model):
    return tuple(int(v) for v in model.patch_embed.grid_size)


def read_rows(model, target: Target) -> list[int]:
    """The final tokens the target reads, by timm's heads: patch p's own token; the CLS token (CLS and distillation
    tokens, averaged, for a distilled DeiT); every patch for an average pool."""
    p, n = model.num_prefix_tokens, model.patch_embed.num_patches
    if target.kind == "patch":
        return [p + target.index]
    if model.global_pool == "avg":
        return list(range(p, p + n))
    return [0, 1] if getattr(model, "dist_token", None) is not None else [0]


def naive_chefer(A, G, *, prefix, grid, rows=(0,)):
    """R = I; for each layer R = R + E_h[(∇A ⊙ A)⁺] · R with full (T, T) matrices; the mean of the rows the target
    reads (the CLS row in Chefer et al.) over the patches."""
    A, G = A.numpy(), G.numpy()
    L, H, T, _ = A.shape
    R = np.eye(T)
    for layer in range(L):
        cam = np.zeros((T, T))
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    cam[i, j] += max(G[layer, h, i, j] * A[layer, h, i, j], 0.0) / H
        R = R + cam @ R
    return R[list(rows)].mean(0)[prefix:].reshape(grid)


def naive_legrad(G, *, prefix, grid, start=0):
    """Σ_{l ≥ start} mean over heads h and queries i of (∇A_l)⁺[h, i, j], patch columns j, then min-max."""
    G = G.numpy()
    L, H, T, _ = G.shape
    e = np.zeros(T)
    for layer in range(start, L):
        for j in range(T):
            e[j] += sum(max(G[layer, h, i, j], 0.0) for h in range(H) for i in range(T)) / (H * T)
    heat = e[prefix:].reshape(grid)
    return (heat - heat.min()) / (heat.max() - heat.min())


def _close(got, want):
    want = np.asarray(want, dtype=np.float64)
    assert np.abs(want).max() > 1e-4, "a vanishing reference map would make this check vacuous"
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max())


CASES = [(layout, kind) for layout in LAYOUTS for kind in ("class", "embedding")]


@pytest.mark.parametrize(("layout", "kind"), [*CASES, ("cls", "patch"), ("avg_pool", "patch")])
def test_chefer_and_grad_attention_equal_naive_references(layout, kind):
    """Both follow the rows the target reads (a patch target's own token, an average pool's patches): the CLS row's
    gradient is zero where the head never reads the CLS token, and that map would be flat."""
    model = layout_model(layout, num_classes=6 if kind == "class" else 0)
    x = layout_image(model)
    target = Target(kind, {"class": 1, "patch": 5}[kind]) if kind in ("class", "patch") else Target(kind)
    A, G = _eager_total(model, x, target)
    p, grid = model.num_prefix_tokens, _grid(model)
    rows = read_rows(model, target)
    chefer, gxa = explain_all(model, x, methods=["chefer", "gradxattn"], target=target)
    assert chefer.map.shape == grid and chefer.map.dtype == np.float32
    _close(chefer.map, naive_chefer(A, G, prefix=p, grid=grid, rows=rows))
    last = np.array([[[max(float(G[-1, h, i, j] * A[-1, h, i, j]), 0.0) for j in range(A.shape[-1])] for i in rows]
                     for h in range(A.shape[1])]).mean(axis=(0, 1))
    _close(gxa.map, last[p:].reshape(grid))
    assert gxa.informative and not gxa.notes


@pytest.mark.parametrize(("layout", "kind"), CASES)
def test_legrad_equals_naive_reference_with_one_backward_per_layer(layout, kind):
    model = layout_model(layout, num_classes=6 if kind == "class" else 0)
    x = layout_image(model)
    target = Target(kind, 4) if kind == "class" else Target(kind)
    G = _eager_per_layer(model, x, target)
    p, grid = model.num_prefix_tokens, _grid(model)
    full, last2 = explain_all(model, x, methods=["legrad", "legrad:start=-2"], target=target)
    _close(full.map, naive_legrad(G, prefix=p, grid=grid))
    _close(last2.map, naive_legrad(G, prefix=p, grid=grid, start=len(model.blocks) - 2))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rollout_and_raw_attention_equal_references(layout):
    model = layout_model(layout)
    x = layout_image(model)
    probe = EagerProbe(model)
    with torch.no_grad():
        probe.run(x)
    A = torch.cat(probe.probs).double()  # (L, H, T, T)
    p, grid = model.num_prefix_tokens, _grid(model)
    L = len(model.blocks)
    got = explain_all(model, x, methods=["rollout", "rollout:start=1,discard=0.5", "raw", "raw:layer=0,fusion=max"])
    _close(got[0].map, naive_rollout(A, start=0, end=L - 1, fusion="mean", ratio=0.0)[p:].reshape(grid))
    _close(got[1].map, naive_rollout(A, start=1, end=L - 1, fusion="mean", ratio=0.5)[p:].reshape(grid))
    _close(got[2].map, A[-1, :, 0, p:].mean(0).reshape(grid).numpy())
    _close(got[3].map, A[0, :, 0, p:].amax(0).reshape(grid).numpy())
    assert all(not e.uses_target and e.passes == "1 forward (attention only)" for e in got)


def test_shared_passes_give_the_same_maps_as_one_method_at_a_time():
    model = layout_model("registers", num_classes=4)
    x = layout_image(model)
    methods = ["rollout:start=1", "raw", "chefer", "legrad", "legrad:start=-2", "gradxattn", "random:seed=3"]
    together = explain_all(model, x, methods=methods)
    for m, e in zip(methods, together, strict=True):
        alone = explain(model, x, method=m)
        np.testing.assert_array_equal(e.map, alone.map)
        assert e.method == alone.method == Method.parse(m)


def test_gradients_of_some_layers_equal_those_of_all():
    model = layout_model("registers", num_classes=4)
    x = layout_image(model)
    for per_layer in (False, True):
        full = attention_gradients(model, x, per_layer=per_layer)
        some = attention_gradients(model, x, per_layer=per_layer, layers=[-1, 1])
        assert full.layers == (0, 1, 2) and some.layers == (1, 2)
        torch.testing.assert_close(some.gradients, full.gradients[1:], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(some.attention, full.attention)
    assert explain(model, x, method="gradxattn").passes == "1 forward + 1 backward (through the last layer only)"
    with pytest.raises(ParameterError, match="out of range"):
        attention_gradients(model, x, layers=[3])


def test_explanation_describes_its_target_and_cost():
    model = layout_model(num_classes=1000)  # timm names a 1000-class head with ImageNet-1k's classes
    x = layout_image(model)
    e = explain(model, x, method="chefer")
    top = e.predictions[0]
    assert e.target == Target("class", top.index)  # auto on a classifier: the top-1 class
    name, _, p = e.target_description.rpartition(" (p = ")
    assert name == f"class {top.index} '{class_names(model)[top.index]}'"
    assert float(p.rstrip(")")) == pytest.approx(top.probability, rel=0.05)  # significant digits, not 0.00
    assert len(e.predictions) == 5 and e.uses_target and e.passes == "1 forward + 1 backward" and e.seconds > 0
    assert not e.map.flags.writeable
    other = explain(model, x, method="chefer", target="class:207")
    assert other.target_description.startswith("class 207 'golden retriever' (p = ")
    assert not np.allclose(other.map, e.map)  # a different class, a different map
    backbone = layout_model()
    e = explain(backbone, layout_image(backbone), method="legrad")
    assert e.target == Target("embedding") and e.target_description == "the image's own CLS embedding"
    assert e.predictions == ()
    e = explain(backbone, layout_image(backbone), method="chefer", target="patch:6")
    assert e.target_description == "patch 6's own feature (row 1, column 2)"
    dist = layout_model("distilled", num_classes=3)
    assert "distillation" in explain(dist, layout_image(dist), method="raw", target="embedding").target_description


def test_random_map_is_seeded_and_needs_no_gradients():
    model = layout_model()
    x = layout_image(model)
    a, b, c = explain_all(model, x, methods=["random", "random", "random:seed=1"])
    np.testing.assert_array_equal(a.map, b.map)
    assert not np.array_equal(a.map, c.map)
    assert a.map.shape == _grid(model) and a.passes == "none" and not a.uses_target
    assert ((a.map >= 0) & (a.map < 1)).all()


def test_a_model_without_a_head_never_gets_a_class_or_predictions():
    model = layout_model()
    x = layout_image(model)
    assert not has_head(model) and label_set(model) is None and class_names(model) is None
    for target in ("class", "class:0", Target("class", 3)):
        for method in ("chefer", "rollout", "random"):
            with pytest.raises(ModelError, match="no classifier head"):
                explain(model, x, method=method, target=target)
    with pytest.raises(ModelError, match="no classifier head"):
        predict(model, x)
    with pytest.raises(ModelError):
        class_name(model, 0)
    assert all(e.predictions == () for e in explain_all(model, x, methods=["chefer", "rollout", "random"]))


def test_predictions_are_the_softmax_top_k_with_names_or_indices():
    model = layout_model(num_classes=10)
    x = layout_image(model)
    preds = predict(model, x, k=3)
    with torch.no_grad():
        probs = model(x)[0].softmax(-1)
    order = probs.argsort(descending=True)[:3].tolist()
    assert [p.index for p in preds] == order
    assert [p.probability for p in preds] == pytest.approx(probs[order].tolist(), rel=1e-6)
    assert label_set(model) is None and preds[0].name is None and class_name(model, 3) == "class 3"
    assert preds[0].describe() == f"class {order[0]} (p = {preds[0].probability:.2f})"
    named = top_predictions(torch.tensor([0.0, 2.0, 1.0]), names=["a", "b", "c"], k=2)
    assert [(p.index, p.name) for p in named] == [(1, "b"), (2, "c")] and named[0].logit == 2.0
    big = layout_model(num_classes=1000)
    assert label_set(big) == "imagenet-1k" and class_name(big, 207) == "golden retriever"


def test_targets_and_methods_parse_and_refuse_bad_input():
    assert Target.parse("class:12") == Target("class", 12) and Target.parse("auto") == Target()
    assert Target.parse("patch:3").label == "patch:3" and Target.parse("Embedding") == Target("embedding")
    for bad in ("class:x", "patch", "embedding:2", "cls", "class:-1"):
        with pytest.raises(ParameterError):
            Target.parse(bad)
    m = Method.parse("rollout:start=1, discard=0.9,fusion=max")
    assert m == Method("rollout", start=1, discard=0.9, fusion="max")
    assert Method.parse(m.label) == m and m.label == "rollout:start=1,discard=0.9,fusion=max"
    assert Method.parse("chefer").label == "chefer" and Method.parse("legrad:start=-2").settings.start == -2
    for bad in ("nope", "chefer:start=1", "rollout:discard=1.0", "rollout:fusion=median", "raw:layer=x",
                "rollout:start"):
        with pytest.raises(ParameterError):
            Method.parse(bad)
    model = layout_model()
    x = layout_image(model)
    for bad in ("raw:layer=3", "rollout:start=-4", "legrad:start=5"):
        with pytest.raises(ParameterError, match="out of range"):
            explain(model, x, method=bad)
    with pytest.raises(ParameterError, match="patch 16 does not exist"):
        explain(model, x, method="chefer", target="patch:16")
    with pytest.raises(ParameterError):
        explain(model, torch.randn(2, 3, 32, 32))
    clf = layout_model(num_classes=4)
    with pytest.raises(ParameterError, match="class 4 does not exist"):
        explain(clf, layout_image(clf), target="class:4")


def test_nothing_is_left_on_the_model_also_after_an_exception(monkeypatch):
    for model in (layout_model(num_classes=3), layout_model().requires_grad_(False)):
        x = layout_image(model)
        before = hook_state(model)
        explain_all(model, x, methods=["chefer", "legrad", "rollout", "random"])
        with torch.inference_mode():  # a caller's inference mode: the walk still gets its gradients
            inside = explain(model, x, method="chefer")
        np.testing.assert_allclose(inside.map, explain(model, x, method="chefer").map, rtol=1e-6)
        assert hook_state(model) == before
        assert all(p.grad is None for p in model.parameters())

        def boom(*_a, **_k):
            raise RuntimeError("backward failed")

        with monkeypatch.context() as mp:
            mp.setattr(torch.autograd, "grad", boom)
            with pytest.raises(RuntimeError, match="backward failed"):
                explain(model, x, method="legrad")
        with pytest.raises(VitvizError):
            explain(model, x, target="class:99" if has_head(model) else "class")
        assert hook_state(model) == before and torch.is_grad_enabled()
        assert all(p.grad is None for p in model.parameters())


def test_threads_on_one_shared_model_get_the_single_thread_results():
    model = layout_model("registers", num_classes=5)
    images = [layout_image(model, seed=s) for s in range(4)]
    methods = ["chefer", "legrad", "rollout:start=1", "gradxattn"]
    want = [[e.map for e in explain_all(model, x, methods=methods)] for x in images]

    def work(worker, rep):
        i = (worker + rep) % len(images)
        return i, [e.map for e in explain_all(model, images[i], methods=methods)]

    got = in_threads(work, workers=4, rounds=3)
    assert len(got) == 12
    for i, maps in got.values():
        for a, b in zip(maps, want[i], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_interrupt_is_asked_before_every_block_and_stops_the_walk():
    """The walk asks ``interrupt`` before each block: a one-pass method asks once per layer, and raising stops it."""
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    asked = []
    explain(model, x, method="chefer", target="embedding", interrupt=lambda: asked.append(1))
    assert len(asked) == len(model.blocks)

    class Stop(Exception):
        pass

    def stop_at_second():
        asked.append(1)
        if len(asked) == 2:
            raise Stop

    asked.clear()
    with pytest.raises(Stop):
        explain(model, x, method="legrad", target="embedding", interrupt=stop_at_second)
    assert len(asked) == 2
    asked.clear()
    explain(model, x, method="deletion:steps=2", target="embedding", interrupt=lambda: asked.append(1))
    assert len(asked) == 2 * (1 + len(model.blocks))  # each step: once before it, once per block of its walk
