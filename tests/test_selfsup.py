"""Self-supervised depth (the semi-supervised "SDE" setting): camera sequences of the built-in
benchmark, pose conventions, the photometric loss and its parts, and SDE training."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image
from scipy.spatial.transform import Rotation

from densemtl.cli import main as cli
from densemtl.data import DenseDataModule, register_dataset
from densemtl.data.appearance import render
from densemtl.data.geometry import axis_angle_to_matrix, rigid_transform
from densemtl.data.registry import DATASETS
from densemtl.data.scene import Motion, Scene, intrinsics, moved, relative_pose, sample_scene
from densemtl.data.synthetic import (
    SyntheticDataset,
    _streams,
    generate,
    render_sequence,
)
from densemtl.data.transforms import hflip
from densemtl.models.posenet import PoseNet
from densemtl.tasks import get_task
from densemtl.tasks.disp import depth_to_sigmoid
from densemtl.training.selfsup import (
    SSIM_C1,
    PhotometricLoss,
    SelfSupervisedDepthModule,
    photometric_error,
    smoothness,
    ssim_distance,
    warp,
)

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64


def digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    """A digest of a benchmark's decoded content (pixels, arrays, text), independent of how
    the PNG encoder compresses."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file() or p.relative_to(root).parts[0] in skip:
            continue
        h.update(p.relative_to(root).as_posix().encode())
        if p.suffix == ".png":
            a = np.asarray(Image.open(p))
            h.update(str(a.shape).encode() + a.tobytes())
        elif p.suffix == ".npy":
            a = np.load(p)
            h.update(str((a.shape, a.dtype.str)).encode() + a.tobytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def seq(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seq") / "synthetic"
    generate(root, 6, 3, H, W, seed=0, workers=1, progress=False, sequence=True)
    return root


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


# --- the built-in sequences ---------------------------------------------------------------------

def test_sequences_are_written_deterministically_and_leave_the_rest_unchanged(tmp_path, seq):
    # the benchmark without sequences, as it was before sequences existed (digest recorded then)
    plain = tmp_path / "plain"
    generate(plain, 3, 2, 24, 32, seed=5, workers=1, progress=False)
    assert digest(plain) == "88283a265b4a2a071ad89aad8a9c4c9106654e8b7f95f99b3260b52cef1c7b84"
    # with sequences: same seed twice -> the same files; labelled frames as without sequences
    again = tmp_path / "again"
    generate(again, 6, 3, H, W, seed=0, workers=2, progress=False, sequence=True)
    assert digest(again) == digest(seq)
    single = tmp_path / "single"
    generate(single, 6, 3, H, W, seed=0, workers=1, progress=False)
    skip = ("sequence", "poses", "meta.json")
    assert digest(single, skip) == digest(seq, skip)
    meta = json.loads((seq / "meta.json").read_text())
    assert meta["sequence"]["offsets"] == [-1, 1]
    ids = (seq / "gt_sets" / "train.txt").read_text().split()
    ids += (seq / "gt_sets" / "val.txt").read_text().split()
    assert len(ids) == 9
    for sid in ids:
        for k in ("-1", "+1"):
            frame = np.asarray(Image.open(seq / "sequence" / f"{sid}_{k}.png"))
            assert frame.shape == (H, W, 3)
            assert not np.array_equal(frame, np.asarray(Image.open(seq / "images" / f"{sid}.png")))
        poses = json.loads((seq / "poses" / f"{sid}.json").read_text())
        assert np.allclose(poses["K"], intrinsics(H, W))
        assert sorted(poses["T_0_to"]) == ["+1", "-1"]


def test_warping_with_the_exact_depth_and_pose_reconstructs_frame_0():
    """Frame +1 warped into frame 0 with the exact depth and pose: interior pixels match to the
    sensor noise, and the error above the noise floor is a small fraction of a wrong pose's."""
    h, w = 96, 128
    K = torch.tensor(intrinsics(h, w), dtype=torch.float32)[None]
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    good, wrong, floor = [], [], []
    for index in range(8):
        frame0, frames, poses = render_sequence(0, "train", index, h, w)
        image, depth = as_tensor(frame0.image), torch.from_numpy(frame0.depth)[None, None]
        T = torch.tensor(poses[1], dtype=torch.float32)[None]
        # frame 0 rendered again with other sensor noise: the floor of any comparison
        scene = sample_scene(_streams(0, "train", index, "a", 0))
        noisy = render(scene, intrinsics(h, w), h, w, "a", _streams(0, "train", index, "a", 1, 0),
                       exposure=frame0.exposure, noise=_streams(0, "train", index, "a", 99))
        err = photometric_error(warp(as_tensor(frames[1].image), depth, K, T), image, 0.0)[inner]
        bad = warp(as_tensor(frames[1].image), depth, K, torch.linalg.inv(T))
        base = photometric_error(as_tensor(noisy.image), image, 0.0)[inner]
        good.append(err.mean().item())
        wrong.append(photometric_error(bad, image, 0.0)[inner].mean().item())
        floor.append(base.mean().item())
        assert err.median() < 1.3 * base.median(), index  # within the sensor noise
    g, b, f = np.mean(good), np.mean(wrong), np.mean(floor)
    assert f == pytest.approx(0.0115, abs=0.002)  # uniform noise of std 0.01 on both images
    assert g - f < 0.2 * (b - f), (g, b, f)


def test_stored_poses_follow_the_camera_motion(seq):
    ds = SyntheticDataset(seq, "train", ["semseg"], frames=[-1, 1])
    for i in range(len(ds)):
        s = ds[i]
        P = s["poses"].double()
        assert s["frame_offsets"] == [-1, 1] and s["frames"].shape == (2, 3, H, W)
        # constant motion: 0 -> +1 is the step -1 -> 0, i.e. the inverse of 0 -> -1
        torch.testing.assert_close(P[0] @ P[1], torch.eye(4, dtype=torch.float64), atol=1e-6,
                                   rtol=0)
        step = P[1, :3, 3].norm()
        assert 0.15 <= step <= 0.31  # a walk at a few frames per second
        angle = Rotation.from_matrix(P[1, :3, :3].numpy()).magnitude()
        assert angle < math.radians(2.5)
    # a hand-built motion: a camera turned by 30 degrees, stepping 10 cm forward and yawing
    rot = Rotation.from_euler("y", 30, degrees=True).as_matrix()
    scene = Scene(np.array([5.0, 3.0, 6.0]), np.array([0.5, 1.2, 1.0]), rot, np.zeros(3), [], [],
                  [])
    turn = Rotation.from_euler("y", 2, degrees=True).as_matrix()
    motion = Motion(np.array([0.0, 0.0, 0.1]), turn)
    nxt, prev = moved(scene, motion, 1), moved(scene, motion, -1)
    np.testing.assert_allclose(nxt.cam_pos, scene.cam_pos + rot @ [0, 0, 0.1])
    T = relative_pose(scene, nxt)
    np.testing.assert_allclose(T[:3, :3], turn.T, atol=1e-12)
    np.testing.assert_allclose(T[:3, 3], -turn.T @ [0, 0, 0.1], atol=1e-12)
    np.testing.assert_allclose(relative_pose(prev, scene), T, atol=1e-12)
    np.testing.assert_allclose(relative_pose(scene, prev) @ T, np.eye(4), atol=1e-12)


def test_rodrigues_and_inverted_transforms_match_hand_built_rotations():
    quarter = axis_angle_to_matrix(torch.tensor([0.0, math.pi / 2, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(quarter, [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], atol=1e-7)
    assert torch.equal(axis_angle_to_matrix(torch.zeros(3)), torch.eye(3))
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.3
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(axis_angle_to_matrix(vec), Rotation.from_rotvec(vec).as_matrix(),
                               atol=1e-6)
    T, inv = rigid_transform(vec, t), rigid_transform(vec, t, invert=True)
    np.testing.assert_allclose(T[:, :3, 3], t)
    np.testing.assert_allclose(inv @ T, np.broadcast_to(np.eye(4), (5, 4, 4)), atol=1e-12)
    np.testing.assert_allclose(T[:, 3], np.broadcast_to([0, 0, 0, 1.0], (5, 4)))


def test_pose_network_orders_the_frames_in_time_and_inverts_for_earlier_ones():
    torch.manual_seed(0)
    net = PoseNet(pretrained=False)
    image, frames = torch.rand(2, 3, 32, 48), torch.rand(2, 2, 3, 32, 48)
    seen = []

    def motion(earlier, later):
        seen.append((earlier, later))
        return torch.full((2, 3), 0.1 * len(seen)), torch.full((2, 3), 0.5 * len(seen))

    net.motion = motion
    poses = net(image, frames, [-1, 1])
    assert seen[0][0] is frames[:, 0] or torch.equal(seen[0][0], frames[:, 0])
    assert torch.equal(seen[0][1], image) and torch.equal(seen[1][0], image)
    assert torch.equal(seen[1][1], frames[:, 1])
    # -1: [I_-1, I_0] gives -1 -> 0; inverted it takes frame 0's points to frame -1's
    torch.testing.assert_close(poses[:, 0] @ rigid_transform(torch.full((2, 3), 0.1),
                                                             torch.full((2, 3), 0.5)),
                               torch.eye(4).expand(2, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(poses[:, 1], rigid_transform(torch.full((2, 3), 0.2),
                                                            torch.full((2, 3), 1.0)))
    # the real network: 6 input channels, the ImageNet-style first layer halved and duplicated
    net = PoseNet(pretrained=False)
    w = net.encoder[0].weight
    assert w.shape == (64, 6, 7, 7) and torch.equal(w[:, :3], w[:, 3:])
    out = net(image, frames, [-1, 1])
    assert out.shape == (2, 2, 4, 4) and torch.isfinite(out).all()
    assert out[..., :3, 3].abs().max() < 0.1  # outputs are scaled by 0.01


# --- the photometric loss -----------------------------------------------------------------------

def test_ssim_distance_by_hand():
    a, b = 0.3, 0.7
    x, y = torch.full((1, 1, 4, 5), a), torch.full((1, 1, 4, 5), b)
    ssim = (2 * a * b + SSIM_C1) / (a * a + b * b + SSIM_C1)  # constant patches: no variance
    torch.testing.assert_close(ssim_distance(x, y), torch.full_like(x, (1 - ssim) / 2))
    assert ssim_distance(x, x).abs().max() < 1e-6
    # one interior 3x3 window of random images, computed directly
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 1, 5, 5, generator=g), torch.rand(1, 1, 5, 5, generator=g)
    px, py = x[0, 0, 1:4, 1:4].double(), y[0, 0, 1:4, 1:4].double()
    mx, my = px.mean(), py.mean()
    vx, vy = (px * px).mean() - mx**2, (py * py).mean() - my**2
    cov = (px * py).mean() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim_distance(x, y)[0, 0, 2, 2].item() == pytest.approx(((1 - s) / 2).item(),
                                                                   abs=1e-6)
    # the border uses reflection padding: the corner window holds x[0..1] and a reflected row
    err = photometric_error(x.expand(1, 3, 5, 5), y.expand(1, 3, 5, 5), 0.85)
    l1 = (x - y).abs()
    torch.testing.assert_close(err, 0.85 * ssim_distance(x, y) + 0.15 * l1)


def test_smoothness_by_hand():
    disp = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2)[None, None]  # mean 2.5: steps of 0.4
    flat = torch.zeros(1, 3, 2, 4)
    assert smoothness(disp, flat).item() == pytest.approx(0.4)
    edge = flat.clone()
    edge[..., 2:] = 1.0  # an image edge between columns 1 and 2
    assert smoothness(disp, edge).item() == pytest.approx((0.4 + 0.4 * math.exp(-1) + 0.4) / 3)
    vertical = torch.tensor([[1.0] * 4, [3.0] * 4])[None, None]  # mean 2: one step of 1
    assert smoothness(vertical, flat).item() == pytest.approx(1.0)


def raw_for_depth(depth: torch.Tensor, scales=(0, 1, 2, 3)) -> dict[int, torch.Tensor]:
    """Head outputs at each scale whose decoded depth is ``depth`` (downsampled)."""
    task = get_task("disp")
    sigma = depth_to_sigmoid(depth, task.min_depth, task.max_depth)
    out = {}
    for s in scales:
        small = torch.nn.functional.interpolate(sigma, scale_factor=0.5**s, mode="bilinear",
                                                align_corners=False) if s else sigma
        out[s] = torch.logit(small.clamp(1e-6, 1 - 1e-6))
    return out


def test_automasking_ignores_a_static_camera():
    """Frames equal to the image (nothing moved): with auto-masking the unwarped error wins
    everywhere, so even a wrong pose and depth cost (almost) nothing; without it they cost."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 36, 52, generator=g), 5, 1)
    frames = image[:, None].expand(1, 2, 3, 32, 48).clone()
    K = torch.tensor(intrinsics(32, 48), dtype=torch.float32)[None]
    poses = rigid_transform(torch.tensor([[0.0, 0.1, 0.0]] * 2),
                            torch.tensor([[0.3, 0.0, 0.2]] * 2))[None]
    raw = raw_for_depth(torch.full((1, 1, 32, 48), 2.0))
    task = get_task("disp")
    masked = PhotometricLoss()(raw, task, image, frames, K, poses)
    plain = PhotometricLoss(automask=False)(raw, task, image, frames, K, poses)
    assert masked["photometric"] < 1e-4
    assert plain["photometric"] > 0.02
    assert masked["smoothness"] == plain["smoothness"] == 0  # constant disparity


def test_photometric_loss_prefers_the_true_depth_and_pose():
    """Over four scenes, the loss of the true depth and pose is the lowest of these guesses.

    Its own value is mostly the sensor noise (about 0.045: SSIM over 3x3 windows of noisy flat
    regions), so the margins are over that floor."""
    torch.manual_seed(0)
    h, w = 96, 128
    K = torch.tensor(intrinsics(h, w), dtype=torch.float32)[None]
    loss, task = PhotometricLoss(scales=[0]), get_task("disp")
    totals = dict.fromkeys(("true", "far", "near", "flat", "wrong pose"), 0.0)
    for index in range(4):
        frame0, frames, poses = render_sequence(0, "train", index, h, w)
        image = as_tensor(frame0.image)
        nbrs = torch.stack([as_tensor(frames[k].image)[0] for k in (-1, 1)])[None]
        T = torch.tensor(np.stack([poses[-1], poses[1]]), dtype=torch.float32)[None]
        depth = torch.from_numpy(frame0.depth)[None, None]
        guesses = {"true": (depth, T), "far": (depth * 2, T), "near": (depth / 2, T),
                   "flat": (torch.full_like(depth, depth.mean().item()), T),
                   "wrong pose": (depth, torch.linalg.inv(T))}
        for name, (d, poses_) in guesses.items():
            totals[name] += loss(raw_for_depth(d, [0]), task, image, nbrs, K,
                                 poses_)["photometric"].item() / 4
    true = totals.pop("true")
    assert 0.03 < true < 0.06, true
    limits = {"far": 0.9, "near": 0.75, "flat": 0.9, "wrong pose": 0.6}
    for name, value in totals.items():
        assert true < limits[name] * value, (name, true, value)


def test_a_flipped_sequence_sample_still_warps_exactly(seq):
    """Flipping mirrors the image, the frames, K and the poses consistently: the warp from the
    flipped neighbours with the flipped depth reconstructs the flipped image as well as before,
    while the unmirrored poses do not."""
    ds = SyntheticDataset(seq, "train", ["depth"], frames=[-1, 1])
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))

    def error(s, poses=None) -> float:
        poses = s["poses"] if poses is None else poses
        warped = warp(s["frames"], s["depth"].expand(2, 1, H, W), s["K"].expand(2, 3, 3), poses)
        return photometric_error(warped, s["image"].expand(2, 3, H, W), 0.0)[inner].mean().item()

    right = wrong = 0.0
    for i in range(len(ds)):
        s = ds[i]
        f = hflip(s)
        assert torch.equal(f["frames"], s["frames"].flip(-1))
        assert error(f) == pytest.approx(error(s), rel=0.02)
        right, wrong = right + error(f), wrong + error(f, s["poses"])
    assert wrong > 1.5 * right, (wrong, right)


# --- data and training ----------------------------------------------------------------------------

class TrainDepthForbidden(SyntheticDataset):
    """Raises on reading a depth label of the training split."""

    name = "synthetic_no_train_depth"

    def _read_depth(self, record, image_hw):
        if self.split == "train":
            raise AssertionError(f"depth label of {record.id} read in training")
        return super()._read_depth(record, image_hw)

    readers: ClassVar = {**SyntheticDataset.readers, "depth": _read_depth}


if "synthetic_no_train_depth" not in DATASETS:
    register_dataset("synthetic_no_train_depth", TrainDepthForbidden)


def sde_module(**kwargs) -> SelfSupervisedDepthModule:
    options = {
        "tasks": {"semseg": {"channels": 10}, "disp": {}},
        "network": {"arch": "densemtl",
                    "encoder": {"name": "resnet18", "pretrained": False, "dilated": True},
                    "decoder": {"num_ch_dec": [8, 16, 16, 32, 32],
                                "scales": {"semseg": [0, 2], "disp": [0, 1, 2, 3]}}},
        "loss": {"weights": {"semseg": 1.0, "disp": 1.0}, "scales": [0, 2]},
        "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]},
        "pose_network": {"pretrained": False}, "pose_lr": 1e-4, "grid_samples": 0,
        "constant_fit_batches": 0}
    return SelfSupervisedDepthModule(**{**options, **kwargs})


def data_module(root, dataset="synthetic", **kwargs) -> DenseDataModule:
    return DenseDataModule(dataset, str(root), ["semseg", "disp"], H, W, batch_size=2,
                           num_workers=0, frames=[-1, 1], **kwargs)


def test_depth_labels_are_never_read_in_sde_training(seq, tmp_path):
    torch.manual_seed(0)
    data = data_module(seq, "synthetic_no_train_depth", label_fraction={"disp": 0.0})
    trainer = Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    module = sde_module()
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    val = module.results["val"]
    assert 0 < val["disp/absRel"] < 1 and 0 <= val["semseg/mIoU"] <= 1  # depth scored in val
    # the guard is live: keeping half of the depth labels reads some of them
    half = data_module(seq, "synthetic_no_train_depth", label_fraction={"disp": 0.5})
    half.setup("fit")
    with pytest.raises(AssertionError, match="read in training"):
        [half.dataset("train")[i] for i in range(len(half.dataset("train")))]


def test_label_fraction_keeps_a_fixed_subset(seq):
    data = data_module(seq, label_fraction={"disp": 0.5})
    data.setup("fit")
    train = data.dataset("train")
    has = [("depth" in train[i]) for i in range(len(train))]
    assert sum(has) == 3
    again = data_module(seq, label_fraction={"disp": 0.5})
    again.setup("fit")
    assert [("depth" in again.dataset("train")[i]) for i in range(len(train))] == has
    assert all("depth" in data.dataset("val")[i] for i in range(3))  # evaluation is labelled
    with pytest.raises(ValueError, match="not one of the tasks"):
        data_module(seq, label_fraction={"depth": 0.5})


def test_a_short_sde_fit_lowers_the_photometric_loss(seq):
    torch.manual_seed(0)
    data = data_module(seq, label_fraction={"disp": 0.0}, hflip=0.0)
    data.setup("fit")
    from densemtl.data.sample import collate

    train = data.dataset("train")
    batch = collate([train[i] for i in range(4)])
    module = sde_module()
    opt = torch.optim.Adam([*module.net.parameters(), *module.pose_net.parameters()], lr=1e-3)

    def photometric() -> float:
        with torch.no_grad():
            return module.self_supervised_loss(module(batch["image"]), batch)["photometric"].item()

    module.train()
    before = photometric()
    for _ in range(25):
        loss = module.self_supervised_loss(module(batch["image"]), batch)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = photometric()
    assert after < 0.85 * before, (before, after)


def test_optimiser_groups_give_the_pose_network_its_own_rate(seq):
    module = sde_module(pose_lr=1e-6)
    module.trainer = Trainer(max_steps=10, logger=False)
    opt = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["pose"]["lr"] == 1e-6 and groups["rest"]["lr"] == 1e-3
    pose = {id(p) for p in module.pose_net.parameters()}
    assert {id(p) for p in groups["pose"]["params"]} == pose
    assert not pose & {id(p) for p in groups["rest"]["params"]}


def test_sde_config_fits_and_tests_from_the_command_line(tmp_path, monkeypatch):
    """The shipped built-in SDE config, shrunk: fit 4 steps, test, metrics.json has the
    median-scaled depth metrics and mIoU."""
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs/synthetic/sde_densemtl_sd.yaml"
    small = ["--data.init_args.synthesize",
             '{"train": 8, "val": 4, "height": 48, "width": 64, "seed": 0, "sequence": true}',
             "--data.init_args.height", "48", "--data.init_args.width", "64",
             "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
             "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
             "--model.init_args.constant_fit_batches", "2"]
    assert cli(["fit", "--config", str(config), *small]) == 0
    run = tmp_path / "runs/synthetic/sde_densemtl_sd"
    assert cli(["test", "--config", str(config), *small,
                "--ckpt_path", str(run / "checkpoints/last.ckpt")]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    values = metrics.get("metrics", metrics)
    for key in ("disp/absRel", "disp/rmse", "disp/delta1", "semseg/mIoU"):
        assert key in values and math.isfinite(values[key]), key
    assert (tmp_path / "data/synthetic_seq/sequence").is_dir()
    report = (run / "report.md").read_text()
    assert "- disp: each image's prediction scaled by median(GT) / median(prediction)" in report


def test_decoder_scales_per_task():
    module = sde_module()
    out = module(torch.rand(2, 3, H, W))
    assert sorted(out["semseg"]) == [0, 2] and sorted(out["disp"]) == [0, 1, 2, 3]
    assert out["disp"][3].shape[-2:] == (H // 8, W // 8)
    with pytest.raises(ValueError, match="does not have"):
        sde_module(network={"arch": "mtl", "encoder": {"name": "resnet18", "pretrained": False},
                            "decoder": {"scales": {"depth": [0]}}})


def test_photometric_loss_stays_fp32_under_bf16_autocast(seq):
    torch.manual_seed(0)
    data = data_module(seq, label_fraction={"disp": 0.0}, hflip=0.0)
    data.setup("fit")
    from densemtl.data.sample import collate

    batch = collate([data.dataset("train")[i] for i in range(2)])
    module = sde_module().eval()
    with torch.no_grad():
        outputs = module(batch["image"])
        ref = module.self_supervised_loss(outputs, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module.self_supervised_loss(
                {t: {s: v.bfloat16() for s, v in o.items()} for t, o in outputs.items()}, batch)
    assert low["photometric"].dtype == torch.float32
    # the inputs were rounded to bf16 (8 bits of mantissa); the loss itself ran in fp32
    assert low["photometric"].item() == pytest.approx(ref["photometric"].item(), rel=0.02)


def sde_cli_args(root: Path, run: Path, steps: int, every: int) -> list[str]:
    return ["--config", str(ROOT / "configs/synthetic/sde_densemtl_sd.yaml"),
            "--data.init_args.root", str(root), "--data.init_args.synthesize", "null",
            "--data.init_args.height", str(H), "--data.init_args.width", str(W),
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.hflip", "0.0", "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(every),
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1",
            "--model.init_args.constant_fit_batches", "0", "--model.init_args.grid_samples",
            "0"]


def test_sde_resume_restores_the_pose_network_and_its_optimiser_group(seq, tmp_path):
    """6 steps in one go == 3 steps, then resumed to 6 (6 samples, batch 2: epochs of 3; the
    poly schedule told its length, so that the 3-step run follows the same learning rates)."""
    poly = ["--model.init_args.scheduler", '{"name": "poly", "power": 0.9, "total_steps": 6}']
    assert cli(["fit", *sde_cli_args(seq, tmp_path / "a", 6, 3), *poly]) == 0
    assert cli(["fit", *sde_cli_args(seq, tmp_path / "b", 3, 3), *poly]) == 0
    assert cli(["fit", *sde_cli_args(seq, tmp_path / "b", 6, 3), *poly,
                "--ckpt_path", "last"]) == 0
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    groups = a["optimizer_states"][0]["param_groups"]
    assert [g["name"] for g in groups] == ["encoder", "rest", "pose"]
    pose = [k for k in a["state_dict"] if k.startswith("pose_net.")]
    assert len(pose) > 100
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_sde_trains_and_evaluates_with_ddp_on_two_processes(seq, tmp_path):
    """Two CPU processes train (finite losses), and validating the checkpoint on two processes
    gives the one-process metrics (median scaling is per image, the sums are all-reduced)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run = tmp_path / "ddp"
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run([sys.executable, "-m", "densemtl", "fit",
                           *sde_cli_args(seq, run, 2, 2), *ddp],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    photometric = [float(r.split(",")[header.index("train/photometric")]) for r in rows[1:]
                   if r.split(",")[header.index("train/photometric")]]
    assert photometric and all(0 < v < 1 for v in photometric)
    results = {}
    for devices, extra in ((1, []), (2, ddp)):
        out = tmp_path / f"val{devices}"
        args = [*sde_cli_args(seq, out, 2, 2), "--trainer.limit_val_batches", "1.0",
                "--trainer.devices", str(devices), *extra[2:]]
        proc = subprocess.run([sys.executable, "-m", "densemtl", "validate", *args,
                               "--ckpt_path", str(ckpt)],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads((out / "metrics/val-last.json").read_text())["metrics"]
    assert "disp/absRel" in results[1]
    for name, value in results[1].items():  # (a class absent from these 3 images: NaN IoU)
        assert results[2][name] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), name


def test_given_poses_replace_the_pose_network(seq):
    """With the camera motion known (``pose: given``) no pose network is built and the loss
    uses the batch's poses: the exact ones give a lower loss than a wrong motion."""
    module = sde_module(pose="given")
    assert module.pose_net is None and module.extra_param_groups() == []
    data = data_module(seq, label_fraction={"disp": 0.0}, hflip=0.0)
    data.setup("fit")
    from densemtl.data.sample import collate

    batch = collate([data.dataset("train")[i] for i in range(4)])
    with torch.no_grad():
        outputs = module(batch["image"])
        exact = module.self_supervised_loss(outputs, batch)["photometric"]
        wrong = module.self_supervised_loss(
            outputs, {**batch, "poses": torch.linalg.inv(batch["poses"])})["photometric"]
    assert exact < wrong
    with pytest.raises(KeyError, match="known poses"):
        module.self_supervised_loss(outputs, {k: v for k, v in batch.items() if k != "poses"})
    with pytest.raises(ValueError, match="'network' or 'given'"):
        sde_module(pose="odometry")
