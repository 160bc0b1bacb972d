"""Mistakes a user makes on the command line end in a short message that names the option or
file (no traceback); evaluating without a checkpoint is refused; step limits are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from densemtl.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/synthetic/densemtl_sd.yaml")


def error_of(capsys, *argv: str) -> list[str]:
    """Run ``densemtl argv`` expecting a usage error; the lines of its message on stderr."""
    assert cli(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # (in-process, a library's logging handler bound to an earlier test's captured stream
    # can report a "Logging error" here; a real terminal has no such block)
    start = next(i for i, line in enumerate(err) if line.startswith(f"densemtl {argv[0]}: "))
    message = err[start:]
    assert not any("Traceback" in line for line in message), "\n".join(err)
    return message


@pytest.mark.parametrize(("argv", "expected"), [
    (["fit", "--config", CONFIG, "--trainer.max_stepz", "20"],
     ["unknown option --trainer.max_stepz", "did you mean '--trainer.max_steps'"]),
    (["fit", "--config", CONFIG, "--model.init_args.tasks", "{semsg: {channels: 10}}"],
     ["unknown task 'semsg'", "did you mean 'semseg'"]),
    (["fit", "--config", CONFIG, "--model.init_args.network.arch", "densmtl"],
     ["network.arch 'densmtl'", "did you mean 'densemtl'"]),
    (["fit", "--config", CONFIG, "--data.init_args.dataset", "synthtic",
      "--data.init_args.synthesize", "null"],
     ["unknown dataset 'synthtic'", "did you mean 'synthetic'"]),
    (["fit", "--config", str(ROOT / "configs/synthetic/nope.yaml")],
     ["--config: no such file", "nope.yaml"]),
    (["fit", "--config", CONFIG, "--trainer.max_steps", "0"],
     ["--trainer.max_steps must be a positive number", "got 0"]),
    (["fit", "--config", CONFIG, "--trainer.max_steps", "-5"], ["got -5"]),
    (["test", "--config", CONFIG], ["test evaluates trained weights: give --ckpt_path"]),
    (["validate", "--config", CONFIG], ["--allow_untrained"]),
])
def test_config_mistakes_are_named_in_a_few_lines(capsys, tmp_path, monkeypatch, argv,
                                                  expected):
    monkeypatch.chdir(tmp_path)  # nothing may be written: no run folder, no data
    err = error_of(capsys, *argv)
    text = "\n".join(err)
    assert len(err) <= 3, text
    for part in expected:
        assert part in text, text
    assert not (tmp_path / "runs").exists()


def test_a_missing_data_root_names_the_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = error_of(capsys, "fit", "--config", CONFIG, "--data.init_args.root",
                   str(tmp_path / "nothing"), "--data.init_args.synthesize", "null")
    assert "nothing/meta.json" in err[0] and "densemtl synth --out" in err[0]


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="max_steps"):
        cli(["fit", "--config", CONFIG, "--trainer.max_steps", "0", "--debug"])


def test_unknown_command_suggests_the_closest(capsys):
    assert cli(["fitt"]) == 2
    assert "unknown command 'fitt' (did you mean 'fit'?)" in capsys.readouterr().err


def test_a_bug_is_not_hidden(monkeypatch):
    """Errors densemtl did not raise on purpose keep their traceback."""
    import densemtl.data.synthetic as synthetic

    def broken(argv, command):
        return [][1]  # IndexError: a bug

    monkeypatch.setattr(synthetic, "main", broken)
    with pytest.raises(IndexError):
        cli(["synth", "--out", "x"])
