"""Models: encoders, heads, cross-task attention, DenseMTL and the baselines."""

from .baselines import DeepLabMTL, PADNet, PADNetPlus
from .checkpoint import load_model, save_model
from .densemtl import DenseMTL, HardSharing, MultiTaskNet
from .registry import ARCHS, build_model, read_model_config, register_arch

__all__ = [
    "ARCHS",
    "DeepLabMTL",
    "DenseMTL",
    "HardSharing",
    "MultiTaskNet",
    "PADNet",
    "PADNetPlus",
    "build_model",
    "load_model",
    "read_model_config",
    "register_arch",
    "save_model",
]
