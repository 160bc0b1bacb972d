"""``densemtl fit | validate | test | predict --config ...`` through LightningCLI.

One run folder per run (``trainer.default_root_dir``): the resolved ``config.yaml``,
``checkpoints/`` (``last.ckpt`` and the best by ``checkpoint.monitor``), ``metrics/`` (one JSON
per evaluation), ``grids/`` (prediction grids), TensorBoard events and ``metrics.csv``; ``test``
adds ``metrics.json`` and ``report.md``. ``--ckpt_path last`` resumes exactly.
"""

from __future__ import annotations

import copy
import csv
import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from ..errors import UsageError, did_you_mean, explain
from ..io import save_torch


class LastAndBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state.

    Lightning (2.6) refreshes ``last.ckpt`` at a validation only when the top-k checkpoint was
    saved there too, i.e. only when the monitored metric improved, and not at all after the last
    training step when no validation falls on it; ``--ckpt_path last`` would then resume from an
    older step. Here ``last.ckpt`` is written after every validation and at the end of training.
    """

    def _save_last_if_stale(self, trainer: Trainer) -> None:
        if (self.save_last and not trainer.fast_dev_run and not trainer.sanity_checking
                and trainer.state.fn == TrainerFn.FITTING
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_stale(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if get_filesystem(str(path)).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_torch(path, checkpoint)
        return None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed or evaluated run appends to ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows of earlier runs in the same folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir or ".", exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# model arguments that say how a model is evaluated, not what it is: taken from the config and
# command line even when ``--ckpt_path`` brings the training run's arguments
EVALUATION_OPTIONS = ("metrics", "baselines", "baseline_runs", "score_metric",
                      "constant_fit_batches", "grid_samples")


class DenseCLI(LightningCLI):
    """LightningCLI with densemtl's run-folder layout, checkpointing and loggers."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False  # parse errors become one line (see parse_arguments)
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            words = [a for a in (args or []) if isinstance(a, str) and not a.startswith("-")]
            sub = getattr(parser, "_subcommands_action", None)
            sub_parser = sub._name_parser_map.get(words[0]) if sub and words else None
            raise UsageError(parse_error_message(exc, sub_parser or parser)) from None

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's arguments with those saved in ``--ckpt_path``: right
        for the network (it must match the weights), wrong for how it is evaluated. The
        evaluation options of the config and the command line are kept."""
        sub = self.config.get("subcommand")
        init = self.config[sub].get("model.init_args") if sub else None
        kept = {k: copy.deepcopy(init[k]) for k in EVALUATION_OPTIONS
                if init is not None and k in init}
        super()._parse_ckpt_path()
        if kept:
            init = self.config[sub].get("model.init_args")
            for key, value in kept.items():
                init[key] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--imports", type=list[str], default=[],
            help="Python modules to import before anything is built: modules that register "
                 "your own tasks (register_task) or datasets (register_dataset)")
        parser.add_argument(
            "--allow_untrained", type=bool, default=False,
            help="test / validate: evaluate the model as the config builds it, without "
                 "--ckpt_path (refused otherwise: untrained scores are not results)")
        # The tasks are declared once, in the model; the data module loads exactly those.
        parser.link_arguments("model.init_args.tasks", "data.init_args.tasks",
                              compute_fn=lambda tasks: list(tasks))
        parser.add_lightning_class_args(LastAndBestCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/score",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-step{step:07d}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def before_instantiate_classes(self) -> None:
        check_trainer_limits(self._get(self.config, "trainer", default={}) or {})
        if (self.subcommand in ("test", "validate")
                and self._get(self.config, "ckpt_path") is None
                and not self._get(self.config, "allow_untrained", default=False)):
            raise UsageError(
                f"{self.subcommand} evaluates trained weights: give --ckpt_path (a .ckpt file, "
                "or 'last' for the run folder's last.ckpt); --allow_untrained true evaluates "
                "the untrained model on purpose")
        names = self._get(self.config, "imports", default=None) or []
        if names and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a module next to the config, as with python -m
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise SystemExit(f"densemtl: imports: cannot import '{name}': {exc}") from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if not sys.stderr.isatty():  # a bar redrawn with \r is noise in a log: ProgressLog
            kwargs["enable_progress_bar"] = False
        if trainer_cfg.get("logger") in (None, True):
            root = trainer_cfg.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = [TensorBoardLogger(root, name="", version=""),
                                AppendingCSVLogger(root, name="", version="")]
        if not trainer_cfg.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def check_trainer_limits(trainer: Any) -> None:
    """Refuse step and epoch limits that make no sense (0, or negative other than -1)."""
    for key in ("max_steps", "max_epochs", "min_steps", "min_epochs"):
        value = trainer.get(key) if hasattr(trainer, "get") else None
        if value is None or value == -1:
            continue
        if value < 0 or (value == 0 and key.startswith("max")):
            raise UsageError(f"--trainer.{key} must be a positive number (or -1 for no limit), "
                             f"got {value}")


def parse_error_message(exc: Exception, parser: LightningArgumentParser) -> str:
    """A parse error in one or two lines, with the closest option for a misspelled one."""
    text = str(exc).strip()
    options = [o for action in getattr(parser, "_actions", []) for o in action.option_strings
               if o.startswith("--")]
    command = getattr(parser, "prog", "densemtl").split()[-1]
    unknown = re.search(r"[Uu]nrecognized arguments: (.*)", text)
    if unknown:
        given = [t for t in unknown.group(1).split() if t.startswith("--")]
        parts = [f"{g.split('=')[0]}{did_you_mean(g.split('=')[0], options)}" for g in given]
        return (f"unknown option {', '.join(parts) or unknown.group(1)}; "
                f"'densemtl {command} --help' lists the options")
    missing = re.search(r'Parser key "config":.*?does not exist: ([^\n]*)', text)
    if missing:
        return f"--config: no such file {missing.group(1).strip()}"
    ours = explain(exc)  # a densemtl error raised while jsonargparse checked a class
    if ours:
        key = re.match(r'Parser key "([^"]+)"', text)
        return f"{key.group(1)}: {ours}" if key and not ours.startswith(key.group(1)) else ours
    return text.splitlines()[0] if text else "invalid arguments"


def make_cli(args: list[str], run: bool = True, cli_class: type[DenseCLI] = DenseCLI) -> DenseCLI:
    """The densemtl LightningCLI (``run=False``: no subcommand in ``args``)."""
    # ``args`` is the command line itself (the ``densemtl`` dispatcher strips the subcommand's
    # name), so LightningCLI's warning about args given next to sys.argv does not apply
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # Our data modules shard with their own samplers (exact, unpadded evaluation).
        trainer_defaults={"gradient_clip_val": 10.0, "use_distributed_sampler": False},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "densemtl"},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(argv: list[str], command: str) -> int:
    make_cli([command, *argv])
    return 0
