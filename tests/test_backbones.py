"""Backbones with any number of feature levels and strides (torchvision ResNets, timm)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import densemtl.models.densemtl as densemtl_module
from densemtl.losses import MultiTaskLoss
from densemtl.models import build_model
from densemtl.models.encoders import Encoder, build_encoder
from densemtl.models.heads import default_num_ch_dec

TASKS = {"semseg": {"channels": 5}, "depth": None, "normals": None}
SWIN = {"name": "timm:swin_tiny_patch4_window7_224", "pretrained": False,
        "options": {"img_size": [64, 96], "strict_img_size": False}}
PVT = {"name": "timm:pvt_v2_b0", "pretrained": False}


def model_with(encoder: dict[str, Any], num_ch_dec: list[int] | None, arch: str = "densemtl",
               **network: Any) -> nn.Module:
    decoder = {} if num_ch_dec is None else {"num_ch_dec": num_ch_dec}
    return build_model({"tasks": TASKS, "network": {"arch": arch, "encoder": encoder,
                                                    "decoder": decoder, **network}})


def random_batch(b: int, h: int, w: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    normals = torch.randn(b, 3, h, w, generator=g)
    return {"image": torch.rand(b, 3, h, w, generator=g),
            "semseg": torch.randint(0, 5, (b, h, w), generator=g),
            "depth": torch.rand(b, 1, h, w, generator=g) * 20 + 0.5,
            "normals": normals / normals.norm(dim=1, keepdim=True)}


def train_steps(model: nn.Module, steps: int, size: tuple[int, int] = (64, 96)) -> list[float]:
    """``steps`` Adam steps on one random batch; checks gradients; returns the losses."""
    model.train()
    loss_fn = MultiTaskLoss(list(TASKS))
    batch = random_batch(2, *size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(batch["image"]), batch)["total"]
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in grads.values())
        for part in ("encoder.", "decoders.", "exchange."):
            assert any(n.startswith(part) and g.abs().sum() > 0 for n, g in grads.items()), part
        opt.step()
    assert np.isfinite(losses).all()
    changed = {n.split(".")[0] for n, p in model.named_parameters()
               if not torch.equal(p.detach(), before[n])}
    assert {"encoder", "decoders", "exchange"} <= changed
    return losses


def check_predict(model: nn.Module, size: tuple[int, int]) -> None:
    pred = model.predict(torch.rand(2, 3, *size))
    assert pred["semseg"].shape == (2, *size) and pred["semseg"].dtype == torch.int64
    assert int(pred["semseg"].min()) >= 0 and int(pred["semseg"].max()) < 5
    assert pred["depth"].shape == (2, 1, *size) and (pred["depth"] >= 0).all()
    assert pred["normals"].shape == (2, 3, *size)
    assert torch.allclose(pred["normals"].norm(dim=1), torch.ones(2, *size), atol=1e-4)


def sxtam_downsample(model: nn.Module, stage: int) -> int:
    return model.exchange[str(stage)].pairs["semseg"]["depth"].sxtam.downsample


# --- encoders --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "channels"), [("resnet18", [64, 64, 128, 256, 512]),
                                                ("resnet50", [64, 256, 512, 1024, 2048])])
def test_torchvision_resnets_keep_their_layout(name, channels):
    enc = build_encoder(name, pretrained=False)  # dilated by default, as the paper
    assert enc.channels == channels and enc.reductions == enc.strides == [2, 4, 8, 16, 16]
    assert enc.name == name
    assert build_encoder(name, pretrained=False, dilated=False).reductions == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="timm encoders only"):
        build_encoder(name, pretrained=False, options={"img_size": 64})


@pytest.mark.parametrize(
    ("encoder", "channels", "reductions"),
    [({"name": "timm:convnext_tiny"}, [96, 192, 384, 768], [4, 8, 16, 32]),
     ({"name": "timm:convnext_atto", "dilated": True}, [40, 80, 160, 320], [4, 8, 16, 16]),
     ({"name": "timm:convnext_atto", "out_indices": [1, 2, 3]}, [80, 160, 320], [8, 16, 32]),
     (SWIN, [96, 192, 384, 768], [4, 8, 16, 32]),  # NHWC in timm
     ({"name": "timm:pvt_v2_b0"}, [32, 64, 160, 256], [4, 8, 16, 32])],
    ids=["convnext", "convnext_os16", "convnext_out_indices", "swin", "pvt_v2"],
)
def test_timm_encoders_expose_their_feature_info(encoder, channels, reductions):
    enc = build_encoder(**{"pretrained": False, **encoder}).eval()
    assert enc.channels == channels and enc.reductions == reductions
    with torch.no_grad():
        feats = enc(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (c, 64 // r, 96 // r) for c, r in zip(channels, reductions)]


def test_dilated_timm_model_without_output_stride_is_a_clear_error():
    with pytest.raises(ValueError, match=r"timm:pvt_v2_b0.*dilated"):
        build_encoder("timm:pvt_v2_b0", pretrained=False, dilated=True)


def test_default_decoder_widths_per_number_of_levels():
    assert default_num_ch_dec(5) == [64, 128, 128, 256, 256]  # the paper
    assert default_num_ch_dec(4) == [128, 128, 256, 256]
    assert default_num_ch_dec(3) == [128, 256, 256]
    assert default_num_ch_dec(6) == [64, 64, 128, 128, 256, 256]
    model = model_with(PVT, None)
    assert model.decoders["depth"].num_ch_dec == [128, 128, 256, 256]


def test_wrong_num_ch_dec_length_names_both_counts_and_the_encoder():
    with pytest.raises(ValueError, match=r"5 entries.*'timm:pvt_v2_b0' has 4 feature levels"):
        model_with(PVT, [8, 8, 16, 16, 32])
    with pytest.raises(ValueError, match=r"4 entries.*'resnet18' has 5 feature levels"):
        model_with({"name": "resnet18", "pretrained": False}, [8, 16, 16, 32])


# --- DenseMTL on other backbones -------------------------------------------------------------


def test_convnext_densemtl_trains_and_predicts_at_the_input_size():
    torch.manual_seed(0)
    model = model_with({"name": "timm:convnext_tiny", "pretrained": False}, [8, 16, 16, 32])
    # stage 1 = decoder level 1, at the stride of feature 0 (4): SxTAM attends at 8 -> ds 2
    assert sxtam_downsample(model, 1) == 2
    out = model.eval()(torch.rand(1, 3, 64, 96))
    assert out["depth"][0].shape[-2:] == (64, 96) and out["depth"][1].shape[-2:] == (16, 24)
    train_steps(model, 2)
    check_predict(model, (64, 96))


def test_flexible_size_transformer_trains():
    """pvt_v2 (any input size); its static and dynamic ONNX export is in test_export.py."""
    torch.manual_seed(0)
    model = model_with(PVT, [8, 8, 16, 16])
    train_steps(model, 1, (32, 64))
    check_predict(model, (64, 32))


@pytest.mark.slow
def test_swin_backbone_trains_and_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from densemtl.export import export_onnx

    torch.manual_seed(0)
    model = model_with(SWIN, [8, 8, 16, 16])  # NHWC features, fixed img_size
    train_steps(model, 1)
    names = export_onnx(model, tmp_path / "m.onnx", 64, 96, raw=True)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ref = model.eval()(x)
    for name, task, y in zip(names, TASKS, sess.run(None, {"image": x.numpy()})):
        # float32 noise of a different kernel implementation (see tests/test_export.py)
        np.testing.assert_allclose(y, ref[task][0].numpy(), atol=1e-4, rtol=1e-4, err_msg=name)


class OddStrides(Encoder):
    """A tiny encoder with strides 2, 6, 12: a x3 ratio between levels."""

    def __init__(self, **_: Any) -> None:
        super().__init__("imagenet")
        self.name = "odd"
        self.f0 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.f1 = nn.Conv2d(8, 16, 3, stride=3, padding=1)
        self.f2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.channels, self.reductions = [8, 16, 16], [2, 6, 12]

    def forward(self, image: Tensor) -> list[Tensor]:
        f0 = torch.relu(self.f0(self.normalise(image)))
        f1 = torch.relu(self.f1(f0))
        return [f0, f1, torch.relu(self.f2(f1))]


@pytest.mark.parametrize("case", ["os16_shared_last_stride", "x3_ratio", "vit_equal_strides"])
def test_irregular_strides(case, monkeypatch):
    torch.manual_seed(0)
    size = (72, 96) if case == "x3_ratio" else (32, 64)
    if case == "os16_shared_last_stride":  # strides 4, 8, 16, 16
        model = model_with({"name": "timm:convnext_atto", "pretrained": False, "dilated": True},
                           [8, 8, 16, 16], exchange={"stages": [2]})
        assert sxtam_downsample(model, 2) == 1  # level 2 is at stride 8
    elif case == "x3_ratio":
        monkeypatch.setattr(densemtl_module, "build_encoder", OddStrides)
        model = model_with({}, [8, 8, 16])
        assert sxtam_downsample(model, 1) == 4  # level 1 is at stride 2
    else:  # plain ViT: three levels, all at stride 16
        model = model_with({"name": "timm:vit_tiny_patch16_224", "pretrained": False,
                            "options": {"img_size": list(size)}}, [8, 16, 16])
        assert model.encoder.reductions == [16, 16, 16]
        assert sxtam_downsample(model, 1) == 1  # level 1 is at stride 16
    train_steps(model, 1, size)
    check_predict(model, size)


def test_baselines_use_the_deepest_feature():
    enc = PVT
    for arch in ("deeplab", "padnet", "mtl", "padnet_plus"):
        network = {"arch": arch, "encoder": enc}
        if arch in ("mtl", "padnet_plus"):
            network["decoder"] = {"num_ch_dec": [8, 8, 16, 16]}
        model = build_model({"tasks": TASKS, "network": network}).eval()
        with torch.no_grad():
            out = model(torch.rand(1, 3, 32, 64))
        assert out["depth"][0].shape == (1, 1, 32, 64), arch
    assert model.exchange["2"] is not None  # padnet_plus: distillation after level 2
