"""``densemtl summary``: a per-module parameter table for a model config."""

from __future__ import annotations

import argparse

from torch import nn

from .registry import build_model, read_model_config


def count(module: nn.Module) -> int:
    """Number of (unique) trainable parameter elements."""
    return sum(p.numel() for p in module.parameters())


def parameter_table(model: nn.Module, depth: int = 4) -> list[tuple[str, int]]:
    """(dotted module name, parameter count) for modules down to ``depth``, in model order.

    Plain ``nn.Sequential`` stacks (ResNet stages, conv-BN-ReLU) are shown as one row.
    """
    rows: list[tuple[str, int]] = []

    def walk(module: nn.Module, prefix: str, level: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            n = count(child)
            if n == 0:
                continue
            rows.append((full, n))
            if level < depth and not isinstance(child, nn.Sequential):
                walk(child, full, level + 1)

    walk(model, "", 1)
    return rows


def format_table(model: nn.Module, depth: int = 4) -> str:
    rows = parameter_table(model, depth)
    width = max([len(name) + 2 * name.count(".") for name, _ in rows] + [6])
    lines = [f"{'module':<{width}}  {'parameters':>12}", "-" * (width + 14)]
    for name, n in rows:
        indent = "  " * name.count(".")
        lines.append(f"{indent + name.rsplit('.', 1)[-1]:<{width}}  {n:>12,}")
    lines.append(f"parameters: {count(model)}")
    return "\n".join(lines)


def main(argv: list[str], command: str = "summary") -> int:
    parser = argparse.ArgumentParser(prog=f"densemtl {command}",
                                     description="Per-module parameter table of a model config.")
    parser.add_argument("--config", required=True, help="YAML config with a 'model' section")
    parser.add_argument("--depth", type=int, default=4, help="module nesting shown (default 4)")
    args = parser.parse_args(argv)
    try:
        model = build_model(read_model_config(args.config), pretrained=False)
    except (ValueError, FileNotFoundError) as exc:
        print(f"densemtl {command}: {exc}")
        return 1
    print(f"{args.config}: arch {model.config['network']['arch']}, "
          f"tasks {', '.join(f'{t}({c})' for t, c in model.tasks.items())}")
    print(format_table(model, args.depth))
    return 0
