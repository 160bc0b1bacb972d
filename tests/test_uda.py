"""Multi-task UDA: domain maps, discriminator, alternating updates (labels and signs recomputed
independently), target labels never read, exact resume, configs."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback

from densemtl import load_model
from densemtl.cli import main as cli
from densemtl.data.synthetic import generate
from densemtl.models.discriminator import PatchDiscriminator
from densemtl.tasks import depth_to_inverse
from densemtl.tasks.depth import source_depth_range
from densemtl.tasks.semseg import entropy_map
from densemtl.training.uda import AdaptationModule, domain_map

pytestmark = pytest.mark.xdist_group("uda")

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"semseg": {"channels": 10}, "depth": {}}
H, W = 48, 64


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("uda_data")
    generate(root / "a", 4, 2, H, W, seed=0, style="a", workers=1, progress=False)
    generate(root / "b", 4, 2, H, W, seed=1, style="b", workers=1, progress=False)
    return root / "a", root / "b"


def module_args(**over) -> dict:
    args = {
        "tasks": TASKS,
        "network": {"arch": "densemtl", "encoder": {"name": "resnet18", "pretrained": False},
                    "decoder": {"num_ch_dec": [8, 8, 16, 16, 32], "aspp_dropout": 0.0}},
        "loss": {"weights": {"semseg": 50, "depth": 1}, "scales": [1, 0]},
        "optimizer": {"name": "adam", "lr": 1e-3, "backbone_lr": 5e-4, "betas": [0.9, 0.98]},
        "lambda_adv": 0.005,
        "discriminator": {"ndf": 8, "num_layers": 3, "flip": 0.0},
        "discriminator_optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]},
        "constant_fit_batches": 0,
        "grid_samples": 0,
    }
    args.update(over)
    return args


def write_config(path: Path, domains, run: Path, model: dict | None = None, **trainer) -> Path:
    source, target = domains
    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run), "accelerator": "cpu", "devices": 1,
                    "max_steps": 2, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 1, "num_sanity_val_steps": 0, "gradient_clip_val": None,
                    "enable_progress_bar": False, "enable_model_summary": False, **trainer},
        "model": {"class_path": "densemtl.training.uda.AdaptationModule",
                  "init_args": model or module_args()},
        "data": {"class_path": "densemtl.data.AdaptationDataModule", "init_args": {
            "source": "synthetic", "source_root": str(source), "target": "synthetic",
            "target_root": str(target), "height": H, "width": W, "batch_size": 2,
            "num_workers": 0, "hflip": 0.0}},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --- domain maps and discriminator ------------------------------------------------------------

def test_entropy_map_is_normalised_self_information():
    uniform = entropy_map(torch.zeros(2, 8, 3, 4))
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 8))  # sum over c = 1
    sure = entropy_map(torch.tensor([50.0, 0, 0, 0]).view(1, 4, 1, 1))
    assert float(sure.sum()) < 1e-6
    logits = torch.randn(2, 5, 6, 7)
    p = logits.softmax(1)
    expected = -p * torch.log2(p) / math.log2(5)
    torch.testing.assert_close(entropy_map(logits), expected)
    assert float(entropy_map(logits).sum(1).max()) <= 1 + 1e-6


def test_depth_map_uses_the_source_gt_range_of_valid_pixels():
    depth = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[100.0, 100.0], [100.0, 100.0]]])
    batch = {"depth": depth, "has_depth": torch.tensor([True, False])}
    lo, hi = source_depth_range(batch)  # invalid pixels (0) and the unlabelled sample ignored
    torch.testing.assert_close(lo, depth_to_inverse(torch.tensor(4.0)))
    torch.testing.assert_close(hi, depth_to_inverse(torch.tensor(1.0)))
    pred = depth_to_inverse(depth[:1]).unsqueeze(1)  # a perfect prediction of the first sample
    m = domain_map("depth", pred, (2, 2), (lo, hi))
    assert float(m[0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-6)
    assert float(m[0, 0, 0, 1]) == pytest.approx(1.0, abs=1e-6)
    assert float(domain_map("depth", -torch.ones(1, 1, 2, 2), (2, 2), (lo, hi)).max()) < 0
    lo0, hi0 = source_depth_range({"depth": torch.zeros(1, 2, 2)})  # nothing valid
    assert (float(lo0), float(hi0)) == (0.0, 1.0)


def test_regression_maps_are_upsampled_and_normalised():
    normals = domain_map("normals", torch.randn(2, 3, 6, 8), (12, 16))
    assert normals.shape == (2, 3, 12, 16)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 12, 16))
    edges = domain_map("edges", torch.randn(2, 2, 6, 8), (12, 16))
    assert edges.shape == (2, 1, 12, 16) and 0 <= float(edges.min()) <= float(edges.max()) <= 1
    logits = torch.randn(1, 2, 6, 8)
    torch.testing.assert_close(domain_map("edges", logits, (6, 8)),
                               torch.sigmoid(logits[:, 1:] - logits[:, :1]))


def test_patch_discriminator():
    d = PatchDiscriminator(5)  # paper architecture: 5 convs 64-128-256-512-1
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    assert all(hasattr(c, "parametrizations") for c in convs)  # spectral norm
    x = torch.rand(2, 5, 64, 96)
    assert d(x).shape == (2, 1, 2, 3)
    d.eval()
    torch.testing.assert_close(d(x), d(x))  # no flip in eval mode
    mirror = PatchDiscriminator(5, ndf=8, flip=1.0)
    mirror.train()
    out = mirror(x)
    mirror.eval()
    torch.testing.assert_close(out, mirror(x.flip(-1)))
    with torch.no_grad():  # spectral norm: top singular value of each reshaped weight ~ 1
        for _ in range(20):
            d.train()(x)
    d.eval()
    sigma = torch.linalg.matrix_norm(convs[1].weight.flatten(1), ord=2)
    assert float(sigma.detach()) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match=r"expected \[B,5,H,W\]"):
        d(torch.rand(1, 3, 32, 32))


def test_module_builds_one_discriminator_per_task_and_scale():
    m = AdaptationModule(**module_args(tasks={"semseg": {"channels": 7}, "depth": {},
                                              "normals": {}}))
    assert sorted(m.discriminators) == ["depth_s0", "depth_s1", "normals_s0", "normals_s1",
                                        "semseg_s0", "semseg_s1"]
    assert m.discriminators["semseg_s0"].in_channels == 7
    assert m.discriminators["normals_s1"].in_channels == 3
    assert not m.automatic_optimization
    m = AdaptationModule(**module_args(align_tasks=["semseg"], align_scales=[0]))
    assert list(m.discriminators) == ["semseg_s0"]
    with pytest.raises(ValueError, match="align_tasks"):
        AdaptationModule(**module_args(align_tasks=["normals"]))


# --- the training step --------------------------------------------------------------------------

class Recorder(Callback):
    """Snapshots the module and batch before the first iteration; records, at each optimiser
    step, which optimiser steps and the gradients it is about to apply."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict, dict]] = []
        self.state = self.batch = None
        self.target_keys: list[set[str]] = []
        self.forwards: list[int] = []

    def on_fit_start(self, trainer, module) -> None:
        net_params = dict(module.net.named_parameters())
        disc_params = dict(module.discriminators.named_parameters())

        def grads(params):
            return {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}

        for name, opt in zip(("network", "discriminators"), trainer.optimizers):
            opt.register_step_pre_hook(
                lambda o, a, kw, name=name: self.events.append(
                    (name, grads(net_params), grads(disc_params))))
        module.net.register_forward_pre_hook(
            lambda mod, args: self.forwards.append(args[0].shape[0]) if mod.training else None)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.target_keys.append(set(batch["target"]))
        if self.state is None:
            self.state = copy.deepcopy(module.state_dict())
            self.batch = copy.deepcopy(batch)


def run_fit(tmp_path, domains, model, **trainer) -> tuple[Path, Recorder]:
    recorder = Recorder()
    config = write_config(tmp_path / "config.yaml", domains, tmp_path / "run", model, **trainer)
    from densemtl.training.cli import make_cli

    cli_obj = make_cli(["--config", str(config)], run=False)
    cli_obj.trainer.callbacks.append(recorder)
    cli_obj.trainer.fit(cli_obj.model, datamodule=cli_obj.datamodule)
    return tmp_path / "run", recorder


def test_alternating_updates_with_the_right_labels_and_signs(tmp_path, domains):
    """One iteration; its two updates are recomputed from scratch with the paper's formulas:
    network: grad of L_sup + lambda * BCE(D(target map), SOURCE=0), discriminators untouched;
    discriminators: grad of BCE(D(source map), 0) + BCE(D(target map), 1), network untouched."""
    args = module_args(lambda_adv=0.5, lambda_disc=2.0)
    _, rec = run_fit(tmp_path, domains, args, max_steps=1, val_check_interval=1)
    assert [e[0] for e in rec.events] == ["network", "discriminators"]
    _, g_net, g_disc = rec.events[0]
    _, d_net, d_disc = rec.events[1]
    assert all(g is None for g in g_disc.values())  # D frozen during the network's backward
    assert sum(g is not None for g in g_net.values()) > 0.9 * len(g_net)
    for k, g in g_net.items():  # the discriminators' loss adds nothing to the network
        assert (g is None and d_net[k] is None) or torch.equal(g, d_net[k]), k
    assert all(g is not None for g in d_disc.values())
    assert rec.forwards == [2, 2]  # one source and one target forward (batch 2 each)

    # independent recomputation from the pre-step state and batch
    ref = AdaptationModule(**args)
    ref.load_state_dict(rec.state)
    ref.train()
    src, tgt = rec.batch["source"], rec.batch["target"]
    rng = source_depth_range(src)

    def maps(out, size):
        return {f"{t}_s{s}": domain_map(t, out[t][s], size, rng) for t in TASKS for s in (1, 0)}

    def bce_mean(ms, label):
        return torch.stack([F.binary_cross_entropy_with_logits(
            ref.discriminators[k](m), torch.full((2, 1, 6, 8), label)) for k, m in ms.items()]
        ).mean()

    def net_grads(loss):
        grads = torch.autograd.grad(loss, list(ref.net.parameters()), retain_graph=True,
                                    allow_unused=True)
        return dict(zip(dict(ref.net.named_parameters()), grads))

    src_out, tgt_out = ref.net(src["image"]), ref.net(tgt["image"])
    sup = ref.criterion(src_out, src)["total"]
    tgt_maps = maps(tgt_out, (H, W))
    states = {k: v.clone() for k, v in ref.discriminators.state_dict().items()}
    g_sup = net_grads(sup)
    adv_right = net_grads(0.5 * bce_mean(tgt_maps, 0.0))  # fool D: the SOURCE label
    ref.discriminators.load_state_dict(states)  # same spectral-norm power iteration
    adv_wrong = net_grads(0.5 * bce_mean(tgt_maps, 1.0))
    names = [k for k, g in g_net.items() if g is not None]
    for k in names:  # the whole update: L_sup + lambda_adv * L_adv, nothing else
        torch.testing.assert_close(g_net[k], g_sup[k] + adv_right[k], rtol=1e-4, atol=1e-7,
                                   msg=k)

    def flat(grads):
        return torch.cat([(grads[k] if grads[k] is not None else torch.zeros_like(g_net[k]))
                          .flatten() for k in names])

    adv_seen = flat(g_net) - flat(g_sup)  # the adversarial part of the applied gradient
    assert float(F.cosine_similarity(adv_seen, flat(adv_right), dim=0)) > 0.99
    assert float(F.cosine_similarity(adv_seen, flat(adv_wrong), dim=0)) < 0

    ref.discriminators.load_state_dict(states)
    ref.discriminate(tgt_maps, 0.0)  # advance the power iteration as the network step did
    with torch.no_grad():
        src_maps = maps(src_out, (H, W))
    d_params = dict(ref.discriminators.named_parameters())
    d_state = {k: v.clone() for k, v in ref.discriminators.state_dict().items()}

    def disc_grads(src_label, tgt_label):
        ref.discriminators.load_state_dict(d_state)
        loss = 2.0 * (bce_mean({k: m.detach() for k, m in src_maps.items()}, src_label)
                      + bce_mean({k: m.detach() for k, m in tgt_maps.items()}, tgt_label))
        return dict(zip(d_params, torch.autograd.grad(loss, list(d_params.values()))))

    right, wrong = disc_grads(0.0, 1.0), disc_grads(1.0, 0.0)
    for k, g in d_disc.items():
        torch.testing.assert_close(g, right[k], rtol=1e-4, atol=1e-7, msg=k)
    seen, good, bad = (torch.cat([g[k].flatten() for k in d_disc]) for g in (d_disc, right, wrong))
    assert float((seen - good).norm() / seen.norm()) < 1e-4  # swapped labels: far off
    assert float((seen - bad).norm() / seen.norm()) > 0.1


def test_source_only_never_forwards_the_target(tmp_path, domains):
    run, rec = run_fit(tmp_path, domains, module_args(lambda_adv=0.0), max_steps=2)
    assert [e[0] for e in rec.events] == ["network", "network"]
    assert rec.forwards == [2, 2]  # source batches only
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    for k, v in rec.state.items():  # discriminators untouched
        if k.startswith("discriminators."):
            torch.testing.assert_close(ckpt["state_dict"][k], v)


def test_target_training_labels_are_never_read(tmp_path, domains):
    source, target = domains
    blind = tmp_path / "target"
    shutil.copytree(target, blind)
    removed = 0
    for folder in ("segmentation", "depth", "normals", "edge"):
        for f in (blind / folder).glob("train_*"):
            f.unlink()
            removed += 1
    assert removed == 16
    run, rec = run_fit(tmp_path, (source, blind), None, max_steps=2)
    assert all(keys <= {"image", "id", "K"} for keys in rec.target_keys)
    assert len(rec.events) == 4  # 2 iterations x (network, discriminators)
    assert (run / "metrics" / "val-step0000002.json").is_file()  # target val labels used


def test_resume_restores_step_optimisers_schedulers_and_discriminators(tmp_path, domains):
    """4 iterations == 2 + resume to 4 (2 iterations per epoch, no augmentation, no flip)."""
    args = module_args(discriminator_scheduler={"name": "poly", "power": 0.9, "total_steps": 4})

    def fit(name, steps, *extra):
        config = write_config(tmp_path / f"{name}.yaml", domains, tmp_path / name, args,
                              max_steps=steps, val_check_interval=2)
        assert cli(["fit", "--config", str(config), *extra]) == 0
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)

    a = fit("a", 4)
    half = fit("b", 2)
    assert half["global_step"] == 2
    b = fit("b", 4, "--ckpt_path", "last")
    assert a["global_step"] == b["global_step"] == 4  # iterations, not optimiser steps
    assert len(b["optimizer_states"]) == 2
    lr_d = [g["lr"] for g in b["optimizer_states"][1]["param_groups"]]
    assert lr_d == [g["lr"] for g in a["optimizer_states"][1]["param_groups"]]
    assert lr_d[0] == 0.0  # poly over 4 iterations
    assert [s["last_epoch"] for s in b["lr_schedulers"]] == [4]  # D poly (network: none)
    assert b["optimizer_states"][1]["state"][0]["step"] == 4  # Adam state of D carried over
    assert any(k.startswith("discriminators.") for k in b["state_dict"])
    moved = max(float((a["state_dict"][k] - half["state_dict"][k]).abs().max())
                for k in a["state_dict"] if k.startswith("discriminators.")
                and a["state_dict"][k].is_floating_point())
    assert moved > 1e-4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")
    net = load_model(tmp_path / "b" / "checkpoints" / "last.ckpt")  # the network alone
    assert list(net.tasks) == ["semseg", "depth"]


# --- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, classes, source, target_options", [
    ("synthia2cityscapes_densemtl_sd", 16, "synthia", {"num_classes": 16}),
    ("vkitti2cityscapes_densemtl_sd", 8, "vkitti2", {"num_classes": 8}),
])
def test_paper_configs(name, classes, source, target_options):
    cfg = yaml.safe_load((ROOT / "configs" / "uda" / f"{name}.yaml").read_text())
    args = cfg["model"]["init_args"]
    data = cfg["data"]["init_args"]
    assert cfg["model"]["class_path"] == "densemtl.training.uda.AdaptationModule"
    assert args["tasks"]["semseg"]["channels"] == classes
    assert args["lambda_adv"] == 0.005 and args["align_scales"] == [1, 0]
    assert args["optimizer"]["lr"] == 2.5e-4 and args["optimizer"]["backbone_lr"] == 1.5e-5
    assert args["optimizer"]["betas"] == [0.9, 0.98] and args["scheduler"]["name"] == "none"
    assert args["discriminator_optimizer"] == {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.99]}
    assert args["discriminator_scheduler"] == {"name": "poly", "power": 0.9}
    assert cfg["trainer"]["max_steps"] == 90000 and cfg["trainer"]["gradient_clip_val"] is None
    assert data["source"] == source and data["target"] == "cityscapes"
    assert data["target_options"] == target_options
    args["network"]["encoder"]["pretrained"] = False
    module = AdaptationModule(**args)
    assert sorted(module.discriminators) == ["depth_s0", "depth_s1", "semseg_s0", "semseg_s1"]
    assert module.discriminators["semseg_s1"].in_channels == classes


def test_synthetic_configs_differ_only_in_lambda_adv():
    adapted = yaml.safe_load((ROOT / "configs/uda/synthetic_a2b_densemtl_sdn.yaml").read_text())
    source = yaml.safe_load((ROOT / "configs/uda/synthetic_a2b_sourceonly_sdn.yaml").read_text())
    assert adapted["model"]["init_args"].pop("lambda_adv") == 0.005
    assert source["model"]["init_args"].pop("lambda_adv") == 0
    adapted["trainer"].pop("default_root_dir")
    source["trainer"].pop("default_root_dir")
    assert adapted == source
