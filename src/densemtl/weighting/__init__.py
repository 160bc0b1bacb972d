"""Multi-task weighting methods: how the task losses become one update.

Choose one with ``model.init_args.weighting: {name: <method>, <option>: <value>, ...}``; the
default is ``fixed`` (the paper). ``name`` is one of :data:`WEIGHTINGS` or the dotted path of
your own :class:`Weighting` subclass (``mypackage.module.MyWeighting``). See
``densemtl.weighting.base`` for the two kinds and how they meet the training loop.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import UsageError, did_you_mean
from .aligned_mtl import AlignedMTL
from .base import GradientAggregation, LossScalarisation, Weighting
from .cagrad import CAGrad
from .dwa import DWA
from .famo import FAMO
from .fixed import Fixed
from .geometric_mean import GeometricMean
from .imtl_g import IMTLG
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .uncertainty import Uncertainty
from .upgrad import UPGrad

__all__ = ["WEIGHTINGS", "GradientAggregation", "LossScalarisation", "Weighting",
           "build_weighting", "weighting_class"]

WEIGHTINGS: dict[str, type[Weighting]] = {cls.name: cls for cls in (
    Fixed, Uncertainty, DWA, FAMO, GeometricMean,
    UPGrad, MGDA, PCGrad, CAGrad, IMTLG, AlignedMTL, NashMTL)}
"""The built-in methods by name: loss scalarisations first, then gradient aggregations."""


def weighting_class(name: str) -> type[Weighting]:
    """The method called ``name``: a built-in name or a dotted path to a Weighting subclass."""
    if name in WEIGHTINGS:
        return WEIGHTINGS[name]
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"weighting '{name}' cannot be imported: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Weighting)):
            raise ValueError(f"weighting '{name}' is not a densemtl.weighting.Weighting subclass")
        return cls
    raise ValueError(f"unknown weighting '{name}'{did_you_mean(name, WEIGHTINGS)}; choose one "
                     f"of {', '.join(WEIGHTINGS)} or give the dotted path of a Weighting "
                     "subclass")


def build_weighting(spec: Mapping[str, Any] | str | None, tasks: Sequence[str]) -> Weighting:
    """A method from its config, ``{name: ..., <options>}`` (a bare name works too)."""
    if spec is None:
        spec = {"name": "fixed"}
    elif isinstance(spec, str):
        spec = {"name": spec}
    options = dict(spec)
    name = str(options.pop("name", "fixed"))
    cls = weighting_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tasks")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise ValueError(f"weighting '{name}': unknown option(s) {', '.join(unknown)} "
                         f"(its options: {allowed})")
    try:
        return cls(list(tasks), **options)
    except UsageError:
        raise
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weighting '{name}': {exc}") from None
