"""The BSDS boundary benchmark (densemtl.boundaries): hand-computed cases, agreement with an
independent implementation (pyEdgeEval, a Cython port of the BSDS matcher), the metric's test
mode and the ``eval-edges`` command."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from densemtl import boundaries as B
from densemtl.metrics import MultiTaskMetrics
from densemtl.tasks.edges import EdgesMetric

from edge_fixtures import KINDS, fixture

# --- hand-computed cases ---------------------------------------------------------------------


def test_matching_is_one_to_one():
    gt = np.zeros((5, 5), bool)
    gt[2, 2] = True
    pred = np.zeros((5, 5), bool)
    pred[2, 1] = pred[2, 3] = True  # two predictions next to one ground-truth pixel
    assert B.match_count(pred, gt, 1.0) == 1  # a tolerance max filter would count both
    gt[0, 0] = True  # a second ground-truth pixel, within reach of neither prediction
    assert B.match_count(pred, gt, 1.0) == 1
    gt[1, 3] = True  # reachable by (2, 3) only: now both predictions find a partner
    assert B.match_count(pred, gt, 1.0) == 2
    assert B.match_count(pred, gt, 0.9) == 0  # the radius is Euclidean and inclusive


def test_maximum_matching_needs_augmenting_paths():
    """A greedy nearest-first matching finds 1 here; the maximum is 2."""
    gt = np.zeros((1, 6), bool)
    pred = np.zeros((1, 6), bool)
    pred[0, 1], pred[0, 2] = True, True
    gt[0, 2], gt[0, 3] = True, True  # pred 1 reaches gt 2 only; pred 2 reaches gt 2 and 3
    assert B.match_count(pred, gt, 1.0) == 2


def test_thinning_gives_one_pixel_wide_curves():
    bar = np.zeros((7, 14), bool)
    bar[2:5, 2:12] = True  # a 3-pixel-wide bar
    thin = B.thin(bar)
    assert thin[3, 3:11].all() and thin.sum() <= 10  # its centre line (ends may shorten)
    assert not thin[2].any() and not thin[4].any()
    line = np.zeros((7, 14), bool)
    line[3, 2:12] = True
    np.testing.assert_array_equal(B.thin(line), line)  # already thin: unchanged


def test_best_f_is_interpolated_between_thresholds():
    thresholds = np.array([0.25, 0.5])
    recall, precision = np.array([1.0, 0.2]), np.array([0.2, 1.0])
    t, r, p, f = B.best_interpolated(thresholds, recall, precision)
    # F at both ends is 1/3; half way R = P = 0.6 (d = 0.5 is not on the 100-step grid of
    # linspace(0, 1, 100): the nearest steps 49/99 and 50/99 give F just under 0.6)
    assert f == pytest.approx(0.6, abs=1e-4) and f > 1 / 3
    assert r == pytest.approx(p, abs=0.02) and 0.37 < t < 0.38


def test_average_precision_hand_value():
    recall = np.array([1.0, 0.5, 0.0])
    precision = np.array([0.5, 1.0, 1.0])
    # P = 1 on recall 0 .. 0.5 (51 grid points), then 1 - (r - 0.5) on 0.51 .. 1 (50 points)
    expected = (51 + sum(1 - 0.01 * k for k in range(1, 51))) * 0.01
    assert B.average_precision(recall, precision) == pytest.approx(expected)


def test_ods_and_ois_from_hand_counts():
    thresholds = np.array([0.3, 0.6])
    # columns: matched predicted, predicted, matched ground truth, ground truth
    image1 = np.array([[6, 10, 6, 8], [3, 3, 3, 8]])  # F 0.667 at 0.3, 0.545 at 0.6
    image2 = np.array([[1, 10, 1, 2], [1, 1, 1, 2]])  # F 0.167 at 0.3, 0.667 at 0.6
    out = B.summarise([image1, image2], thresholds)
    ois_p, ois_r = (6 + 1) / (10 + 1), (6 + 1) / (8 + 2)
    assert out["oisF"] == pytest.approx(2 * ois_p * ois_r / (ois_p + ois_r))
    summed = image1 + image2  # ODS: the dataset curve, interpolated
    d = np.linspace(0, 1, 100)
    r = summed[0, 2] / 10 * (1 - d) + summed[1, 2] / 10 * d
    p = summed[0, 0] / 20 * (1 - d) + summed[1, 0] / 4 * d
    assert out["odsF"] == pytest.approx(max((2 * p * r / (p + r)).max(), 0.0))


# --- agreement with an independent implementation --------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_dist", [0.0075, 0.011, 0.03])
def test_ods_ois_agree_with_pyedgeeval(kind, max_dist):
    """ODS and OIS within 0.005 of pyEdgeEval (its own thinning and BSDS's min-cost matcher,
    its own summary) on thin, thick and blurred maps at three tolerances."""
    pytest.importorskip("cv2")
    reference = pytest.importorskip("pyEdgeEval.common.binary_label")
    pairs = fixture(kind)
    ours = B.summarise([B.image_counts(p, g, max_dist) for p, g in pairs])
    thresholds = B.bsds_thresholds(99)

    def one(sample):
        p, g = pairs[sample["index"]]
        return reference.evaluate_boundaries_threshold(thresholds, p, g, max_dist=max_dist)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, _, ref = reference.calculate_metrics(
            one, 99, [{"name": str(i), "index": i} for i in range(len(pairs))], nproc=1)
    assert abs(ours["odsF"] - ref["ODS_f1"]) <= 0.005
    assert abs(ours["oisF"] - ref["OIS_f1"]) <= 0.005
    assert 0.1 < ours["odsF"] < 1  # the fixtures are neither trivial nor perfect


# --- the metric's benchmark mode -------------------------------------------------------------

def test_metric_bsds_mode_equals_the_module_functions():
    pairs = fixture("blur", images=3)
    prob = torch.tensor(np.stack([p for p, _ in pairs]), dtype=torch.float32)[:, None]
    gt = torch.tensor(np.stack([g for _, g in pairs]), dtype=torch.float32)[:, None]
    m = EdgesMetric(bsds=True, max_dist=0.011, decoded=True)
    m.update(prob[:2], gt[:2])
    m.update(torch.cat([prob[2:], prob[:1]]), torch.cat([gt[2:], gt[:1]]),
             torch.tensor([True, False]))  # the second sample has no label
    out = m.compute()
    expected = B.summarise([B.image_counts(p.double().numpy()[0], g.numpy()[0] > 0.5, 0.011)
                            for p, g in zip(prob, gt)])
    for name, value in expected.items():
        assert float(out[name]) == pytest.approx(value, abs=1e-12), name
    assert {"tolF", "tolImageF", "pixF1"} <= set(out)  # the fast proxy is still there


def test_benchmark_runs_in_test_only_and_takes_the_dataset_distance():
    from densemtl.data.nyud import NYUDv2Dataset
    from densemtl.data.synthia import SynthiaDataset

    val = MultiTaskMetrics({"edges": 2}, stage="val")
    test = MultiTaskMetrics({"edges": 2}, stage="test")
    assert not val["edges"].bsds and test["edges"].bsds
    assert "odsF" not in val.compute() and "edges/odsF" in test.compute()
    assert math.isnan(float(test.compute()["edges/odsF"]))  # nothing scored yet
    test.configure(NYUDv2Dataset)
    assert test["edges"].max_dist == 0.011 and test["edges"].tolerance == 0.011
    test.configure(SynthiaDataset)
    assert test["edges"].max_dist == 0.0075
    given = MultiTaskMetrics({"edges": 2}, {"edges": {"max_dist": 0.02, "bsds": False}},
                             stage="test")
    given.configure(NYUDv2Dataset)
    assert given["edges"].max_dist == 0.02 and not given["edges"].bsds  # the config wins


# --- densemtl eval-edges ---------------------------------------------------------------------

def _write_folders(tmp_path, pairs):
    from densemtl.io import save_npy, save_png

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for i, (p, g) in enumerate(pairs):
        save_png(gt / f"{i:04d}.png", (g * 255).astype(np.uint8))
        if i % 2:  # the names densemtl predict writes, as an exact array ...
            save_npy(pred / f"{i:04d}.jpg.edges.npy", p.astype(np.float32))
        else:  # ... or an 8-bit PNG
            save_png(pred / f"{i:04d}.png", np.round(p * 255).astype(np.uint8))
    return pred, gt


def test_eval_edges_command_scores_folders(tmp_path, capsys):
    from densemtl.cli import main as cli

    pairs = fixture("blur", images=3)
    pred, gt = _write_folders(tmp_path, pairs)
    out = tmp_path / "edges.json"
    assert cli(["eval-edges", "--pred", str(pred), "--gt", str(gt), "--max-dist", "0.011",
                "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3 image(s), max_dist 0.011" in printed and "ODS F" in printed
    import json

    result = json.loads(out.read_text())
    stored = [np.round(p * 255) / 255 if i % 2 == 0 else p.astype(np.float32)
              for i, (p, _) in enumerate(pairs)]
    expected = B.summarise([B.image_counts(np.asarray(s, np.float64), g, 0.011)
                            for s, (_, g) in zip(stored, pairs)])
    assert result["odsF"] == pytest.approx(expected["odsF"], abs=1e-9)
    assert result["oisF"] == pytest.approx(expected["oisF"], abs=1e-9)
    assert result["images"] == 3
    assert cli(["eval-edges", "--pred", str(pred), "--gt", str(gt), "--max-dist", "0.011",
                "--workers", "2", "--quiet"]) == 0  # the same numbers from two processes
    assert f"ODS F {result['odsF']:.4f}" in capsys.readouterr().out
    # the results file is not overwritten unless asked
    assert cli(["eval-edges", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_eval_edges_errors_name_the_file(tmp_path, capsys):
    from densemtl.cli import main as cli
    from densemtl.io import save_png

    pred, gt = _write_folders(tmp_path, fixture("thin", images=2))
    save_png(gt / "extra.png", np.zeros((60, 80), np.uint8))
    assert cli(["eval-edges", "--pred", str(pred), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert "extra" in err and "--allow-missing" in err and "Traceback" not in err
    assert cli(["eval-edges", "--pred", str(pred), "--gt", str(gt), "--allow-missing",
                "--quiet"]) == 0
    assert "1 ground-truth map(s) without a prediction were skipped" in capsys.readouterr().out
    save_png(pred / "extra.png", np.zeros((30, 80), np.uint8))
    assert cli(["eval-edges", "--pred", str(pred), "--gt", str(gt), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "extra.png is 80x30" in err and "resize" in err
    assert cli(["eval-edges", "--pred", str(tmp_path / "nope"), "--gt", str(gt)]) == 2
    assert "--pred: not a folder" in capsys.readouterr().err
