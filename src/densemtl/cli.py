"""The ``densemtl`` command: a thin dispatcher to the module that owns each sub-command.

Each entry maps a sub-command to ``module:function``; the function takes the remaining argv
and returns an exit code. Modules are imported lazily so ``densemtl synth`` does not pay for
Lightning and ``densemtl summary`` does not pay for the data stack.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("densemtl.training.cli", "Train a model (LightningCLI)."),
    "validate": ("densemtl.training.cli", "Evaluate on the validation split (LightningCLI)."),
    "test": ("densemtl.training.cli", "Evaluate on the test split, write metrics and report."),
    "predict": ("densemtl.training.predict", "Predict on images: colourised PNGs + arrays."),
    "synth": ("densemtl.data.synthetic", "Generate the built-in procedural benchmark."),
    "summary": ("densemtl.models.summary", "Print a per-module parameter table for a config."),
    "convert-official": ("densemtl.models.official", "Convert an official .pkl checkpoint."),
    "export": ("densemtl.export", "Export a checkpoint to ONNX."),
    "bench": ("densemtl.bench", "Time training steps and inference."),
}


def _usage() -> str:
    lines = ["usage: densemtl <command> [options]", "", "commands:"]
    lines += [f"  {name:<18}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'densemtl <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"densemtl: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest, command=name)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
