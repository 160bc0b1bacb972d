"""Equivalence of the fast paths on a GPU (skipped without CUDA; run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from densemtl.losses import MultiTaskLoss
from densemtl.metrics import MultiTaskMetrics
from densemtl.models import build_model

from model_utils import TASKS_SDN, randomise_, scalar_loss

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")
PAPER = {"semseg": {"channels": 16}, "depth": None, "normals": None}


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def pair(fast: dict, reference: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    base = {"encoder": {"name": "resnet18", "pretrained": False}}
    a = build_model({"tasks": PAPER, "network": {"arch": "densemtl", **base, **fast}})
    b = build_model({"tasks": PAPER, "network": {"arch": "densemtl", **base, **reference}})
    randomise_(a)
    b.load_state_dict(a.state_dict())
    return a.to(DEV), b.to(DEV)


def run(model, x, seed=1):
    torch.manual_seed(seed)
    out = model(x)
    scalar_loss({t: {s: y.float().cpu() for s, y in d.items()} for t, d in out.items()}).backward()
    return out


def test_fast_paths_equal_reference_fp32_with_gradients():
    fast, ref = pair({}, {"decoder": {"fused_upsample": False},
                          "exchange": {"attention": "explicit", "batched": False}})
    x = torch.rand(2, 3, 128, 256, device=DEV)
    a, b = run(fast, x), run(ref, x)
    for t in b:
        for s in b[t]:
            torch.testing.assert_close(a[t][s], b[t][s], rtol=1e-4, atol=1e-4)
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_channels_last_and_bf16_agree_with_fp32():
    model, _ = pair({}, {})
    model.eval()
    x = torch.rand(1, 3, 128, 256, device=DEV)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf = model(x)
    for t in ref:
        torch.testing.assert_close(cl[t][0], ref[t][0], rtol=1e-4, atol=1e-4)
        err = (bf[t][0].float() - ref[t][0]).norm() / ref[t][0].norm()
        assert err < 0.05, (t, float(err))


def test_sdpa_memory_is_linear_in_tokens():
    def peak(attention: str) -> int:
        torch.manual_seed(0)
        m = build_model({"tasks": TASKS_SDN, "network": {
            "arch": "densemtl", "encoder": {"name": "resnet18", "pretrained": False},
            "decoder": {"num_ch_dec": [16, 32, 32, 64, 64]},
            "exchange": {"attention": attention}}}).to(DEV)
        x = torch.rand(2, 3, 512, 1024, device=DEV)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        scalar_loss({t: {s: y.float() for s, y in d.items()} for t, d in m(x).items()}).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    explicit, sdpa = peak("explicit"), peak("sdpa")
    # 6 pairs x 2 images x 8192^2 attention probabilities alone are 3 GiB in fp32
    assert explicit - sdpa > 2 * 2**30, (explicit / 2**30, sdpa / 2**30)


def test_loss_and_metric_updates_do_not_sync():
    tasks = {"semseg": 16, "depth": 1, "normals": 3, "edges": 2}
    out = {t: {0: torch.randn(2, c, 64, 64, device=DEV), 1: torch.randn(2, c, 32, 32, device=DEV)}
           for t, c in tasks.items()}
    batch = {"semseg": torch.randint(0, 16, (2, 64, 64), device=DEV),
             "depth": torch.rand(2, 1, 64, 64, device=DEV) * 10,
             "normals": torch.nn.functional.normalize(torch.randn(2, 3, 64, 64, device=DEV), dim=1),
             "edges": (torch.rand(2, 1, 64, 64, device=DEV) > 0.9).float()}
    loss = MultiTaskLoss(list(tasks), weights={"semseg": 100, "depth": 1}).to(DEV)
    metrics = MultiTaskMetrics(tasks).to(DEV)
    loss(out, batch)
    metrics.update(out, batch)  # warm-up (lazy initialisation may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(out, batch)
        metrics.update(out, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
