"""The contract every registered explanation method keeps, on every token layout and target.

The methods are read from the registry (``vitviz.explain.registry.METHODS``), so a new method is checked here as soon
as it is registered; its one row in :data:`ROWS` says which of its settings to try and which layouts it refuses.
What each map means is checked against independent references elsewhere (test_explain.py, test_deletion.py,
test_lrp.py); here: the map's shape, finiteness and read-only state, the honesty of ``uses_target``, a model left
exactly as it was, refusals as a :class:`VitvizError` with a sentence, thread safety and the ``name:key=value`` labels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from vitviz.errors import ModelError, ParameterError, VitvizError
from vitviz.explain import METHOD_NAMES, METHODS, Method, Target, explain, explain_all

from .helpers import LAYOUTS, REFUSED_LAYOUTS, hook_state, in_threads, layout_image, layout_model


@dataclass(frozen=True)
class Row:
    """One method's row: ``fast``, the label the contract runs (short settings where the default is slow);
    ``other``, a label with every setting away from its default (None: the method has no settings); ``refuses``,
    the layouts it refuses with a ModelError."""

    other: str | None
    fast: str | None = None
    refuses: frozenset[str] = frozenset()


ROWS = {
    "rollout": Row("rollout:start=1,discard=0.5,fusion=max"),
    "raw": Row("raw:layer=0,fusion=min"),
    "chefer": Row(None),
    "legrad": Row("legrad:start=-2"),
    "gradxattn": Row(None),
    "lrp": Row("lrp:at=pixels,gamma=0.0,gamma_from=1,gamma_to=-2"),
    "deletion": Row("deletion:steps=5", fast="deletion:steps=2"),
    "random": Row("random:seed=7"),
}

ALL_LAYOUTS = [*LAYOUTS, *REFUSED_LAYOUTS]
# (requested target, whether the model has a classifier head, another target of the same model)
TARGETS = {
    "embedding": ("embedding", False, "patch:2"),
    "class": ("class:1", True, "class:2"),
    "patch": ("patch:5", False, "embedding"),
    "class_without_head": ("class", False, None),  # refused by every method: there is no class
}
PARAMS = [(spec.name, layout, target) for spec in METHODS for layout in ALL_LAYOUTS for target in TARGETS]


def _label(name: str) -> str:
    row = ROWS.get(name)
    return (row.fast if row is not None and row.fast else None) or name


@functools.cache
def _model_and_image(layout: str, head: bool):
    model = layout_model(layout, num_classes=3 if head else 0)
    return model, layout_image(model)


def _state(model: torch.nn.Module):
    """Everything a method could leave on the model: hooks, flags, modes, requires_grad, attributes, values, grads."""
    values = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return hook_state(model), values, [p.grad for p in model.parameters()]


def _assert_unchanged(model: torch.nn.Module, before) -> None:
    hooks, values, _grads = before
    assert hook_state(model) == hooks
    now = model.state_dict(keep_vars=True)
    assert now.keys() == values.keys()
    for k, v in values.items():
        assert torch.equal(now[k].detach(), v), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())


def test_every_registered_method_has_its_row_and_is_in_the_contract():
    assert {p[0] for p in PARAMS} == set(METHOD_NAMES)
    assert len(PARAMS) == len(METHOD_NAMES) * len(ALL_LAYOUTS) * len(TARGETS)
    missing = set(METHOD_NAMES) - set(ROWS)
    assert not missing, f"add a row to tests/test_methods.py ROWS for {sorted(missing)}"
    stale = set(ROWS) - set(METHOD_NAMES)
    assert not stale, f"ROWS names methods that are not registered: {sorted(stale)}"


@pytest.mark.parametrize(("name", "layout", "target"), PARAMS)
def test_method_contract(name, layout, target):
    requested, head, other = TARGETS[target]
    spec = next(m for m in METHODS if m.name == name)
    model, x = _model_and_image(layout, head)
    before = _state(model)
    refused = ModelError if target == "class_without_head" or layout in ROWS[name].refuses else None
    if refused is not None:
        with pytest.raises(refused) as err:
            explain(model, x, method=_label(name), target=requested)
        assert isinstance(err.value, VitvizError) and len(str(err.value).split()) >= 4  # a sentence, for a person
        _assert_unchanged(model, before)
        return

    e = explain(model, x, method=_label(name), target=requested)
    _assert_unchanged(model, before)
    assert e.method == Method.parse(_label(name))
    assert e.target == Target.parse(requested)
    assert e.map.shape == tuple(int(v) for v in model.patch_embed.grid_size) and e.map.dtype == np.float32
    assert np.isfinite(e.map).all()
    assert not e.map.flags.writeable
    with pytest.raises(ValueError):
        e.map[0, 0] = 1.0
    assert e.informative or e.notes  # a map that ranks nothing says so
    assert e.uses_target is spec.uses_target

    if spec.uses_target and layout != "cls":
        return
    f = explain(model, x, method=_label(name), target=other)
    _assert_unchanged(model, before)
    assert f.target == Target.parse(other) != e.target
    if spec.uses_target:  # on one layout: another target, another map
        assert not np.array_equal(e.map, f.map), f"{name}: the same map for {requested} and {other}"
    else:
        np.testing.assert_array_equal(e.map, f.map)


def test_every_method_from_threads_on_one_shared_model_gives_the_sequential_maps():
    model = layout_model("registers", num_classes=3)
    images = [layout_image(model, seed=s) for s in range(4)]
    methods = [_label(m.name) for m in METHODS]
    want = [[e.map for e in explain_all(model, x, methods=methods, target="class:1")] for x in images]
    before = _state(model)

    def work(worker, rep):
        i = (worker + rep) % len(images)
        return i, [e.map for e in explain_all(model, images[i], methods=methods, target="class:1")]

    got = in_threads(work, workers=4, rounds=2)
    assert len(got) == 8
    for i, maps in got.values():
        for m, a, b in zip(methods, maps, want[i], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=m)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_labels_round_trip_defaults_and_other_settings(name):
    default = Method(name)
    assert default.label == name and Method.parse(name) == default == Method.parse(default.label)
    other = ROWS[name].other
    if other is None:
        assert not fields(default.settings)
        return
    m = Method.parse(other)
    assert m.name == name and m.label == other and Method.parse(m.label) == m
    changed = {f.name for f in fields(m.settings) if getattr(m.settings, f.name) != getattr(default.settings, f.name)}
    assert changed == {f.name for f in fields(m.settings)}  # every setting away from its default
    assert Method(name, **{k: getattr(m.settings, k) for k in changed}) == m


def test_an_unknown_method_is_refused_naming_the_known_ones():
    for make in (Method.parse, Method, lambda n: explain_all(*_model_and_image("cls", False), methods=[n])):
        with pytest.raises(ParameterError) as err:
            make("nope")
        assert "nope" in str(err.value)
        assert all(n in str(err.value) for n in METHOD_NAMES)
