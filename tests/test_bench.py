"""The benchmark command runs a real training step and reports what it promises."""

from __future__ import annotations

import json

import pytest

from densemtl.cli import main as cli


def test_bench_prints_table_and_json(capsys):
    code = cli(["bench", "--tasks", "semseg,depth,normals", "--backbone", "resnet18",
                "--decoder", "slim", "--height", "64", "--width", "96", "--batch", "2",
                "--device", "cpu", "--warmup", "1", "--iters", "2", "--mode", "both", "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert "train s/iter (median)" in "\n".join(lines[:-1])
    for key in ("s_per_iter_median", "img_per_s", "peak_mem_MiB", "infer_img_per_s"):
        assert result[key] > 0, key
    assert set(result["phases_s"]) == {"forward", "loss", "backward", "optimizer"}
    assert result["img_per_s"] == 2 / result["s_per_iter_median"]
    assert result["batched_pairs"] is True and result["attention"] == "sdpa"


def test_bench_reference_paths(capsys):
    assert cli(["bench", "--tasks", "semseg,depth", "--backbone", "resnet18", "--decoder",
                "slim", "--height", "32", "--width", "32", "--batch", "1", "--device", "cpu",
                "--warmup", "0", "--iters", "1", "--reference", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["attention"] == "explicit"
    assert result["fused_upsample"] is False and result["batched_pairs"] is False


def test_bench_compares_weighting_methods_each_in_its_own_process(capsys):
    common = ["--tasks", "semseg,depth", "--backbone", "resnet18", "--decoder", "slim",
              "--height", "32", "--width", "32", "--batch", "2", "--device", "cpu",
              "--warmup", "0", "--iters", "1", "--threads", "1"]
    assert cli(["bench", *common, "--weighting", "upgrad,famo", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    results = json.loads(out[-1])
    assert [r["weighting"] for r in results] == ["fixed", "upgrad", "famo"]  # fixed added
    assert [r["weighting_kind"] for r in results] == ["loss", "gradient", "loss"]
    table = "\n".join(out[:-1])
    assert "| upgrad | gradient |" in table and "| fixed | loss |" in table
    rows = {line.split("|")[1].strip(): line.split("|") for line in out[:-1] if "|" in line}
    ratio = float(rows["upgrad"][4])
    assert ratio == pytest.approx(results[1]["s_per_iter_median"]
                                  / results[0]["s_per_iter_median"], abs=0.01)
    with pytest.raises(SystemExit) as exc:
        cli(["bench", *common, "--weighting", "upgard"])
    assert exc.value.code == 2
    assert "unknown method 'upgard'" in capsys.readouterr().err
