"""Write every dataset x method x task-set config of the paper (and the built-in benchmark).

    python configs/make_configs.py          # rewrites configs/<dataset>/*.yaml

The configs are generated so that they stay consistent; edit this file, not the YAML files
(``tests/test_configs.py`` checks that they are up to date). Settings: spec §7.4 of the paper's
code -- padnet+ methods: Adam (0.9, 0.98), backbone/rest learning rates per dataset, StepLR x0.1
at 30k of 40k iterations, batch 2, gradient clipping 10; STL: DeepLab head, SGD momentum 0.9,
weight decay 5e-4, 1e-3 / 1e-2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from densemtl.losses import paper_weights

HERE = Path(__file__).resolve().parent
DATASETS: dict[str, dict[str, Any]] = {
    "cityscapes": {"classes": 16, "size": (512, 1024), "lr": (1e-5, 1e-4), "max_depth": 80.0,
                   "options": {"num_classes": 16}, "task_sets": ["sd", "sdn"]},
    "synthia": {"classes": 16, "size": (512, 1024), "lr": (2e-4, 3e-4), "max_depth": 80.0,
                "options": {}, "task_sets": ["sd", "sdn"]},
    "vkitti2": {"classes": 14, "size": (320, 1024), "lr": (2e-4, 3e-4), "max_depth": 80.0,
                "options": {"num_classes": 14}, "task_sets": ["sd", "sdn"]},
    "nyudv2": {"classes": 40, "size": (448, 576), "lr": (2e-4, 3e-4), "max_depth": 10.0,
               "options": {}, "task_sets": ["sd", "sdn", "sdne"]},
}
TASK_SETS = {"sd": ("semseg", "depth"), "sdn": ("semseg", "depth", "normals"),
             "sdne": ("semseg", "depth", "normals", "edges")}
PAPER_DECODER = {"num_ch_dec": [64, 128, 128, 256, 256], "scales": [0, 1], "aspp": True,
                 "aspp_rates": [6, 12, 18]}
PAPER_EXCHANGE = {"stages": [1], "attn_stride": 8, "fusion": "add", "sa": True, "sxtam": True,
                  "alpha": True}


def task_spec(tasks: tuple[str, ...], classes: int) -> dict[str, Any]:
    channels = {"semseg": {"channels": classes}, "edges": {"channels": 2}}
    return {t: channels.get(t, {}) for t in tasks}


def network(method: str, encoder: dict[str, Any], decoder: dict[str, Any],
            exchange: dict[str, Any]) -> dict[str, Any]:
    if method == "stl":
        return {"arch": "stl", "head": "deeplab", "encoder": encoder}
    net = {"arch": {"densemtl": "densemtl", "mtl": "mtl", "padnet_plus": "padnet_plus"}[method],
           "encoder": encoder, "decoder": decoder}
    if method == "densemtl":
        net["exchange"] = exchange
    return net


def config(dataset: str, root: str, method: str, tasks: tuple[str, ...], *, classes: int,
           size: tuple[int, int], lr: tuple[float, float], max_depth: float,
           options: dict[str, Any], encoder: dict[str, Any], decoder: dict[str, Any],
           exchange: dict[str, Any], trainer: dict[str, Any], data: dict[str, Any],
           run_root: str, weights: dict[str, float], stl_optimizer: dict[str, Any],
           mtl_optimizer: dict[str, Any], scheduler: dict[str, Any],
           metrics: dict[str, Any], name: str) -> dict[str, Any]:
    stl = method == "stl"
    metric_opts = {k: v for k, v in {"depth": {"max_depth": max_depth}, **metrics}.items()
                   if k in tasks}
    init: dict[str, Any] = {
        "tasks": task_spec(tasks, classes),
        "network": network(method, encoder, decoder, exchange),
        "loss": {"weights": {t: (1 if stl else weights[t]) for t in tasks},
                 "scales": [0] if stl else [0, 1]},
        # the paper: the fixed-weight sum; any densemtl.weighting method by name
        "weighting": {"name": "fixed"},
        "metrics": metric_opts,
        "optimizer": stl_optimizer if stl else mtl_optimizer,
        "scheduler": scheduler,
    }
    if not stl:
        init["baseline_runs"] = [f"{run_root}/stl_{t}" for t in tasks]
    return {
        "seed_everything": 0,
        "trainer": {"default_root_dir": f"{run_root}/{name}", **trainer},
        "model": {"class_path": "densemtl.training.MultiTaskModule", "init_args": init},
        "data": {"class_path": "densemtl.data.DenseDataModule", "init_args": {
            "dataset": dataset, "root": root, "height": size[0], "width": size[1], **data,
            **({"dataset_options": options} if options else {})}},
    }


def paper_configs() -> dict[Path, dict[str, Any]]:
    out = {}
    for dataset, d in DATASETS.items():
        backbone_lr, lr = d["lr"]
        common = dict(
            classes=d["classes"], size=d["size"], lr=d["lr"], max_depth=d["max_depth"],
            options=d["options"],
            encoder={"name": "resnet101", "pretrained": True, "dilated": True,
                     "normalisation": "paper"},
            decoder=PAPER_DECODER, exchange=PAPER_EXCHANGE,
            trainer={"accelerator": "auto", "devices": 1, "max_steps": 40000,
                     "val_check_interval": 2500, "check_val_every_n_epoch": None,
                     "log_every_n_steps": 50, "gradient_clip_val": 10.0},
            data={"batch_size": 2, "num_workers": 4, "hflip": 0.5},
            run_root=f"runs/{dataset}", weights={},
            stl_optimizer={"name": "sgd", "lr": 1e-2, "backbone_lr": 1e-3, "momentum": 0.9,
                           "weight_decay": 5e-4},
            mtl_optimizer={"name": "adam", "lr": lr, "backbone_lr": backbone_lr,
                           "betas": [0.9, 0.98]},
            scheduler={"name": "step", "step_size": 30000, "gamma": 0.1},
            metrics={"edges": {"tolerance": 0.011}},
        )
        root = f"data/{dataset}"
        all_tasks = TASK_SETS[d["task_sets"][-1]]
        for t in all_tasks:
            out[HERE / dataset / f"stl_{t}.yaml"] = config(
                dataset, root, "stl", (t,), name=f"stl_{t}", **common)
        for ts in d["task_sets"]:
            tasks = TASK_SETS[ts]
            common["weights"] = paper_weights(tasks)
            for method in ("densemtl", "mtl", "padnet_plus"):
                out[HERE / dataset / f"{method}_{ts}.yaml"] = config(
                    dataset, root, method, tasks, name=f"{method}_{ts}", **common)
    return out


def synthetic_configs() -> dict[Path, dict[str, Any]]:
    """The built-in benchmark, sized for a 2-core CPU (``make demo`` uses densemtl_sdne)."""
    out = {}
    common = dict(
        classes=10, size=(96, 128), lr=(1e-3, 1e-3), max_depth=20.0, options={},
        encoder={"name": "resnet18", "pretrained": False, "dilated": True,
                 "normalisation": "paper"},
        decoder={"num_ch_dec": [16, 32, 32, 64, 64], "scales": [0, 1]},
        exchange=PAPER_EXCHANGE,
        trainer={"accelerator": "cpu", "devices": 1, "max_steps": 280,
                 "val_check_interval": 140, "check_val_every_n_epoch": None,
                 "log_every_n_steps": 20, "num_sanity_val_steps": 0,
                 "gradient_clip_val": 10.0},
        data={"batch_size": 8, "num_workers": 1, "hflip": 0.5,
              # generated on first use when data/synthetic holds no benchmark (as make demo does)
              "synthesize": {"train": 600, "val": 100, "height": 96, "width": 128, "seed": 0}},
        run_root="runs/synthetic", weights={},
        stl_optimizer={"name": "adam", "lr": 1e-3, "backbone_lr": 1e-3, "betas": [0.9, 0.98]},
        mtl_optimizer={"name": "adam", "lr": 1e-3, "backbone_lr": 1e-3, "betas": [0.9, 0.98]},
        scheduler={"name": "poly", "power": 0.9},
        metrics={"edges": {"tolerance": 1.0, "tolerance_unit": "pixels"}},
    )
    root = "data/synthetic"
    for t in TASK_SETS["sdne"]:
        out[HERE / "synthetic" / f"stl_{t}.yaml"] = config(
            "synthetic", root, "stl", (t,), name=f"stl_{t}", **common)
    for ts in ("sd", "sdne"):
        tasks = TASK_SETS[ts]
        common["weights"] = paper_weights(tasks)
        for method in ("densemtl", "mtl", "padnet_plus"):
            out[HERE / "synthetic" / f"{method}_{ts}.yaml"] = config(
                "synthetic", root, method, tasks, name=f"{method}_{ts}", **common)
    return out


# segmentation supervised at scales 0 and 2, depth learned from video at 0-3 (the paper)
SDE_SCALES = {"semseg": [0, 2], "disp": [0, 1, 2, 3]}


def sde_config(dataset: str, method: str, *, classes: int, size: tuple[int, int],
               crop: tuple[int, int] | None, pretrained: bool, encoder: str,
               decoder: dict[str, Any], lr: tuple[float, float, float], steps: dict[str, Any],
               data: dict[str, Any], options: dict[str, Any], max_depth: float,
               trainer: dict[str, Any]) -> dict[str, Any]:
    """The semi-supervised depth setting: segmentation supervised, depth (``disp``) learned
    from the neighbouring frames -1 and +1 with a pose network; depth labels never read in
    training (``label_fraction``), median-scaled depth metrics in evaluation."""
    backbone_lr, rest_lr, pose_lr = lr
    name = f"sde_{method}_sd"
    init: dict[str, Any] = {
        "tasks": {"semseg": {"channels": classes}, "disp": {}},
        "network": network(method, {"name": encoder, "pretrained": pretrained, "dilated": True,
                                    "normalisation": "paper"}, decoder, PAPER_EXCHANGE),
        "loss": {"weights": {"semseg": 1.0, "disp": 1.0}, "scales": [0, 2]},
        "metrics": {"disp": {"min_depth": 1e-3, "max_depth": max_depth,
                             "median_scaling": True}},
        "optimizer": {"name": "adam", "lr": rest_lr, "backbone_lr": backbone_lr,
                      "betas": [0.9, 0.999]},
        "scheduler": steps,
        "pose_network": {"pretrained": pretrained},
        "pose_lr": pose_lr,
        "photometric": {"scales": [0, 1, 2, 3], "ssim_weight": 0.85, "smoothness": 1e-3,
                        "automask": True},
    }
    crop_args = {} if crop is None else {"crop_height": crop[0], "crop_width": crop[1]}
    return {
        "seed_everything": 0,
        "trainer": {"default_root_dir": f"runs/{dataset}/{name}", **trainer},
        "model": {"class_path": "densemtl.training.SelfSupervisedDepthModule",
                  "init_args": init},
        "data": {"class_path": "densemtl.data.DenseDataModule", "init_args": {
            "dataset": dataset, "root": f"data/{dataset}" if dataset != "synthetic"
            else "data/synthetic_seq", "height": size[0], "width": size[1], **crop_args,
            "frames": [-1, 1], "label_fraction": {"disp": 0.0}, **data,
            **({"dataset_options": options} if options else {})}},
    }


def sde_configs() -> dict[Path, dict[str, Any]]:
    """Cityscapes (the paper's recipe; ImageNet weights: the paper starts from a Monodepth
    checkpoint that cannot be downloaded here) and the built-in sequences (CPU-sized)."""
    out = {}
    for method in ("densemtl", "mtl"):
        out[HERE / "cityscapes" / f"sde_{method}_sd.yaml"] = sde_config(
            "cityscapes", method, classes=16, size=(512, 1024), crop=(512, 512),
            pretrained=True, encoder="resnet101",
            decoder={**PAPER_DECODER, "scales": SDE_SCALES}, lr=(1e-5, 5e-5, 1e-6),
            steps={"name": "step", "step_size": 30000, "gamma": 0.1},
            data={"batch_size": 2, "num_workers": 4, "hflip": 0.5},
            options={"num_classes": 16}, max_depth=80.0,
            trainer={"accelerator": "auto", "devices": 1, "max_steps": 40000,
                     "val_check_interval": 2500, "check_val_every_n_epoch": None,
                     "log_every_n_steps": 50, "gradient_clip_val": 10.0})
        out[HERE / "synthetic" / f"sde_{method}_sd.yaml"] = sde_config(
            "synthetic", method, classes=10, size=(96, 128), crop=None, pretrained=False,
            encoder="resnet18", decoder={"num_ch_dec": [16, 32, 32, 64, 64],
                                         "scales": SDE_SCALES},
            lr=(1e-3, 1e-3, 1e-3), steps={"name": "poly", "power": 0.9},
            data={"batch_size": 4, "num_workers": 1, "hflip": 0.5,
                  "synthesize": {"train": 600, "val": 100, "height": 96, "width": 128,
                                 "seed": 0, "sequence": True}},
            options={}, max_depth=20.0,
            # from scratch, depth from video needs more steps than the supervised configs
            trainer={"accelerator": "cpu", "devices": 1, "max_steps": 1000,
                     "val_check_interval": 500, "check_val_every_n_epoch": None,
                     "log_every_n_steps": 20, "num_sanity_val_steps": 0,
                     "gradient_clip_val": 10.0})
    return out


def render(cfg: dict[str, Any], path: Path) -> str:
    rel = path.relative_to(HERE.parent)
    head = (f"# Generated by configs/make_configs.py; edit that file, not this one.\n"
            f"# densemtl fit --config {rel}\n")
    return head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100)


def all_configs() -> dict[Path, str]:
    configs = {**paper_configs(), **synthetic_configs(), **sde_configs()}
    return {p: render(c, p) for p, c in configs.items()}


def main() -> int:
    for path, text in all_configs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(all_configs())} configs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
