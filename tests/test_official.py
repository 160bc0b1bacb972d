"""Official-checkpoint import, checkpoints, and the summary command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densemtl import load_model
from densemtl.cli import main as cli
from densemtl.models import build_model, read_model_config
from densemtl.models.official import ConversionError, convert_official, map_official_key

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "SD": ROOT / "configs/synthia/densemtl_sd.yaml",
    "SDN": ROOT / "configs/synthia/densemtl_sdn.yaml",
    "SDNE": ROOT / "configs/nyudv2/densemtl_sdne.yaml",
}


def official_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the official key names and shapes (aliases shared)."""
    listing = json.loads((ROOT / f"tests/data/official_keys_{name}_resnet101.json").read_text())
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in listing.items():
        if key.startswith("params."):
            continue
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        else:
            state[key] = torch.randn(shape, generator=g)
    for key in listing:  # params.<t>.0.* aliases heads.<t>.*, params.<t>.1.* aliases m.<t>.*
        if key.startswith("params."):
            _, task, which, rest = key.split(".", 3)
            state[key] = state[f"{'heads' if which == '0' else 'm'}.{task}.{rest}"]
    assert set(state) == set(listing)
    return state


@pytest.mark.parametrize("name", ["SD", "SDN", "SDNE"])
def test_official_listing_converts_with_no_missing_or_unexpected_keys(name):
    official = official_state(name)
    model = convert_official(read_model_config(CONFIGS[name]), official)
    ours = model.state_dict()
    pairs = {
        "backbone.encoder.layer4.2.conv3.weight": "encoder.layer4.2.conv3.weight",
        "heads.semseg.decoder.0.convs.4.1.weight": "decoders.semseg.up.4.convs.4.1.weight",
        "heads.depth.decoder.11.block.0.conv.bias": "decoders.depth.merge.1.conv.bias",
        "heads.semseg.decoder.14.weight": "decoders.semseg.side.0.weight",
        "heads.semseg.decoder.15.weight": "decoders.semseg.side.1.weight",
        "m.depth.1.SxTAM_semseg.conv_c.1.running_var":
            "exchange.1.pairs.depth.semseg.sxtam.key.1.running_var",
        "m.semseg.1.SA_depth.attention.0.weight": "exchange.1.pairs.semseg.depth.sa.gate.weight",
        "m.semseg.1.post.0.weight": "exchange.1.post.semseg.0.weight",
    }
    for off_key, our_key in pairs.items():
        assert torch.equal(ours[our_key], official[off_key]), off_key
    n_unique = len([k for k in official if not k.startswith("params.")])
    assert len(ours) == n_unique


def test_conversion_errors_list_missing_unexpected_and_misshaped_keys():
    official = official_state("SD")
    del official["heads.depth.decoder.13.block.0.conv.weight"]
    official["m.semseg.1.CxTAM_depth.beta"] = torch.zeros(())
    official["heads.semseg.decoder.14.weight"] = torch.zeros(19, 64, 1, 1)
    with pytest.raises(ConversionError) as info:
        convert_official(read_model_config(CONFIGS["SD"]), official)
    msg = str(info.value)
    assert "missing" in msg and "decoders.depth.merge.0.conv.weight" in msg
    assert "unexpected" in msg and "m.semseg.1.CxTAM_depth.beta" in msg
    assert "mis-shaped" in msg and "official (19, 64, 1, 1), ours (16, 64, 1, 1)" in msg


def test_side_convs_follow_active_scales_order():
    assert map_official_key("heads.depth.decoder.14.weight", ["depth"], [1, 0]) == \
        "decoders.depth.side.1.weight"
    assert map_official_key("heads.depth.decoder.15.bias", ["depth"], [0, 1]) == \
        "decoders.depth.side.1.bias"
    assert map_official_key("params.depth.0.decoder.15.bias", ["depth"], [0, 1]) == ""
    assert map_official_key("m.depth.1.SA_colour.conv.weight", ["depth", "semseg"], [0]) is None


def test_convert_cli_with_source_order_and_load_model(tmp_path, capsys):
    official = official_state("SDN")
    pkl = tmp_path / "sy_densemtl_SDN.pkl"
    torch.save(official, pkl)
    out = tmp_path / "converted.ckpt"
    code = cli(["convert-official", "--config", str(CONFIGS["SDN"]), "--official", str(pkl),
                "--out", str(out), "--source-order", "semseg=normals,depth",
                "--source-order", "normals=depth,semseg"])
    assert code == 0 and "111,006,952 parameters" in capsys.readouterr().out
    model = load_model(out)
    assert not model.training
    order = model.exchange["1"].order
    assert order == {"semseg": ["normals", "depth"], "depth": ["semseg", "normals"],
                     "normals": ["depth", "semseg"]}
    assert model.config["network"]["exchange"]["attention"] == "explicit"
    assert model.config["network"]["decoder"]["fused_upsample"] is False
    assert torch.equal(model.state_dict()["exchange.1.post.semseg.0.weight"],
                       official["m.semseg.1.post.0.weight"])
    # a bad order names the target and the expected sources
    code = cli(["convert-official", "--config", str(CONFIGS["SDN"]), "--official", str(pkl),
                "--out", str(tmp_path / "x.ckpt"), "--source-order", "semseg=depth"])
    assert code == 1 and "permutation of ['depth', 'normals']" in capsys.readouterr().out
    assert not (tmp_path / "x.ckpt").exists()


def test_convert_cli_reports_missing_file(tmp_path, capsys):
    code = cli(["convert-official", "--config", str(CONFIGS["SD"]), "--official",
                str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "o.ckpt")])
    assert code == 1 and "nope.pkl" in capsys.readouterr().out


def test_load_model_rejects_foreign_files(tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a densemtl checkpoint"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_model(tmp_path / "missing.ckpt")


def test_save_and_load_roundtrip(tmp_path):
    from densemtl import save_model

    model = build_model({"tasks": {"depth": None, "normals": None},
                         "network": {"arch": "padnet_plus",
                                     "encoder": {"name": "resnet18", "pretrained": False},
                                     "decoder": {"num_ch_dec": [8, 16, 16, 32, 32]}}}).eval()
    save_model(model, tmp_path / "m.ckpt")
    again = load_model(tmp_path / "m.ckpt")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["depth"][0], again(x)["depth"][0])


@pytest.mark.parametrize(
    ("name", "count"), [("SD", 87_399_458), ("SDN", 111_006_952), ("SDNE", 135_391_516)])
def test_summary_ends_with_the_official_parameter_count(name, count, capsys):
    assert cli(["summary", "--config", str(CONFIGS[name])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"parameters: {count}"
    assert any(line.strip().startswith("exchange") for line in lines)
