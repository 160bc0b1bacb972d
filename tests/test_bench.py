"""The benchmark command runs a real training step and reports what it promises."""

from __future__ import annotations

import json

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
