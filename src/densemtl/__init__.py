"""densemtl: DenseMTL (cross-task attention for dense multi-task learning) and its toolkit."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "load_model", "save_model"]


def __getattr__(name: str) -> Any:
    """Import the model API lazily (``densemtl synth`` need not load it)."""
    if name in ("build_model", "load_model", "save_model"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'densemtl' has no attribute {name!r}")
