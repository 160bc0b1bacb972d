"""The ``densemtl`` command: a thin dispatcher to the module that owns each sub-command.

Each entry maps a sub-command to ``module:function``; the function takes the remaining argv
and returns an exit code. Modules are imported lazily so ``densemtl synth`` does not pay for
Lightning and ``densemtl summary`` does not pay for the data stack.
"""

from __future__ import annotations

import importlib
import sys

from .errors import debug_requested, did_you_mean, explain

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("densemtl.training.cli", "Train a model (LightningCLI)."),
    "validate": ("densemtl.training.cli", "Evaluate on the validation split (LightningCLI)."),
    "test": ("densemtl.training.cli", "Evaluate on the test split, write metrics and report."),
    "predict": ("densemtl.predict", "Predict on images: colourised PNGs + arrays."),
    "synth": ("densemtl.data.synthetic", "Generate the built-in procedural benchmark."),
    "summary": ("densemtl.models.summary", "Print a per-module parameter table for a config."),
    "convert-official": ("densemtl.models.official", "Convert an official .pkl checkpoint."),
    "export": ("densemtl.export", "Export a checkpoint to ONNX."),
    "eval-edges": ("densemtl.eval_edges", "Boundary ODS/OIS/AP (BSDS protocol) of edge maps."),
    "bench": ("densemtl.bench", "Time training steps and inference."),
}


def _usage() -> str:
    lines = ["usage: densemtl <command> [options]", "", "commands:"]
    lines += [f"  {name:<18}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'densemtl <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. A mistake of the caller (an option, a config value, a file) ends in
    one or two lines naming it, exit code 2; ``--debug`` (or ``DENSEMTL_DEBUG=1``) shows the
    traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"densemtl: unknown command '{name}'{did_you_mean(name, COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        code = module.main(rest, command=name)
    except KeyboardInterrupt:
        print(f"densemtl {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = None if debug else explain(exc)
        if message is None:
            raise
        print(f"densemtl {name}: error: {message}\n(add --debug for the traceback)",
              file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
