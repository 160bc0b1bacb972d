import math

import pytest
import torch
import torch.nn.functional as F

from densemtl.functional import resize_to
from densemtl.losses import MultiTaskLoss
from densemtl.tasks import IGNORE_INDEX, depth_to_inverse
from densemtl.tasks.depth import BerHuLoss
from densemtl.tasks.edges import EdgesLoss
from densemtl.tasks.normals import NormalsLoss
from densemtl.tasks.semseg import SemsegLoss
from densemtl.weighting import build_weighting

TASK_NAMES = ["semseg", "depth", "normals", "edges"]


def make_batch(b=2, h=6, w=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "semseg": torch.randint(0, classes, (b, h, w), generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) * 5 + 0.5,
        "normals": F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        "edges": (torch.rand(b, 1, h, w, generator=g) > 0.7).float(),
    }
    outputs = {
        "semseg": {0: torch.randn(b, classes, h, w, generator=g),
                   1: torch.randn(b, classes, h // 2, w // 2, generator=g)},
        "depth": {0: torch.randn(b, 1, h, w, generator=g) * 50 + 300,
                  1: torch.randn(b, 1, h // 2, w // 2, generator=g) * 50 + 300},
        "normals": {0: torch.randn(b, 3, h, w, generator=g),
                    1: torch.randn(b, 3, h // 2, w // 2, generator=g)},
        "edges": {0: torch.randn(b, 2, h, w, generator=g),
                  1: torch.randn(b, 2, h // 2, w // 2, generator=g)},
    }
    for scales in outputs.values():
        for t in scales.values():
            t.requires_grad_(True)
    return outputs, batch


# --- individual losses, hand-computed -----------------------------------------------------------

def test_berhu_hand_value_and_gradient():
    depth = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]).view(1, 1, 2, 3)
    err = torch.tensor([[1.0, 2.0, 999.0], [4.0, 10.0, 0.0]]).view(1, 1, 2, 3)
    pred = (depth_to_inverse(depth) + err).requires_grad_(True)
    # valid errors 1, 2, 4, 10, 0 -> c = 0.2 * 10 = 2
    # berhu: 1, 2, (16 + 4) / 4 = 5, (100 + 4) / 4 = 26, 0 -> sum 34 over 5 valid pixels
    loss = BerHuLoss()(pred, depth)
    assert loss.item() == pytest.approx(34 / 5, rel=1e-4)
    loss.backward()
    # d/derr: 1 below c, err / c above; c is detached; masked pixel 0
    expected = torch.tensor([[1.0, 1.0, 0.0], [2.0, 5.0, 0.0]]) / 5
    torch.testing.assert_close(pred.grad.view(2, 3), expected, atol=1e-4, rtol=1e-4)

    official = BerHuLoss(reduction="all")(pred.detach(), depth)
    assert official.item() == pytest.approx(34 / 6, rel=1e-4)


def test_berhu_perfect_prediction_is_zero_with_finite_gradient():
    depth = torch.full((2, 1, 3, 3), 2.0)
    pred = depth_to_inverse(depth).requires_grad_(True)
    loss = BerHuLoss()(pred, depth)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all()


def test_semseg_cross_entropy_hand_value_with_ignore():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [0.0, ln3], [50.0, -50.0]]).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, IGNORE_INDEX]]])
    # class 0 with p = 1/4 -> ln 4; class 1 with p = 3/4 -> ln 4/3; third pixel ignored
    loss = SemsegLoss()(logits, target)
    assert loss.item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, rel=1e-6)


def test_normals_one_minus_cosine_hand_value():
    gt = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    pred = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, -2.0, 0.0]])
    to_map = lambda v: v.T.reshape(1, 3, 1, 4)  # noqa: E731
    # same direction (unnormalised) 0, 90 degrees 1, invalid GT skipped, opposite 2
    loss = NormalsLoss()(to_map(pred), to_map(gt))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("pos_weight", [0.95, 0.7])
def test_edges_weighted_cross_entropy_hand_value(pos_weight):
    ln3 = math.log(3.0)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    logits2 = torch.tensor([[0.0, 0.0], [ln3, ln3]]).view(1, 2, 1, 2)  # p(edge) = 3/4
    logits1 = torch.full((1, 1, 1, 2), ln3)
    # edge pixel: -ln(3/4) weighted pw; background pixel: -ln(1/4) weighted 1 - pw; sum(w) = 1
    expected = pos_weight * math.log(4 / 3) + (1 - pos_weight) * math.log(4)
    for logits in (logits2, logits1):
        loss = EdgesLoss(pos_weight)(logits, target)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_resize_uses_align_corners():
    x = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    out = resize_to(x, (1, 3))
    torch.testing.assert_close(out.view(3), torch.tensor([0.0, 1.0, 2.0]))
    assert resize_to(x, (1, 2)) is x


# --- masking: has flags, ignored pixels, graph when nothing is supervised -----------------------

@pytest.mark.parametrize("task,loss", [
    ("semseg", SemsegLoss()), ("depth", BerHuLoss()), ("normals", NormalsLoss()),
    ("edges", EdgesLoss()),
])
def test_samples_without_label_contribute_nothing(task, loss):
    outputs, batch = make_batch()
    pred, target = outputs[task][0], batch[task]
    alone = loss(pred[:1], target[:1])
    garbage = target.clone()
    garbage[1] = garbage[1] * 3 + 1 if task != "semseg" else 1
    has = torch.tensor([True, False])
    masked = loss(pred, garbage, has)
    assert masked.item() == pytest.approx(alone.item(), rel=1e-5)
    masked.backward()
    assert pred.grad[1].abs().sum() == 0
    assert pred.grad[0].abs().sum() > 0


@pytest.mark.parametrize("task,loss", [
    ("semseg", SemsegLoss()), ("depth", BerHuLoss()), ("normals", NormalsLoss()),
    ("edges", EdgesLoss()),
])
def test_nobody_supervised_gives_zero_with_graph(task, loss):
    outputs, batch = make_batch()
    pred = outputs[task][1]  # half resolution: resized inside
    out = loss(pred, batch[task], torch.tensor([False, False]))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


def test_invalid_pixels_are_ignored():
    outputs, batch = make_batch()
    pred = outputs["depth"][0]
    depth = batch["depth"].clone()
    depth[:, :, :2] = 0.0  # invalid rows
    full = BerHuLoss()(pred, depth)
    full.backward()
    assert pred.grad[:, :, :2].abs().sum() == 0
    # the normals equivalent: a zero GT vector is not supervised
    normals = batch["normals"].clone()
    normals[:, :, :2] = 0.0
    pn = outputs["normals"][0]
    NormalsLoss()(pn, normals).backward()
    assert pn.grad[:, :, :2].abs().sum() == 0 and pn.grad[:, :, 2:].abs().sum() > 0


# --- MultiTaskLoss ------------------------------------------------------------------------------

def test_multitask_terms_total_and_scale_mean():
    outputs, batch = make_batch()
    weights = {"semseg": 100.0, "depth": 1.0, "normals": 100.0, "edges": 50.0}
    crit = MultiTaskLoss(TASK_NAMES, weights, scales=[0, 1], scale_weights=[1.0, 0.5])
    terms = crit(outputs, batch)
    expected_keys = {f"{t}/s{s}" for t in TASK_NAMES for s in (0, 1)} | set(TASK_NAMES) | {"total"}
    assert set(terms) == expected_keys
    for t in TASK_NAMES:
        torch.testing.assert_close(terms[t], (terms[f"{t}/s0"] + 0.5 * terms[f"{t}/s1"]) / 2)
    total = sum(weights[t] * terms[t] for t in TASK_NAMES)
    torch.testing.assert_close(terms["total"], total)
    terms["total"].backward()
    for t in TASK_NAMES:
        for s in (0, 1):
            grad = outputs[t][s].grad
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, (t, s)
    # the total's gradient is the weighted sum of the per-scale terms' gradients
    pred = outputs["depth"][1]
    (single,) = torch.autograd.grad(crit(outputs, batch)["depth/s1"], pred)
    torch.testing.assert_close(pred.grad, weights["depth"] * 0.5 / 2 * single)


def test_multitask_missing_scale_and_missing_label():
    outputs, batch = make_batch()
    outputs["normals"] = {0: outputs["normals"][0]}  # baseline with scale 0 only
    del batch["edges"]
    crit = MultiTaskLoss(TASK_NAMES)
    terms = crit(outputs, batch)
    assert "normals/s1" not in terms
    torch.testing.assert_close(terms["normals"], terms["normals/s0"])
    assert terms["edges"].item() == 0.0 and "edges/s0" not in terms
    terms["total"].backward()
    assert outputs["edges"][0].grad.abs().sum() == 0


def test_multitask_has_flags_from_batch():
    outputs, batch = make_batch()
    batch["has_depth"] = torch.tensor([True, False])
    terms = MultiTaskLoss(["depth"], scales=[0])(outputs, batch)
    alone = BerHuLoss()(outputs["depth"][0][:1], batch["depth"][:1])
    assert terms["depth"].item() == pytest.approx(alone.item(), rel=1e-5)


def test_multitask_config_errors():
    with pytest.raises(ValueError, match="not in"):
        MultiTaskLoss(["semseg"], weights={"depth": 1.0})
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskLoss(["semseg", "albedo"])
    with pytest.raises(ValueError, match="scale_weights"):
        MultiTaskLoss(["semseg"], scales=[0, 1], scale_weights=[1.0])
    outputs, batch = make_batch()
    with pytest.raises(KeyError, match="none of the supervised scales"):
        MultiTaskLoss(["semseg"], scales=[2])(outputs, batch)


def test_task_options_reach_the_task_losses():
    crit = MultiTaskLoss(TASK_NAMES, task_options={"depth": {"reduction": "all"},
                                                   "edges": {"pos_weight": 0.8}})
    assert crit.losses["depth"].reduction == "all"
    assert crit.losses["edges"].pos_weight == 0.8


def test_bf16_autocast_computes_in_fp32():
    outputs, batch = make_batch()
    bf16 = {t: {s: p.detach().bfloat16().requires_grad_(True) for s, p in sc.items()}
            for t, sc in outputs.items()}
    ref_inputs = {t: {s: p.detach().float() for s, p in sc.items()} for t, sc in bf16.items()}
    crit = MultiTaskLoss(TASK_NAMES, {"semseg": 100.0})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = crit(bf16, batch)
    assert all(v.dtype == torch.float32 for v in terms.values())
    reference = crit(ref_inputs, batch)
    for k in reference:
        torch.testing.assert_close(terms[k], reference[k], rtol=1e-5, atol=1e-5)
    terms["total"].backward()


def test_no_host_sync_in_forward():
    """Meta tensors have no data: .item(), bool(), boolean indexing or bincount would raise."""
    with pytest.raises(RuntimeError):
        torch.zeros((), device="meta").item()
    outputs, batch = make_batch()
    meta_out = {t: {s: p.detach().to("meta") for s, p in sc.items()} for t, sc in outputs.items()}
    meta_batch = {k: v.to("meta") for k, v in batch.items()}
    meta_batch["has_depth"] = torch.ones(2, dtype=torch.bool, device="meta")
    crit = MultiTaskLoss(TASK_NAMES).to("meta")
    terms = crit(meta_out, meta_batch)
    assert terms["total"].device.type == "meta" and terms["total"].shape == ()
    for name in ("fixed", "uncertainty", "dwa", "famo"):  # the loss weightings too
        total = build_weighting(name, TASK_NAMES).to("meta").combine(crit.weighted(terms))
        assert total.device.type == "meta" and total.shape == (), name
