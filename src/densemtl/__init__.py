"""densemtl: DenseMTL (cross-task attention for dense multi-task learning) and its toolkit."""

from .models import build_model, load_model, save_model

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "load_model", "save_model"]
