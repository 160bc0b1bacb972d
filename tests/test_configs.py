"""The shipped configs: generated, up to date, and valid for the CLI and the registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from densemtl.models import build_model, read_model_config
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


@pytest.mark.parametrize("path", sorted(GENERATED), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_parses_with_the_cli(path):
    cli = make_cli(["--config", str(path)], run=False, cli_class=ParseOnly)
    init = cli.config["model"]["init_args"]
    cfg = yaml.safe_load(path.read_text())["model"]["init_args"]
    assert list(init["tasks"]) == list(cfg["tasks"])
    assert cli.config["data"]["init_args"]["tasks"] == list(cfg["tasks"])
    assert cli.config["trainer"]["default_root_dir"].startswith("runs/")


@pytest.mark.parametrize("name", ["synthetic/densemtl_sdne", "synthetic/mtl_sd",
                                  "synthetic/padnet_plus_sdne", "synthetic/stl_edges"])
def test_synthetic_models_build(name):
    model = build_model(read_model_config(ROOT / f"configs/{name}.yaml"))
    assert not any(getattr(m, "pretrained", False) for m in model.modules())
