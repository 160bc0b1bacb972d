"""The shipped configs: generated, up to date, and valid for the CLI and the registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule

from densemtl.data import AdaptationDataModule, DenseDataModule
from densemtl.training import MultiTaskModule, SelfSupervisedDepthModule
from densemtl.training.cli import DenseCLI, make_cli

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_configs", ROOT / "configs/make_configs.py")
make_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_configs)
GENERATED = make_configs.all_configs()


class ParseOnly(DenseCLI):
    """Parse and validate a config without building anything (no weight downloads)."""

    def instantiate_classes(self) -> None:
        pass


def test_generated_configs_are_up_to_date():
    for path, text in GENERATED.items():
        assert path.is_file(), f"{path} missing: run python configs/make_configs.py"
        assert path.read_text() == text, f"{path} is stale: run python configs/make_configs.py"


def test_every_method_and_task_set_of_the_paper_exists():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in GENERATED}
    for dataset in ("cityscapes", "synthia", "vkitti2", "nyudv2"):
        for method in ("densemtl", "mtl", "padnet_plus"):
            assert {f"{dataset}/{method}_sd.yaml", f"{dataset}/{method}_sdn.yaml"} <= names
        for task in ("semseg", "depth", "normals"):
            assert f"{dataset}/stl_{task}.yaml" in names
    assert {"nyudv2/densemtl_sdne.yaml", "nyudv2/stl_edges.yaml"} <= names
    for dataset in ("cityscapes", "synthetic"):  # the semi-supervised depth setting
        assert {f"{dataset}/sde_densemtl_sd.yaml", f"{dataset}/sde_mtl_sd.yaml"} <= names


@pytest.mark.parametrize("path", sorted(GENERATED), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_parses_with_the_cli(path):
    cli = make_cli(["--config", str(path)], run=False, cli_class=ParseOnly)
    init = cli.config["model"]["init_args"]
    cfg = yaml.safe_load(path.read_text())["model"]["init_args"]
    assert list(init["tasks"]) == list(cfg["tasks"])
    assert cli.config["data"]["init_args"]["tasks"] == list(cfg["tasks"])
    assert cli.config["trainer"]["default_root_dir"].startswith("runs/")


# parameters of the official DenseMTL (ResNet-101, random initialisation), from its own code
OFFICIAL_PARAMETERS = {("densemtl", ("semseg", "depth"), 16): 87_399_458,
                       ("densemtl", ("semseg", "depth", "normals"), 16): 111_006_952,
                       ("densemtl", ("semseg", "depth", "normals", "edges"), 40): 135_391_516}


@pytest.mark.parametrize("path", sorted(GENERATED), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_instantiates_model_and_data(path, tmp_path, monkeypatch):
    """Every shipped config builds its LightningModule, data module and trainer (parameters on
    the meta device: no memory, no data on disk; ImageNet weights off: no network)."""
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["init_args"]["network"]["encoder"]["pretrained"] = False
    if "pose_network" in cfg["model"]["init_args"]:  # the self-supervised depth setting
        cfg["model"]["init_args"]["pose_network"]["pretrained"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with torch.device("meta"):
        cli = make_cli(["--config", "config.yaml"], run=False)
    model, data = cli.model, cli.datamodule
    tasks = tuple(cfg["model"]["init_args"]["tasks"])
    assert isinstance(model, MultiTaskModule) and isinstance(data, LightningDataModule)
    assert type(data) is (AdaptationDataModule if "source" in cfg["data"]["init_args"]
                          else DenseDataModule)
    assert tuple(model.net.tasks) == tasks and tuple(data.tasks) == tasks
    assert model.criterion.tasks == list(tasks) and list(model.val_metrics.metrics) == list(tasks)
    arch = cfg["model"]["init_args"]["network"]["arch"]
    classes = model.net.tasks.get("semseg")
    expected = OFFICIAL_PARAMETERS.get((arch, tasks, classes))
    is_paper = cfg["model"]["init_args"]["network"]["encoder"]["name"] == "resnet101"
    if expected is not None and is_paper:
        assert sum(p.numel() for p in model.net.parameters()) == expected
    assert cli.trainer.max_steps == cfg["trainer"]["max_steps"]
    if "pose_network" in cfg["model"]["init_args"]:  # SDE: depth from video, no depth labels
        assert isinstance(model, SelfSupervisedDepthModule) and model.depth_task == "disp"
        assert data.frames == [-1, 1] and data.label_fraction == {"disp": 0.0}
        assert model.photometric.scales == [0, 1, 2, 3]
