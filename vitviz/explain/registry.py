"""Every explanation method vitviz offers, in menu order: the app's menu, the CLI's help and ``vitviz evaluate`` read
this one list. Adding a method: its module (one :class:`~._base.MethodSpec`), one line here, one row in
tests/test_methods.py."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import ParameterError
from ._base import MethodSpec
from .baseline import RANDOM
from .chefer import CHEFER, GRADXATTN
from .deletion import DELETION
from .legrad import LEGRAD
from .lrp import LRP
from .rollout import RAW, ROLLOUT

__all__ = ["METHODS", "METHOD_NAMES", "DEFAULT_METHOD", "Method", "method_spec"]

METHODS: tuple[MethodSpec, ...] = (ROLLOUT, RAW, CHEFER, LEGRAD, GRADXATTN, LRP, DELETION, RANDOM)
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
# the app's default explanation (and analyze's --method default): the best mean rank over the faithfulness measures
# no method optimizes, among the methods that cost at most 3 forward passes (benchmarks/results-measures.md): AttnLRP
# with the γ-rule in the last 4 blocks only (the γ-rule in every block ranks higher but costs more than 3 forwards;
# greedy deletion costs tens of passes and is offered on demand)
DEFAULT_METHOD = "lrp:gamma_from=-4"
_BY_NAME = {m.name: m for m in METHODS}


def method_spec(name: str) -> MethodSpec:
    """The registered method called ``name``; a :class:`ParameterError` naming the known ones otherwise."""
    spec = _BY_NAME.get(str(name).strip())
    if spec is None:
        raise ParameterError(f"unknown method {name!r}: choose one of {', '.join(METHOD_NAMES)}")
    return spec


@dataclass(frozen=True, init=False)
class Method:
    """A method and its settings, e.g. ``Method("rollout", start=1, discard=0.9)``; ``label`` writes it as
    ``name`` or ``name:key=value,...`` (what :meth:`parse` reads). Layers count from 0, negative from the end."""

    name: str
    settings: Any

    def __init__(self, name: str, settings: Any = None, **kwargs: Any) -> None:
        spec = method_spec(name)
        if settings is None:
            try:
                settings = spec.settings(**kwargs)
            except TypeError:
                keys = ", ".join(f.name for f in fields(spec.settings)) or "none"
                raise ParameterError(f"method {spec.name!r} takes the settings: {keys}") from None
        object.__setattr__(self, "name", spec.name)
        object.__setattr__(self, "settings", settings)

    @property
    def spec(self) -> MethodSpec:
        return _BY_NAME[self.name]

    @property
    def label(self) -> str:
        default = self.spec.settings()
        parts = [f"{f.name}={getattr(self.settings, f.name)}" for f in fields(self.settings)
                 if getattr(self.settings, f.name) != getattr(default, f.name)]
        return self.name + (":" + ",".join(parts) if parts else "")

    def with_settings(self, **changes: Any) -> Method:
        return Method(self.name, replace(self.settings, **changes))

    @classmethod
    def parse(cls, text: str | Method) -> Method:
        """``chefer``, ``legrad:start=-2``, ``rollout:start=1,discard=0.9,fusion=mean``, ``deletion:steps=16``..."""
        if isinstance(text, Method):
            return text
        name, _, rest = str(text).strip().partition(":")
        spec = method_spec(name)
        return cls(spec.name, spec.parse_settings(rest))
