import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densemtl.metrics import (
    MultiTaskMetrics,
    delta_m,
    delta_m_main,
    higher_is_better,
    load_baselines,
)
from densemtl.tasks import IGNORE_INDEX, depth_to_inverse, get_task, registered_tasks
from densemtl.tasks.depth import DepthMetric
from densemtl.tasks.edges import EdgesMetric, disk_max
from densemtl.tasks.normals import NormalsMetric
from densemtl.tasks.semseg import SemsegMetric

ALL = ["semseg", "depth", "normals", "edges"]


def value(x):
    return float(x)


# --- semantic segmentation ----------------------------------------------------------------------

SEM_GT = torch.tensor([[[0, 0, 1], [1, 2, IGNORE_INDEX]]])
SEM_PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
# confusion (rows gt, cols pred): [[1,1,0],[0,2,0],[1,0,0]]
# IoU: 1/3, 2/3, 0 -> mIoU 1/3; pixel acc 3/5; class acc (1/2 + 1 + 0) / 3


def test_semseg_hand_counted_confusion_matrix():
    m = SemsegMetric(3, decoded=True)
    m.update(SEM_PRED, SEM_GT)
    assert m.confmat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    out = m.compute()
    assert value(out["mIoU"]) == pytest.approx(1 / 3)
    assert value(out["pixAcc"]) == pytest.approx(3 / 5)
    assert value(out["mAcc"]) == pytest.approx(0.5)
    assert [value(out[f"IoU/{i:02d}"]) for i in range(3)] == pytest.approx([1 / 3, 2 / 3, 0])


def test_semseg_absent_class_is_excluded_and_raw_logits_work():
    m = SemsegMetric(4, class_names=["a", "b", "c", "d"])
    logits = F.one_hot(SEM_PRED, 4).permute(0, 3, 1, 2).float() * 5
    m.update(logits, SEM_GT)
    out = m.compute()
    assert math.isnan(value(out["IoU/d"]))  # never in GT nor prediction
    assert value(out["mIoU"]) == pytest.approx(1 / 3)


def test_semseg_has_flag_skips_sample():
    m = SemsegMetric(3, decoded=True)
    pred = torch.cat([SEM_PRED, torch.zeros_like(SEM_PRED)])
    gt = torch.cat([SEM_GT, torch.ones_like(SEM_GT)])
    m.update(pred, gt, torch.tensor([True, False]))
    assert m.confmat.sum() == 5


# --- depth --------------------------------------------------------------------------------------

DEPTH_GT = torch.tensor([[1.0, 2.0, 4.0], [0.0, 100.0, 2.0]]).view(1, 1, 2, 3)
DEPTH_PRED = torch.tensor([[2.0, 2.0, 2.0], [5.0, 5.0, 3.0]]).view(1, 1, 2, 3)
# valid (gt, pred): (1,2) (2,2) (4,2) (2,3); gt 0 invalid, gt 100 out of range
DEPTH_EXPECTED = {
    "absRel": (1 + 0 + 0.5 + 0.5) / 4,
    "sqRel": (1 + 0 + 1 + 0.5) / 4,
    "rmse": math.sqrt((1 + 0 + 4 + 1) / 4),
    "rmseLog": math.sqrt((2 * math.log(2) ** 2 + math.log(1.5) ** 2) / 4),
    "delta1": 1 / 4,  # ratios 2, 1, 2, 1.5
    "delta2": 2 / 4,
    "delta3": 2 / 4,
}


@pytest.mark.parametrize("decoded", [True, False])
def test_depth_hand_values(decoded):
    m = DepthMetric(decoded=decoded)
    m.update(DEPTH_PRED if decoded else depth_to_inverse(DEPTH_PRED), DEPTH_GT)
    out = m.compute()
    for k, v in DEPTH_EXPECTED.items():
        assert value(out[k]) == pytest.approx(v, rel=1e-4), k


def test_depth_clamps_prediction_and_uses_range():
    m = DepthMetric(max_depth=80.0, decoded=True)
    pred, gt = torch.tensor([200.0, 0.0]), torch.tensor([10.0, 1.0])
    m.update(pred.view(1, 1, 1, 2), gt.view(1, 1, 1, 2))
    # 200 -> 80 (error 70), 0 -> 1e-3 (error 0.999)
    assert value(m.compute()["rmse"]) == pytest.approx(math.sqrt((70**2 + 0.999**2) / 2))
    narrow = DepthMetric(min_depth=1.5, max_depth=3.0, decoded=True)
    narrow.update(DEPTH_PRED, DEPTH_GT)  # only the two gt = 2 pixels remain
    assert value(narrow.compute()["absRel"]) == pytest.approx(0.25)


def test_depth_pixel_vs_image_reduction():
    gt = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]]).view(2, 1, 1, 3)
    pred = torch.tensor([[2.0, 1.0, 1.0], [2.0, 2.0, 2.0]]).view(2, 1, 1, 3)
    # image 0: one valid pixel, absRel 1; image 1: three pixels, absRel 0
    for reduction, expected in (("pixel", 0.25), ("image", 0.5)):
        m = DepthMetric(reduction=reduction, decoded=True)
        m.update(pred, gt)
        assert value(m.compute()["absRel"]) == pytest.approx(expected)
    m = DepthMetric(reduction="image", decoded=True)
    m.update(pred, gt, torch.tensor([False, True]))
    assert value(m.compute()["absRel"]) == 0.0


def test_depth_median_scaling():
    gt = torch.rand(2, 1, 4, 5) * 5 + 1
    m = DepthMetric(median_scaling=True, decoded=True)
    m.update(gt * torch.tensor([2.0, 0.5]).view(2, 1, 1, 1), gt)
    assert value(m.compute()["absRel"]) == pytest.approx(0.0, abs=1e-6)


# --- normals ------------------------------------------------------------------------------------

def _normal_maps():
    gt = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]],
                      dtype=torch.float32)
    s20, c20 = math.sin(math.radians(20)), math.cos(math.radians(20))
    pred = torch.tensor([[0, 0, 2], [s20, 0, c20], [3, 0, 3], [1, 0, 0], [0, 0, -1], [1, 0, 0]],
                        dtype=torch.float32)
    as_map = lambda v: v.T.reshape(1, 3, 2, 3)  # noqa: E731
    return as_map(pred), as_map(gt)  # angles 0, 20, 45, 90, 180 and one invalid pixel


@pytest.mark.parametrize("decoded", [True, False])
def test_normals_hand_values(decoded):
    pred, gt = _normal_maps()
    m = NormalsMetric(decoded=decoded)
    m.update(F.normalize(pred, dim=1) if decoded else pred, gt)
    out = m.compute()
    angles = [0.0, 20.0, 45.0, 90.0, 180.0]
    assert value(out["mean"]) == pytest.approx(sum(angles) / 5, abs=1e-3)
    assert value(out["rmse"]) == pytest.approx(math.sqrt(sum(a * a for a in angles) / 5), abs=1e-3)
    assert value(out["median"]) == pytest.approx(45.0, abs=m.bin_width)
    assert value(out["within11"]) == pytest.approx(1 / 5)
    assert value(out["within22"]) == pytest.approx(2 / 5)
    assert value(out["within30"]) == pytest.approx(2 / 5)


def test_normals_median_within_one_bin():
    torch.manual_seed(0)
    gt = F.normalize(torch.randn(1, 3, 7, 11), dim=1)  # 77 pixels (odd)
    pred = F.normalize(gt + 0.6 * torch.randn(1, 3, 7, 11), dim=1)
    m = NormalsMetric(bin_width=0.05, decoded=True)
    m.update(pred, gt)
    angle = torch.rad2deg(torch.acos((pred * gt).sum(1).clamp(-1, 1)))
    assert value(m.compute()["median"]) == pytest.approx(angle.median().item(), abs=0.05)
    assert value(m.compute()["mean"]) == pytest.approx(angle.mean().item(), abs=1e-3)


# --- edges --------------------------------------------------------------------------------------

def _edge_image_1():
    gt = torch.zeros(5, 5)
    gt[:, 2] = 1  # vertical line, 5 pixels
    prob = torch.zeros(5, 5)
    prob[0, 3], prob[2, 0], prob[4, 2] = 0.9, 0.8, 0.6  # 1 px away, 2 px away, on the line
    return prob, gt


def _edge_image_2():
    gt = torch.zeros(5, 5)
    gt[2, 2] = 1
    prob = torch.zeros(5, 5)
    prob[2, 2], prob[0, 0] = 0.9, 0.55
    return prob, gt


def _edges_metric(**kw):
    return EdgesMetric(thresholds=[0.5, 0.7, 0.85], tolerance=1.0, tolerance_unit="pixels",
                       decoded=True, **kw)


def test_edges_single_image_hand_values():
    prob, gt = _edge_image_1()
    m = _edges_metric()
    m.update(prob.view(1, 1, 5, 5), gt.view(1, 1, 5, 5))
    # t=0.5: 3 predictions, 2 matched; GT rows 0, 3, 4 recalled -> P 2/3, R 3/5, F 12/19
    # t=0.7: P 1/2, R 1/5; t=0.85: P 1, R 1/5
    assert m.ods.tolist() == [[2, 1, 1], [3, 2, 1], [3, 1, 1], [5, 5, 5]]
    out = m.compute()
    assert value(out["tolF"]) == pytest.approx(12 / 19)
    assert value(out["tolP"]) == pytest.approx(2 / 3)
    assert value(out["tolR"]) == pytest.approx(3 / 5)
    assert value(out["tolThr"]) == pytest.approx(0.5)
    assert value(out["tolImageF"]) == pytest.approx(12 / 19)
    # pixel F1 at 0.5: tp 1 (row 4), fp 2, fn 4
    assert value(out["pixF1"]) == pytest.approx(2 / 8)
    # background: tn 25 - 1 - 2 - 4 = 18, its fp = 4 (missed edges), fn = 2 -> F1 36 / 42
    assert value(out["meanF1"]) == pytest.approx((2 / 8 + 36 / 42) / 2)


def test_edges_ods_vs_ois_two_images():
    (p1, g1), (p2, g2) = _edge_image_1(), _edge_image_2()
    m = _edges_metric()
    m.update(torch.stack([p1, p2]).unsqueeze(1), torch.stack([g1, g2]).unsqueeze(1))
    out = m.compute()
    # ODS: summed counts per threshold: t=0.5 [3,5,4,6] -> F 12/19 (best); t=0.7 4/9; t=0.85 1/2
    assert value(out["tolF"]) == pytest.approx(12 / 19)
    # OIS: image 1 best at 0.5 [2,3,3,5]; image 2 best at 0.7 [1,1,1,1] -> P 3/4, R 2/3
    assert value(out["tolImageF"]) == pytest.approx(12 / 17)


def test_edges_raw_logits_and_has_flag():
    prob, gt = _edge_image_1()
    logit = torch.logit(prob.clamp(1e-4, 1 - 1e-4))
    reference = _edges_metric()
    reference.update(prob.view(1, 1, 5, 5), gt.view(1, 1, 5, 5))
    for raw in (logit.view(1, 1, 5, 5), torch.stack([torch.zeros(5, 5), logit]).unsqueeze(0)):
        m = EdgesMetric(thresholds=[0.5, 0.7, 0.85], tolerance=1.0, tolerance_unit="pixels")
        junk_pred = torch.cat([raw, torch.full_like(raw, 5.0)])
        junk_gt = torch.cat([gt.view(1, 1, 5, 5), torch.ones(1, 1, 5, 5)])
        m.update(junk_pred, junk_gt, torch.tensor([True, False]))
        torch.testing.assert_close(m.ods, reference.ods)
        torch.testing.assert_close(m.pix, reference.pix)


def test_disk_max_is_a_euclidean_disk():
    x = torch.zeros(1, 7, 7)
    x[0, 3, 3] = 1.0
    assert disk_max(x, 2.0).sum() == 13  # |d|^2 <= 4
    assert disk_max(x, 1.5).sum() == 9  # the 3x3 square
    assert disk_max(x, 0.5).sum() == 1
    assert EdgesMetric().radius(300, 400) == pytest.approx(0.0075 * 500)


# --- DDP-style merging, containers, no host syncs -----------------------------------------------

def _random_batch(b=4, h=12, w=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "semseg": torch.randint(0, classes, (b, h, w), generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) * 9,
        "normals": F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        "edges": (torch.rand(b, 1, h, w, generator=g) > 0.8).float(),
        "has_depth": torch.tensor([True, True, False, True]),
    }
    batch["semseg"][0, :3] = IGNORE_INDEX
    outputs = {
        "semseg": {0: torch.randn(b, classes, h // 2, w // 2, generator=g)},
        "depth": {0: depth_to_inverse(torch.rand(b, 1, h, w, generator=g) * 9 + 0.1)},
        "normals": {0: torch.randn(b, 3, h, w, generator=g)},
        "edges": {0: torch.randn(b, 2, h, w, generator=g)},
    }
    return outputs, batch


def _half(d, sl):
    return {k: ({s: t[sl] for s, t in v.items()} if isinstance(v, dict) else v[sl])
            for k, v in d.items()}


def test_merged_halves_equal_one_pass():
    outputs, batch = _random_batch()
    tasks = {"semseg": 5, "depth": 1, "normals": 3, "edges": 2}
    options = {"depth": {"reduction": "image"}}
    whole = MultiTaskMetrics(tasks, options)
    whole.update(outputs, batch)
    first, second = MultiTaskMetrics(tasks, options), MultiTaskMetrics(tasks, options)
    first.update(_half(outputs, slice(0, 2)), _half(batch, slice(0, 2)))
    second.update(_half(outputs, slice(2, 4)), _half(batch, slice(2, 4)))
    for task in tasks:
        first[task].merge_state(second[task])  # what the sum all-reduce does across ranks
    expected, merged = whole.compute(), first.compute()
    assert expected.keys() == merged.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], equal_nan=True)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric EdgesMetric")
def test_container_names_and_skipped_tasks():
    outputs, batch = _random_batch()
    del batch["edges"]
    m = MultiTaskMetrics({"semseg": 5, "depth": 1, "normals": 3, "edges": 2})
    m.update(outputs, batch)
    assert m["edges"].update_count == 0 and m["depth"].update_count == 1
    m.update({t: v[0] for t, v in outputs.items()}, batch)  # bare tensors are scale 0
    results = m.compute()
    names = set(results)
    assert math.isnan(value(results["edges/tolF"]))  # nothing scored: NaN, not 0
    for t in ALL:
        assert f"{t}/{get_task(t).main_metric}" in names
    assert {"semseg/IoU/00", "depth/rmseLog", "normals/within22", "edges/tolImageF"} <= names
    for name in names - {"edges/tolThr"}:
        higher_is_better(name)  # every reported metric has a direction
    m.reset()
    assert m["semseg"].confmat.sum() == 0
    with pytest.raises(ValueError, match="num_classes"):
        MultiTaskMetrics(["semseg"])
    with pytest.raises(ValueError, match="not in"):
        MultiTaskMetrics(["depth"], {"edges": {}})


def test_update_makes_no_host_sync():
    """Meta tensors have no data: .item(), bool(), nonzero/boolean indexing, bincount all raise."""
    with pytest.raises(RuntimeError):
        bool(torch.ones((), device="meta") > 0)
    outputs, batch = _random_batch()
    meta = MultiTaskMetrics({"semseg": 5, "depth": 1, "normals": 3, "edges": 2},
                            {"depth": {"median_scaling": True}}).to("meta")
    meta_out = {t: {s: p.to("meta") for s, p in v.items()} for t, v in outputs.items()}
    meta.update(meta_out, {k: v.to("meta") for k, v in batch.items()})
    assert meta["semseg"].confmat.device.type == "meta"


# --- delta_m ------------------------------------------------------------------------------------

def test_directions_come_from_the_task_declarations():
    expected = {"semseg/mIoU": True, "depth/rmse": False, "normals/mean": False,
                "edges/tolF": True, "depth/delta1": True, "semseg/IoU/road": True}
    assert {n: higher_is_better(n) for n in expected} == expected
    assert [f"{t}/{get_task(t).main_metric}" for t in ALL] == list(expected)[:4]
    assert list(registered_tasks())[:4] == ALL
    with pytest.raises(KeyError, match="unknown metric"):
        higher_is_better("flow/epe")
    with pytest.raises(KeyError, match="no metric 'accuracy'"):
        higher_is_better("depth/accuracy")


def test_delta_m_hand_value_and_errors():
    results = {"semseg/mIoU": 0.44, "depth/rmse": 0.9, "depth/delta1": 0.8}
    baselines = {"semseg/mIoU": 0.40, "depth/rmse": 1.0, "depth/delta1": 1.0}
    # +10 % mIoU, -10 % RMSE (better), -20 % delta1 (worse)
    assert delta_m(results, baselines) == pytest.approx(100 * (0.1 + 0.1 - 0.2) / 3)
    assert delta_m_main(results, baselines, ["semseg", "depth"]) == pytest.approx(10.0)
    with pytest.raises(KeyError, match="no single-task baseline"):
        delta_m_main(results, baselines, ["normals"])
    with pytest.raises(ValueError, match="zero"):
        delta_m(results, {"depth/rmse": 0.0})
    with pytest.raises(ValueError, match="percentage"):
        delta_m(results, {"semseg/mIoU": 76.0})
    with pytest.raises(KeyError, match="no result"):
        delta_m({}, {"depth/rmse": 1.0})
    with pytest.raises(KeyError, match="unknown metric"):
        delta_m({"depth/foo": 1.0}, {"depth/foo": 1.0})


def test_load_baselines_from_run_folders(tmp_path):
    (tmp_path / "stl_s").mkdir()
    (tmp_path / "stl_s" / "metrics.json").write_text(
        json.dumps({"semseg/mIoU": 0.5, "epoch": 3, "semseg/IoU/00": 0.7}))
    (tmp_path / "stl_d.json").write_text(json.dumps({"metrics": {"depth/rmse": 0.6}}))
    base = load_baselines([tmp_path / "stl_s", tmp_path / "stl_d.json"])
    assert base == {"semseg/mIoU": 0.5, "semseg/IoU/00": 0.7, "depth/rmse": 0.6}
    (tmp_path / "other.json").write_text(json.dumps({"depth/rmse": 0.7}))
    with pytest.raises(ValueError, match="differs"):
        load_baselines([tmp_path / "stl_d.json", tmp_path / "other.json"])
    with pytest.raises(FileNotFoundError):
        load_baselines([tmp_path / "missing"])


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.3, 3.0])
def test_disk_max_matches_brute_force(radius):
    x = torch.rand(2, 6, 9)
    reach = int(radius)
    padded = F.pad(x, (reach,) * 4, value=float("-inf"))
    expected = torch.full_like(x, float("-inf"))
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx <= radius * radius:
                window = padded[:, reach + dy : reach + dy + 6, reach + dx : reach + dx + 9]
                expected = torch.maximum(expected, window)
    torch.testing.assert_close(disk_max(x, radius), expected)


def test_edges_counts_match_distance_transform_reference():
    from scipy.ndimage import distance_transform_edt

    g = torch.Generator().manual_seed(3)
    prob = torch.rand(3, 1, 20, 30, generator=g) ** 3
    gt = (torch.rand(3, 1, 20, 30, generator=g) > 0.93).float()
    thresholds = [0.1, 0.3, 0.6, 0.9]
    m = EdgesMetric(thresholds=thresholds, tolerance=0.1, decoded=True)  # radius 3.6 px
    m.update(prob, gt)
    r = 0.1 * math.hypot(20, 30)
    expected = torch.zeros(4, len(thresholds), dtype=torch.long)
    for p, t in zip(prob[:, 0].numpy(), gt[:, 0].numpy().astype(bool)):
        to_gt = distance_transform_edt(~t)  # distance of every pixel to the nearest GT edge
        for i, thr in enumerate(thresholds):
            on = p >= thr
            to_pred = distance_transform_edt(~on) if on.any() else np.full(p.shape, np.inf)
            expected[:, i] += torch.tensor([int((on & (to_gt <= r)).sum()), int(on.sum()),
                                            int((t & (to_pred <= r)).sum()), int(t.sum())])
    torch.testing.assert_close(m.ods, expected)
