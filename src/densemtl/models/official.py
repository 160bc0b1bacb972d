"""Import of the official DenseMTL checkpoints (``{sy,vk,cs}_densemtl_{SD,SDN}.pkl``).

The official state dict (``OursAtt.state_dict()``) names tensors

    backbone.encoder.<torchvision resnet>            -> encoder.<same>
    heads.<t>.decoder.<k>.*   (k in insertion order)  -> decoders.<t>.{up,merge,side}.<i>.*
    m.<t>.<stage>.<module>_<source>.*                 -> exchange.<stage>.pairs.<t>.<source>.*
    m.<t>.<stage>.post.*                              -> exchange.<stage>.post.<t>.*
    params.<t>.{0,1}.*   (aliases of heads/m)         -> dropped

Decoder index k: 0 up4 (ASPP), 1 skip4, 2 merge4, 3 up3, 4 skip3, 5 merge3, 6 up2, 7 skip2,
8 merge2, 9 up1, 10 skip1, 11 merge1, 12 up0, 13 merge0, then one side conv per entry of
``active_scales`` in that order (k = 14, 15, ...).

The order of the sources inside each target's fusion input came from Python set iteration in
the process that trained the checkpoint; ``source_order`` records it in the converted model's
config (``network.exchange.source_order``), so no weight is permuted.
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import save_model
from .densemtl import MultiTaskNet
from .registry import build_model, read_model_config

_SA_PARTS = {"attention.0": "sa.gate", "conv": "sa.feat"}
_SXTAM_PARTS = {"conv_b": "sxtam.query", "conv_c": "sxtam.key", "conv_d": "sxtam.value"}


def _decoder_index_map(scales: Sequence[int]) -> dict[int, str]:
    names: dict[int, str] = {}
    k = 0
    for i in range(4, -1, -1):
        names[k] = f"up.{i}"
        k += 1
        if i > 0:
            k += 1  # skip_proj(i): identity, no parameters
        names[k] = f"merge.{i}"
        k += 1
    for s in scales:
        names[k] = f"side.{s}"
        k += 1
    return names


def _decoder_rest(rest: str) -> str:
    """Inside a decoder module: ConvBlock ``block.0.conv.x`` -> ``conv.x``; ASPP/side as is."""
    return rest[len("block.0."):] if rest.startswith("block.0.conv.") else rest


def _exchange_rest(module: str, rest: str, tasks: Sequence[str]) -> tuple[str, str] | None:
    """``extract_depth`` + ``0.weight`` -> (``depth``, ``extract.0.weight``)."""
    for prefix in ("extract", "SA", "SxTAM", "proj"):
        if not module.startswith(prefix + "_"):
            continue
        source = module[len(prefix) + 1:]
        if source not in tasks:
            return None
        if prefix in ("extract", "proj"):
            return source, f"{prefix}.{rest}"
        if prefix == "SA":
            for old, new in _SA_PARTS.items():
                if rest.startswith(old + "."):
                    return source, new + rest[len(old):]
            return None
        if rest == "alpha":
            return source, "sxtam.alpha"
        head, _, tail = rest.partition(".")
        return (source, f"{_SXTAM_PARTS[head]}.{tail}") if head in _SXTAM_PARTS else None
    return None


def map_official_key(key: str, tasks: Sequence[str], scales: Sequence[int]) -> str | None:
    """Our name for an official key, ``""`` for a dropped alias, ``None`` if unknown."""
    if key.startswith("params."):
        return ""
    if key.startswith("backbone.encoder."):
        return "encoder." + key[len("backbone.encoder."):]
    m = re.fullmatch(r"heads\.([^.]+)\.decoder\.(\d+)\.(.+)", key)
    if m:
        task, k, rest = m.group(1), int(m.group(2)), m.group(3)
        index = _decoder_index_map(scales)
        if task not in tasks or k not in index:
            return None
        return f"decoders.{task}.{index[k]}.{_decoder_rest(rest)}"
    m = re.fullmatch(r"m\.([^.]+)\.(\d)\.([^.]+)\.(.+)", key)
    if m:
        target, stage, module, rest = m.groups()
        if target not in tasks:
            return None
        if module == "post":
            return f"exchange.{stage}.post.{target}.{rest}"
        mapped = _exchange_rest(module, rest, tasks)
        if mapped is None:
            return None
        source, sub = mapped
        return f"exchange.{stage}.pairs.{target}.{source}.{sub}"
    return None


class ConversionError(ValueError):
    """The official state dict does not fit the model built from the config."""


def _listing(title: str, items: Sequence[str], limit: int = 20) -> str:
    shown = "\n".join(f"    {x}" for x in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def convert_state_dict(
    official: Mapping[str, Tensor], model: MultiTaskNet
) -> dict[str, Tensor]:
    """Map an official state dict onto ``model``'s names; raise listing every mismatch."""
    network = model.config.get("network", {})
    scales = (network.get("decoder") or {}).get("scales", [0, 1])
    tasks = list(model.tasks)
    ours = model.state_dict()
    converted: dict[str, Tensor] = {}
    unexpected, misshaped = [], []
    for key, value in official.items():
        name = map_official_key(key, tasks, scales)
        if name == "":
            continue
        if name is None or name not in ours:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(ours[name].shape):
            misshaped.append(f"{key} -> {name}: official {tuple(value.shape)}, "
                             f"ours {tuple(ours[name].shape)}")
            continue
        converted[name] = value
    missing = [k for k in ours if k not in converted]
    if missing or unexpected or misshaped:
        parts = ["the official state dict does not match the model built from the config:"]
        if missing:
            parts.append(_listing("missing (in our model, not in the checkpoint)", missing))
        if unexpected:
            parts.append(_listing("unexpected (in the checkpoint, not in our model)", unexpected))
        if misshaped:
            parts.append(_listing("mis-shaped", misshaped))
        raise ConversionError("\n".join(parts))
    return converted


def _read_official(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a PyTorch state dict ({exc})") from exc
    for wrapper in ("state_dict", "model"):  # resume-style files wrap the weights
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (model.state_dict())")
    return dict(state)


def parse_source_order(items: Sequence[str]) -> dict[str, list[str]]:
    """``["semseg=normals,depth", ...]`` -> ``{"semseg": ["normals", "depth"]}``."""
    order: dict[str, list[str]] = {}
    for item in items:
        target, sep, sources = item.partition("=")
        if not sep or not target or not sources:
            raise ValueError(f"--source-order expects TARGET=SRC1,SRC2,..., got '{item}'")
        order[target.strip()] = [s.strip() for s in sources.split(",") if s.strip()]
    return order


def convert_official(
    config: Mapping[str, Any],
    official: Mapping[str, Tensor],
    source_order: Mapping[str, Sequence[str]] | None = None,
    exact: bool = True,
) -> MultiTaskNet:
    """Build the model of ``config`` (tasks + network) and load an official state dict.

    ``exact`` (default) selects the literal reference paths (explicit attention, upsampling
    before the decoder convs), which reproduce the official fp32 outputs bit for bit;
    ``exact=False`` keeps the config's fast paths (SDPA, fused upsampling), which agree up to
    float rounding and are faster and lighter.
    """
    config = copy.deepcopy(dict(config))
    network = config["network"] = dict(config["network"])
    if network.get("arch") not in ("densemtl", "mtl"):
        raise ValueError(f"official checkpoints are DenseMTL models (arch 'densemtl', or 'mtl' "
                         f"without exchange); the config says '{network.get('arch')}'")
    if exact:
        network["decoder"] = {**(network.get("decoder") or {}), "fused_upsample": False}
    if network["arch"] == "densemtl":
        exchange = dict(network.get("exchange") or {})
        if source_order:
            exchange["source_order"] = {**(exchange.get("source_order") or {}),
                                        **{t: list(s) for t, s in source_order.items()}}
        if exact:
            exchange["attention"] = "explicit"
        network["exchange"] = exchange
    elif source_order:
        raise ValueError("--source-order needs an exchange block (arch 'densemtl')")
    model = build_model(config, pretrained=False)
    model.load_state_dict(convert_state_dict(official, model))
    return model.eval()


def main(argv: list[str], command: str = "convert-official") -> int:
    parser = argparse.ArgumentParser(
        prog=f"densemtl {command}",
        description="Convert an official DenseMTL .pkl state dict into a densemtl checkpoint.")
    parser.add_argument("--config", required=True, help="our YAML config of the same model")
    parser.add_argument("--official", required=True, help="official state dict (.pkl)")
    parser.add_argument("--out", required=True, help="output checkpoint (.ckpt)")
    parser.add_argument(
        "--source-order", action="append", default=[], metavar="TARGET=SRC1,SRC2",
        help="order of the sources in TARGET's fusion input, as in the process that trained "
             "the checkpoint (repeatable; default: the config's task order)")
    parser.add_argument(
        "--fast", action="store_true",
        help="keep the config's fast paths (SDPA attention, fused decoder upsampling): faster "
             "and lighter, outputs agree with the official ones up to float rounding. Default: "
             "the reference paths, which give the official fp32 outputs bit for bit")
    args = parser.parse_args(argv)
    try:
        model = convert_official(read_model_config(args.config),
                                 _read_official(Path(args.official)),
                                 parse_source_order(args.source_order),
                                 exact=not args.fast)
    except (ValueError, FileNotFoundError) as exc:
        print(f"densemtl {command}: {exc}")
        return 1
    save_model(model, args.out, source=f"official:{Path(args.official).name}")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n:,} parameters, tasks {', '.join(model.tasks)})")
    return 0


__all__ = [
    "ConversionError",
    "convert_official",
    "convert_state_dict",
    "main",
    "map_official_key",
]
