"""ONNX export (TorchScript exporter) checked against PyTorch with onnxruntime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

from densemtl.export import export_onnx, main
from densemtl.models import build_model, save_model
from densemtl.tasks import depth_to_inverse
from densemtl.tasks.disp import depth_to_sigmoid

from model_utils import randomise_, tiny

ort = pytest.importorskip("onnxruntime")

SIZE = (32, 64)  # export size: a multiple of every encoder's largest stride (16 or 32)
OTHER = (64, 32)  # another size for the dynamic graphs (batch 2)

# ONNX Runtime and PyTorch run the same float32 graph with other kernels (summation order,
# im2col vs direct convolution, fused attention): measured differences of the raw head outputs
# are at most ~5e-6 for outputs of size ~1 (float32 eps 1.2e-7 accumulated over ~30 layers).
# RAW_ATOL leaves a 20x margin and is still far below any difference that matters. Decoding
# propagates it: class ids may flip only where the top-2 logits are within 2 RAW_ATOL; depth is
# compared in the network's own parametrisation 65536 / (100 D + 1) (metres amplify an absolute
# error by 1/inv^2 where a random head predicts inv ~ 0); unit normals v/|v| move by at most
# 2 |dv| / |v|; edge probabilities (sigmoid / softmax) by at most |dv|.
RAW_ATOL = 1e-4

TASKS_SDN = {"semseg": {"channels": 5}, "depth": None, "normals": None}
MODELS = {
    "densemtl": lambda: tiny(TASKS_SDN),
    "mtl": lambda: tiny({"depth": None, "edges": None}, arch="mtl"),
    "padnet_plus": lambda: tiny({"semseg": {"channels": 5}, "depth": None}, arch="padnet_plus"),
    "stl": lambda: tiny({"normals": None}, arch="stl"),
    "padnet": lambda: tiny({"semseg": {"channels": 5}, "depth": None}, arch="padnet"),
    "deeplab": lambda: tiny({"semseg": {"channels": 5}, "edges": None}, arch="deeplab"),
    "densemtl_sde": lambda: tiny({"semseg": {"channels": 5}, "disp": None},
                                 decoder={"num_ch_dec": [8, 16, 16, 32, 32],
                                          "scales": {"semseg": [0, 2], "disp": [0, 1, 2, 3]}}),
    "densemtl_sdne": lambda: tiny({"semseg": {"channels": 5}, "depth": None, "normals": None,
                                   "edges": None}),
    "timm_pvt_v2": lambda: build_model({
        "tasks": {"semseg": {"channels": 5}, "normals": None},
        "network": {"arch": "densemtl", "encoder": {"name": "timm:pvt_v2_b0", "pretrained": False},
                    "decoder": {"num_ch_dec": [8, 8, 16, 16]}}}),
}


def max_diff(task: str, got: np.ndarray, want: Tensor, raw: Tensor) -> float:
    """Asserts ``got`` (ONNX) matches ``want`` (PyTorch decoded) given the raw PyTorch output;
    returns the max abs difference (semseg: the fraction of differing class ids; depth: in
    the 65536 / (100 D + 1) parametrisation)."""
    got_t = torch.from_numpy(got)
    assert got_t.shape == want.shape and got_t.dtype == want.dtype, task
    if task == "semseg":
        differ = got_t != want
        top2 = raw.topk(2, dim=1).values
        ties = (top2[:, 0] - top2[:, 1]) <= 2 * RAW_ATOL
        assert not (differ & ~ties).any(), "class ids differ where the logits are not tied"
        return float(differ.float().mean())
    diff = (got_t - want).abs()
    if task == "depth":
        inv_diff = (depth_to_inverse(got_t) - depth_to_inverse(want)).abs()
        assert (inv_diff <= RAW_ATOL + 1e-5 * depth_to_inverse(want).abs()).all(), task
        return float(inv_diff.max())
    if task == "disp":  # compared as the head's sigmoid disparity (its derivative is <= 1/4)
        sig_diff = (depth_to_sigmoid(got_t) - depth_to_sigmoid(want)).abs()
        assert (sig_diff <= RAW_ATOL).all(), task
        return float(sig_diff.max())
    elif task == "normals":
        bound = 2 * RAW_ATOL / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)
        assert (diff <= bound + 1e-6).all(), task
    else:
        assert (diff <= RAW_ATOL).all(), task
    return float(diff.max())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: randomise_(build()).eval() for name, build in MODELS.items()}


# every model static and dynamic; the dynamic mtl export is the raw one of the CLI test below
CASES = [(arch, dynamic) for arch in MODELS for dynamic in (False, True)
         if (arch, dynamic) not in (("mtl", True), ("padnet", True), ("deeplab", True))]


@pytest.mark.parametrize(("arch", "dynamic"), CASES,
                         ids=[f"{a}-{'dynamic' if d else 'static'}" for a, d in CASES])
def test_onnx_matches_pytorch(models, arch, dynamic, tmp_path):
    model = models[arch]
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the export itself must not warn
        names = export_onnx(model, path, *SIZE, dynamic=dynamic)
    assert names == list(model.tasks)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == list(model.tasks)
    shapes = [(1, *SIZE)] + ([(2, *OTHER)] if dynamic else [])
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.rand(shape[0], 3, *shape[1:], generator=g)
        with torch.no_grad():
            raw = model(x)
        want = model.predict(x)
        got = sess.run(None, {"image": x.numpy()})
        report = {t: max_diff(t, y, want[t], raw[t][0]) for t, y in zip(names, got)}
        print(f"{arch} {'dynamic' if dynamic else 'static'} {tuple(x.shape)}: {report}")


def test_raw_dynamic_export_through_the_cli(models, tmp_path, capsys):
    model = models["mtl"]
    ckpt, out = tmp_path / "m.pt", tmp_path / "onnx" / "raw.onnx"
    save_model(model, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = main(["--ckpt", str(ckpt), "--out", str(out), "--raw", "--dynamic",
                   "--height", str(SIZE[0]), "--width", str(SIZE[1])])
    assert rc == 0
    printed = capsys.readouterr()
    assert printed.err == "" and len(printed.out.splitlines()) == 1 and "raw.onnx" in printed.out
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == [f"{t}_raw" for t in model.tasks]
    for x in (torch.rand(1, 3, *SIZE), torch.rand(2, 3, *OTHER)):
        with torch.no_grad():
            want = model(x)
        for t, y in zip(model.tasks, sess.run(None, {"image": x.numpy()})):
            diff = float(np.abs(y - want[t][0].numpy()).max())
            print(f"mtl raw dynamic {tuple(x.shape)} {t}: {diff:.2e}")
            assert diff <= RAW_ATOL, t

    assert main(["--ckpt", str(ckpt), "--out", str(out), "--height", "40"]) == 1
    assert "exists already; pass --overwrite" in capsys.readouterr().err  # nothing replaced
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--height", "40", "--overwrite"]) == 1
    assert "multiple of the encoder's largest stride (16)" in capsys.readouterr().err
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["raw.onnx"]
