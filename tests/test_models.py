"""Encoders, decoders, DenseMTL, xTAM / mTEB switches and baselines."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from densemtl.models import build_model
from densemtl.models.densemtl import DenseMTL
from densemtl.models.encoders import PretrainedWeightsError, build_encoder
from densemtl.models.heads import PooledBatchNorm2d
from densemtl.models.xtam import XTAM, ExchangeBlock, SpatialCrossTaskAttention, attend
from densemtl.tasks import depth_to_inverse

from model_utils import (
    SLIM,
    TASKS_SD,
    TASKS_SDN,
    TASKS_SDNE,
    randomise_,
    same_outputs,
    scalar_loss,
    tiny,
)


def assert_gradients(model: nn.Module, zero: tuple[str, ...] = ()) -> None:
    """Every parameter has a finite gradient; those whose name contains one of ``zero`` must be
    exactly zero, every other one must have a non-zero entry (an all-zero gradient fails)."""
    nonfinite, dead, leaking = [], [], []
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if not torch.isfinite(p.grad).all():
            nonfinite.append(name)
        expect_zero = any(z in name for z in zero)
        if expect_zero and torch.count_nonzero(p.grad) > 0:
            leaking.append(name)
        elif not expect_zero and torch.count_nonzero(p.grad) == 0:
            dead.append(name)
    assert (nonfinite, dead, leaking) == ([], [], [])


# At initialisation alpha = 0: SxTAM's output is an exact zero and its query, key and value
# projections get exactly no gradient (alpha itself does).
SXTAM_PROJECTIONS = (".sxtam.query.", ".sxtam.key.", ".sxtam.value.")


# --- encoders --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dilated", "channels", "strides"),
    [
        ("resnet18", True, [64, 64, 128, 256, 512], [2, 4, 8, 16, 16]),
        ("resnet18", False, [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
        ("resnet34", True, [64, 64, 128, 256, 512], [2, 4, 8, 16, 16]),
        ("resnet50", True, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 16]),
        ("resnet50", False, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    ],
)
def test_encoder_features_match_metadata(name, dilated, channels, strides):
    enc = build_encoder(name, pretrained=False, dilated=dilated).eval()
    assert enc.channels == channels and enc.strides == strides
    with torch.no_grad():
        feats = enc(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == channels
    assert [(f.shape[2], f.shape[3]) for f in feats] == [(64 // s, 96 // s) for s in strides]


def test_dilated_basicblock_keeps_pretrained_layout():
    """The dilated ResNet-18 has exactly torchvision's parameters (pretrained weights fit)."""
    enc = build_encoder("resnet18", pretrained=False, dilated=True)
    ref = {k: v.shape for k, v in tvm.resnet18().state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in enc.state_dict().items()} == ref
    assert enc.layer4[0].conv1.dilation == (1, 1) and enc.layer4[0].conv2.dilation == (2, 2)
    assert enc.layer4[1].conv1.dilation == (2, 2) and enc.layer4[0].conv1.stride == (1, 1)


def test_input_normalisation_options():
    x = torch.full((1, 3, 2, 2), 0.9)
    paper = build_encoder("resnet18", pretrained=False)
    imnet = build_encoder("resnet18", pretrained=False, normalisation="imagenet")
    assert torch.allclose(paper.normalise(x), torch.full_like(x, (0.9 - 0.45) / 0.225))
    assert torch.allclose(imnet.normalise(x)[0, :, 0, 0],
                          torch.tensor([(0.9 - 0.485) / 0.229, (0.9 - 0.456) / 0.224,
                                        (0.9 - 0.406) / 0.225]))
    with pytest.raises(ValueError, match="normalisation"):
        build_encoder("resnet18", pretrained=False, normalisation="nope")


def test_pretrained_download_failure_is_clear(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError, match="pretrained: false"):
        build_encoder("resnet18", pretrained=True)


# --- DenseMTL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tasks", "channels"),
    [(TASKS_SD, {"semseg": 5, "depth": 1}),
     (TASKS_SDN, {"semseg": 5, "depth": 1, "normals": 3}),
     (TASKS_SDNE, {"semseg": 5, "depth": 1, "normals": 3, "edges": 2})],
    ids=["SD", "SDN", "SDNE"],
)
def test_output_shapes(tasks, channels):
    model = tiny(tasks).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 128))
    assert list(out) == list(channels)
    for t, c in channels.items():
        assert sorted(out[t]) == [0, 1]
        assert out[t][0].shape == (2, c, 64, 128)
        assert out[t][1].shape == (2, c, 32, 64)
        assert all(torch.isfinite(y).all() and y.std() > 0 for y in out[t].values())


def test_sdn_resnet18_paper_decoders_forward_backward():
    model = build_model({"tasks": {"semseg": {"channels": 16}, "depth": None, "normals": None},
                         "network": {"arch": "densemtl",
                                     "encoder": {"name": "resnet18", "pretrained": False}}})
    out = model(torch.rand(2, 3, 64, 128))
    scalar_loss(out).backward()
    assert out["normals"][0].shape == (2, 3, 64, 128)
    assert_gradients(model, zero=SXTAM_PROJECTIONS)


def test_resnet101_sd_eval_128x256():
    model = build_model({"tasks": {"semseg": {"channels": 16}, "depth": None},
                         "network": {"arch": "densemtl",
                                     "encoder": {"name": "resnet101", "pretrained": False}}})
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 128, 256))
    assert out["semseg"][0].shape == (1, 16, 128, 256) and out["depth"][1].shape == (1, 1, 64, 128)
    assert all(torch.isfinite(y).all() for t in out.values() for y in t.values())


def test_any_input_size():
    """Sizes that are not multiples of 16 give full-resolution outputs (official code fails)."""
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 70, 90))
    assert out["semseg"][0].shape[-2:] == (70, 90)
    assert out["depth"][1].shape[-2:] == (35, 45)
    assert all(torch.isfinite(y).all() for t in out.values() for y in t.values())


def test_attend_sdpa_matches_explicit():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 24, 16, requires_grad=True)  # [B, heads, tokens, C]
    k = torch.randn(2, 3, 15, 16, requires_grad=True)
    v = torch.randn(2, 3, 15, 16, requires_grad=True)
    a = attend(q, k, v, "sdpa")
    grads_a = torch.autograd.grad(a.square().sum(), (q, k, v))
    b = attend(q, k, v, "explicit")
    grads_b = torch.autograd.grad(b.square().sum(), (q, k, v))
    # explicit reference by hand for one query token of one head
    w = torch.softmax(k[0, 2] @ q[0, 2, 7] / 4.0, dim=0)
    assert torch.allclose(b[0, 2, 7], w @ v[0, 2], atol=1e-6)
    assert torch.allclose(a, b, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        assert ga.abs().sum() > 0
        assert torch.allclose(ga, gb, atol=1e-5)


def test_model_sdpa_path_equals_explicit_path_with_gradients():
    # attn_stride 2: no max-pooling before the attention, whose argmax among ReLU-zero ties
    # would flip with float rounding (see test_batched_pairs_equal_the_pair_loop)
    torch.manual_seed(0)
    fast = randomise_(tiny(exchange={"attention": "sdpa", "attn_stride": 2}))
    ref = tiny(exchange={"attention": "explicit", "attn_stride": 2})
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)  # same dropout masks in both passes
    out_fast = fast(x)
    torch.manual_seed(1)
    out_ref = ref(x)
    for t in out_ref:
        for s in out_ref[t]:
            assert torch.allclose(out_fast[t][s], out_ref[t][s], atol=1e-5)
    scalar_loss(out_fast).backward()
    scalar_loss(out_ref).backward()
    assert_gradients(ref)  # randomised gates: every gradient flows
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name].grad, atol=1e-5), name


@pytest.mark.parametrize("batched", [True, False])
def test_sdpa_training_keeps_no_attention_matrix(batched):
    """The SDPA path must hit a fused kernel: nothing of size tokens x tokens is saved for
    backward (a non-contiguous input silently selects the quadratic math kernel)."""
    tokens = (128 // 4) ** 2  # attention at 1/attn_stride of the input

    def square_shapes(impl: str) -> list[tuple[int, ...]]:
        model = tiny(exchange={"attention": impl, "batched": batched, "attn_stride": 4}).train()
        found = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() >= 2 and t.shape[-2:] == (tokens, tokens):
                found.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.rand(2, 3, 128, 128))
        return found

    assert square_shapes("explicit"), "the reference path should materialise the matrix"
    assert square_shapes("sdpa") == []


def test_checkpointed_exchange_equals_plain_and_saves_less():
    torch.manual_seed(0)
    plain = randomise_(tiny(exchange={"attn_stride": 4})).train()
    ckpt = tiny(exchange={"attn_stride": 4, "checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    saved = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        sizes = []

        def pack(t: torch.Tensor, sizes=sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        torch.manual_seed(1)  # same dropout masks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        saved[name] = (out, sum(sizes))
        scalar_loss(out).backward()
    (out_p, n_plain), (out_c, n_ckpt) = saved["plain"], saved["ckpt"]
    for t in out_p:
        for s in out_p[t]:
            torch.testing.assert_close(out_c[t][s], out_p[t][s])
    assert_gradients(plain)  # randomised alphas: every gradient flows
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # running statistics updated once, as without recomputation
    ref_buffers = dict(plain.named_buffers())
    for name, b in ckpt.named_buffers():
        assert torch.equal(b, ref_buffers[name]), name
    assert n_ckpt < 0.9 * n_plain  # slim decoders: the exchange block is ~15% of the total


def test_sxtam_alone_with_zero_alpha_is_dead_and_warned():
    """SxTAM only + alpha 0: the whole exchange block gets exactly no gradient (found in the
    study): its output is f_t + post(0) with every ReLU at 0. Everything else trains."""
    with pytest.warns(UserWarning, match="never trains"):
        dead = tiny(exchange={"sa": False}).train()
    x = torch.rand(2, 3, 64, 64)
    scalar_loss(dead(x)).backward()
    assert_gradients(dead, zero=("exchange.",))
    live = tiny(exchange={"sa": False, "alpha": False}).train()
    scalar_loss(live(x)).backward()
    assert_gradients(live)


def test_alpha_zero_makes_sxtam_exactly_zero():
    torch.manual_seed(0)
    sx = SpatialCrossTaskAttention(16, 4)
    t, s = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)
    assert torch.equal(sx(t, s), torch.zeros(2, 16, 16, 16))
    with torch.no_grad():
        sx.alpha.fill_(1.0)
    assert sx(t, s).abs().sum() > 0
    # In a whole model: at init the output does not depend on the SxTAM projections.
    model = tiny().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["semseg"][0]
        for name, p in model.named_parameters():
            if ".sxtam.query." in name or ".sxtam.key." in name:
                p.mul_(-3.0)
        after = model(x)["semseg"][0]
    assert torch.equal(before, after)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = tiny(TASKS_SDNE, exchange={"cxtam": True})
    scalar_loss(model(torch.rand(2, 3, 64, 64))).backward()
    # At initialisation (alpha = beta = 0) exactly the SxTAM projections get no gradient; the
    # gates themselves do, so they open.
    assert len([n for n, _ in model.named_parameters() if n.endswith("alpha")]) == 12
    assert_gradients(model, zero=SXTAM_PROJECTIONS)
    # With non-zero gates every single parameter gets a non-zero gradient.
    model.zero_grad()
    randomise_(model)
    scalar_loss(model(torch.rand(2, 3, 64, 64))).backward()
    assert_gradients(model)


_ORDER_SCRIPT = textwrap.dedent("""
    import torch
    from densemtl.models import build_model
    torch.manual_seed(0)
    m = build_model({"tasks": {"semseg": {"channels": 3}, "depth": None, "normals": None,
                               "edges": None},
                     "network": {"arch": "densemtl",
                                 "encoder": {"name": "resnet18", "pretrained": False},
                                 "decoder": {"num_ch_dec": [8, 16, 16, 32, 32]}}}).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("alpha"):
                p.fill_(0.7)
        out = m(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    print(m.exchange["1"].order)
    print(repr(sum(float(y.double().sum()) for t in out.values() for y in t.values())))
""")


def test_fusion_order_is_deterministic_across_processes():
    results = set()
    for seed in ("0", "1", "2"):
        proc = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT], capture_output=True,
                              text=True, env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"},
                              check=True)
        results.add(proc.stdout)
    assert len(results) == 1
    order_line = results.pop().splitlines()[0]
    assert order_line.startswith("{'semseg': ['depth', 'normals', 'edges'], 'depth': ['semseg'")


def test_source_order_override_equals_permuted_fusion_weights():
    torch.manual_seed(0)
    base = randomise_(tiny()).eval()
    swapped = tiny(exchange={"source_order": {"semseg": ["normals", "depth"]}}).eval()
    state = copy.deepcopy(base.state_dict())
    w = state["exchange.1.post.semseg.0.weight"]  # input blocks [depth | normals]
    c = w.shape[1] // 2
    state["exchange.1.post.semseg.0.weight"] = torch.cat([w[:, c:], w[:, :c]], dim=1)
    swapped.load_state_dict(state)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = base(x), swapped(x)
    assert torch.allclose(a["semseg"][0], b["semseg"][0], atol=1e-6)
    with pytest.raises(ValueError, match="permutation"):
        tiny(exchange={"source_order": {"semseg": ["depth"]}})


ABLATIONS = {
    "paper": {},
    "sa_only": {"sxtam": False},
    "sxtam_only": {"sa": False},
    "cxtam_only": {"sa": False, "sxtam": False, "cxtam": True},
    "all_three": {"cxtam": True},
    "concat": {"fusion": "concat"},
    "prod": {"fusion": "prod"},
    "no_alpha": {"alpha": False},
    "full_sa": {"full_sa": True},
    "split": {"split": True},
    "split_full_sa_cxtam": {"split": True, "full_sa": True, "cxtam": True},
    "explicit": {"attention": "explicit"},
    "stage_2": {"stages": [2]},
    "stage_3": {"stages": [3]},
    "stage_4": {"stages": [4]},
    "stage_0": {"stages": [0]},
    "stages_2_1": {"stages": [2, 1]},
    "attn_stride_4": {"attn_stride": 4},
}


# Parameters with exactly zero gradient at initialisation (alpha = beta = 0). With a single
# zero-initialised branch (SxTAM or CxTAM alone) the projection sees a constant 0, its ReLU
# sits at 0 and the whole exchange block is dead; only SxTAM alone is warned about.
DEAD_AT_INIT = {"sa_only": (), "no_alpha": (), "sxtam_only": ("exchange.",),
                "cxtam_only": ("exchange.",)}


@pytest.mark.parametrize(("name", "switches"), ABLATIONS.items(), ids=ABLATIONS.keys())
def test_ablation_switches_build_and_run(name, switches):
    torch.manual_seed(0)
    model = tiny(exchange=switches)
    opts = {**DenseMTL.default_exchange, **switches}
    stages = opts["stages"]
    assert sorted(model.exchange, reverse=True) == [str(s) for s in sorted(stages, reverse=True)]
    for stage in stages:  # the switches reach every pair
        block = model.exchange[str(stage)]
        channels = SLIM[stage]
        width = channels // 2 if opts["split"] else channels
        assert block.fusion == opts["fusion"]
        for pair in (p for sources in block.pairs.values() for p in sources.values()):
            assert (pair.sa is not None, pair.sxtam is not None, pair.cxtam is not None) == (
                opts["sa"], opts["sxtam"], opts["cxtam"])
            assert pair.width == width and pair.extract[0].in_channels == channels
            if pair.sa is not None:
                assert pair.sa.feat.out_channels == (width if opts["full_sa"] else width // 2)
            if pair.sxtam is not None:
                assert pair.sxtam.attention == opts["attention"]
                assert pair.sxtam.downsample == max(1, opts["attn_stride"] // 2**stage)
                assert (pair.sxtam.alpha is not None) == opts["alpha"]
    out = model(torch.rand(2, 3, 64, 64))
    assert out["depth"][0].shape == (2, 1, 64, 64) and out["depth"][1].shape == (2, 1, 32, 32)
    scalar_loss(out).backward()
    assert_gradients(model, zero=DEAD_AT_INIT.get(name, SXTAM_PROJECTIONS))


def test_stage_0_exchange_feeds_the_final_prediction():
    torch.manual_seed(0)
    model = randomise_(tiny(exchange={"stages": [0]})).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["semseg"][0]
        for p in model.exchange.parameters():
            p.mul_(1.5)
        after = model(x)["semseg"][0]
    assert not torch.allclose(before, after)


def test_no_exchange_switch_means_hard_sharing():
    model = tiny(exchange={"sa": False, "sxtam": False})
    mtl = tiny(arch="mtl")
    assert len(model.exchange) == 0 and model.sections == [[4, 3, 2, 1, 0]]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in mtl.parameters())


def test_predict_returns_physical_units():
    model = tiny(TASKS_SDNE)
    with torch.no_grad():
        side = model.decoders["depth"].side["0"]
        side.weight.zero_()
        side.bias.fill_(float(depth_to_inverse(torch.tensor(5.0))))
    model.train()
    pred = model.predict(torch.rand(2, 3, 64, 64))
    assert model.training  # restored
    assert pred["semseg"].shape == (2, 64, 64) and pred["semseg"].dtype == torch.int64
    assert torch.allclose(pred["depth"], torch.full((2, 1, 64, 64), 5.0), atol=1e-4)
    assert torch.allclose(pred["normals"].norm(dim=1), torch.ones(2, 64, 64), atol=1e-5)
    assert pred["edges"].shape == (2, 1, 64, 64)
    assert ((pred["edges"] >= 0) & (pred["edges"] <= 1)).all()
    single = model.predict(torch.rand(3, 64, 64))
    assert single["depth"].shape == (1, 64, 64)


def test_batch_one_training_keeps_eval_outputs():
    """One image per batch: the ASPP pooling BatchNorm (one value per channel) trains with its
    running statistics, so in training it outputs exactly its eval output and its statistics
    stay untouched. The other BatchNorms (many positions per channel) do update theirs, so the
    model's eval output changes, and only by them."""
    torch.manual_seed(0)
    model = randomise_(tiny())
    x = torch.rand(1, 3, 64, 64)
    pooled = {n: m for n, m in model.named_modules() if isinstance(m, PooledBatchNorm2d)}
    assert len(pooled) == 3  # one ASPP per task
    model.eval()
    with torch.no_grad():
        ref = model(x)
    before = {n: b.clone() for n, b in model.named_buffers()}
    seen = {}
    hooks = [m.register_forward_hook(
        lambda mod, args, out, n=n: seen.__setitem__(n, (args[0].detach(), out.detach())))
        for n, m in pooled.items()]
    model.train()
    scalar_loss(model(x)).backward()  # the official ASPP raises here
    for h in hooks:
        h.remove()
    assert_gradients(model)  # randomised gates: every gradient, the pooled BNs' included
    for n, m in pooled.items():
        inp, out = seen[n]
        assert inp.shape[0] * inp.shape[2] * inp.shape[3] == 1
        with torch.no_grad():
            assert torch.equal(m.eval()(inp), out), n  # training output == eval output
    changed = {n for n, b in model.named_buffers() if not torch.equal(b, before[n])}
    assert not {n for n in changed if n.rsplit(".", 1)[0] in pooled}
    assert any(n.startswith("encoder.") for n in changed)  # a real training step
    model.eval()
    with torch.no_grad():
        after = model(x)
        assert (after["semseg"][0] - ref["semseg"][0]).abs().max() > 1e-3
        model.load_state_dict({n: before[n] for n in changed}, strict=False)
        restored = model(x)
    for t in ref:
        for s in ref[t]:
            assert torch.equal(restored[t][s], ref[t][s]), (t, s)
    # eval mode is plain BatchNorm: same output as an nn.BatchNorm2d with the same state
    bn = next(iter(pooled.values()))
    plain = nn.BatchNorm2d(bn.num_features).eval()
    plain.load_state_dict(bn.state_dict())
    z = torch.randn(2, bn.num_features, 1, 1)
    assert torch.equal(bn.eval()(z), plain(z))


# --- baselines and registry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "network", "scales"),
    [
        ("mtl", {}, [0, 1]),
        ("deeplab", {}, [0]),
        ("padnet", {"width": 64}, [0, 4]),
        ("padnet_plus", {}, [0, 1]),
    ],
)
def test_baselines_build_and_run(arch, network, scales):
    torch.manual_seed(0)
    model = tiny(TASKS_SDN, arch=arch, **network)
    out = model(torch.rand(2, 3, 64, 64))
    assert list(out) == ["semseg", "depth", "normals"]
    for t, per_scale in out.items():
        assert sorted(per_scale) == scales
        assert per_scale[0].shape == (2, model.tasks[t], 64, 64)
    scalar_loss(out).backward()
    assert_gradients(model)


def test_padnet_plus_distils_after_level_2():
    model = tiny(TASKS_SD, arch="padnet_plus")
    assert model.sections == [[4, 3, 2], [1, 0]]
    gate = model.exchange["2"].pairs["semseg"]["depth"]
    assert gate.feat.in_channels == SLIM[2] and gate.feat.out_channels == SLIM[2]


def test_stl_variants():
    deeplab = tiny({"depth": None}, arch="stl")
    padnet = tiny({"depth": None}, arch="stl", head="padnet+", decoder={"num_ch_dec": SLIM})
    assert type(deeplab).__name__ == "DeepLabMTL" and type(padnet).__name__ == "HardSharing"
    with pytest.raises(ValueError, match="exactly one task"):
        tiny(TASKS_SD, arch="stl")


def test_stl_deeplab_resnet101_parameter_count():
    model = build_model({"tasks": {"semseg": {"channels": 16}},
                         "network": {"arch": "stl", "encoder": {"pretrained": False}}})
    assert sum(p.numel() for p in model.parameters()) == 58_629_712
    assert sum(p.numel() for p in model.heads.parameters()) == 16_129_552


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"tasks": TASKS_SD, "network": {"arch": "nope"}}, "network.arch 'nope'"),
        ({"tasks": {"colour": None}, "network": {"arch": "mtl"}}, "unknown task 'colour'"),
        ({"tasks": {"semseg": None}, "network": {"arch": "mtl"}}, "needs 'channels'"),
        ({"tasks": TASKS_SD, "network": {"arch": "densemtl", "exchange": {"gate": 1}}},
         "unknown exchange option"),
        ({"tasks": TASKS_SD, "network": {"arch": "densemtl", "exchange": {"fusion": "mul"}}},
         "fusion 'mul'"),
        ({"tasks": TASKS_SD, "network": {"arch": "mtl", "wings": 2}}, "wings"),
    ],
)
def test_registry_rejects_bad_configs(config, message):
    config = copy.deepcopy(config)
    config["network"].setdefault("encoder", {"name": "resnet18", "pretrained": False})
    with pytest.raises(ValueError, match=message):
        build_model(config)


@pytest.mark.parametrize("size", [(64, 96), (70, 90)])
@pytest.mark.parametrize("arch", ["densemtl", "mtl"])
def test_fused_upsample_path_equals_reference_path(size, arch):
    """conv(up2(x)) at low resolution == upsampling then conv: outputs, and gradients.

    Gradients are compared on hard sharing: in DenseMTL they also pass the exchange block's
    max-pooling, whose argmax among near-equal (ReLU-zero) values flips with float rounding and
    routes a few gradients elsewhere -- a discontinuity of max-pooling, not of the fused path.
    """
    torch.manual_seed(0)
    fast = randomise_(tiny(arch=arch, decoder={"num_ch_dec": SLIM}))
    ref = tiny(arch=arch, decoder={"num_ch_dec": SLIM, "fused_upsample": False})
    ref.load_state_dict(fast.state_dict())
    out_fast, out_ref = same_outputs(fast, ref, torch.rand(2, 3, *size))
    if arch != "mtl":
        return
    scalar_loss(out_fast).backward()
    scalar_loss(out_ref).backward()
    assert_gradients(ref)
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4), name


BATCHED_SWITCHES = {
    "paper": {},
    "sxtam_only": {"sa": False},
    "cxtam_split": {"cxtam": True, "split": True},
    "explicit_concat": {"attention": "explicit", "fusion": "concat"},
    "prod_full_sa_no_alpha_order": {"fusion": "prod", "full_sa": True, "alpha": False,
                                    "source_order": {"semseg": ["edges", "normals", "depth"]}},
    "checkpoint": {"checkpoint": True},
}


@pytest.mark.parametrize("switches", BATCHED_SWITCHES.values(), ids=BATCHED_SWITCHES.keys())
@pytest.mark.parametrize("stride", [8, 2], ids=["downsample4", "downsample1"])
def test_batched_pairs_equal_the_pair_loop(switches, stride):
    """``batched`` (all pairs in one ``XTAM.run_pairs``) == the loop over pairs, in a training
    step: outputs, the gradient of every parameter, BatchNorm running statistics and counters.

    Compared in float64. In float32 the two paths round differently, and with downsample > 1
    the max-pooling before key/value picks among near-equal values and the extractor's ReLU cuts
    near 0: a rounding difference there reroutes a few gradients of everything upstream of
    the extractor (encoder, decoders, extractors). In float64 that would need values within
    ~1e-15 of each other, so every gradient is compared, tightly. The float32 eval-mode outputs
    are compared too.
    """
    torch.manual_seed(0)
    exchange = {**switches, "attn_stride": stride}
    fast = randomise_(tiny(TASKS_SDNE, exchange={**exchange, "batched": True}))
    ref = tiny(TASKS_SDNE, exchange={**exchange, "batched": False})
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        same_outputs(fast.eval(), ref.eval(), x)
    fast, ref = fast.double().train(), ref.double().train()
    out_fast, out_ref = same_outputs(fast, ref, x.double(), atol=1e-12, rtol=1e-9)
    scalar_loss(out_fast).backward()
    scalar_loss(out_ref).backward()
    # Every gradient flows (randomised gates), so equal gradients are not equal zeros. Not
    # checked for SxTAM alone: where the extracted map is positive in every pooling window, a
    # shift of the extractor's bias is removed by the key/value BatchNorm (its gradient is 0).
    if switches.get("sa", True):
        assert_gradients(ref)
    ref_params, ref_buffers = dict(ref.named_parameters()), dict(ref.named_buffers())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-9, atol=1e-12,
                                   msg=name)
    for name, b in fast.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], rtol=1e-9, atol=1e-14, msg=name)
    for name, m in fast.named_modules():  # each pair BatchNorm ran exactly once
        if name.startswith("exchange.") and isinstance(m, nn.BatchNorm2d):
            assert m.num_batches_tracked == 1, name


def test_run_pairs_equals_each_pair_and_shares_only_identical_inputs():
    """``XTAM.run_pairs`` of several pairs == each pair's ``forward``; the extractor and query
    convolutions are shared exactly when the same tensor object is passed."""
    torch.manual_seed(0)
    pairs = [randomise_(XTAM(16, 2, cxtam=True)).train() for _ in range(3)]
    ref = copy.deepcopy(pairs)
    a, b = torch.randn(2, 16, 10, 12), torch.randn(2, 16, 10, 12)
    targets, sources = [a, a, b.clone()], [b, b.clone(), a]  # pairs 0 and 1 share the target
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: calls.append(mod) if isinstance(mod, nn.Conv2d) else None)
    try:
        outs = XTAM.run_pairs(pairs, targets, sources)
    finally:
        hook.remove()
    for out, pair, t, s in zip(outs, ref, targets, sources):
        torch.testing.assert_close(out, pair(t, s), rtol=1e-5, atol=1e-6)
    for p, r in zip(pairs, ref):
        for (name, buf), ref_buf in zip(p.named_buffers(), r.buffers()):
            torch.testing.assert_close(buf, ref_buf, msg=name)
    # sources b, b.clone(), a are three tensors: no extractor is shared, each runs as a module;
    # the two queries of target a are one functional convolution, the query of b a module call
    assert sum(m is p.extract[0] for m in calls for p in pairs) == 3
    assert [p.sxtam.query[0] in calls for p in pairs] == [False, False, True]
    with pytest.raises(ValueError, match="built with the same options"):
        XTAM.run_pairs([pairs[0], XTAM(16, 2)], [a, a], [b, b])


@pytest.mark.parametrize("batched", [True, False])
def test_sync_batchnorm_conversion_reaches_every_batchnorm(batched):
    """After ``SyncBatchNorm.convert_sync_batchnorm`` both paths run every converted module,
    once per forward, and compute what the unconverted block computes (train and eval).

    Without a process group (this CPU test) SyncBatchNorm normalises locally like BatchNorm:
    the test shows that all normalisation goes through the modules a multi-GPU run would
    synchronise, not the synchronisation itself.
    """
    torch.manual_seed(0)
    tasks = ["semseg", "depth", "normals"]
    plain = randomise_(ExchangeBlock(tasks, 16, 2, batched=batched))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    norms = {n: m for n, m in synced.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    # 6 pairs x (query, key, value, proj) + 3 post
    assert len(norms) == 27 and not any(
        isinstance(m, nn.BatchNorm2d) for m in synced.modules())
    calls = dict.fromkeys(norms, 0)
    for n, m in norms.items():
        m.register_forward_hook(lambda mod, args, out, n=n: calls.__setitem__(n, calls[n] + 1))
    feats = {t: torch.randn(2, 16, 12, 12, requires_grad=True) for t in tasks}
    for step, training in enumerate([True, False], start=1):
        plain.train(training)
        synced.train(training)
        out_p, out_s = plain(feats), synced(feats)
        assert set(calls.values()) == {step}
        for t in tasks:
            torch.testing.assert_close(out_s[t], out_p[t], rtol=1e-5, atol=1e-6)
        if training:
            scalar_loss({"x": out_p}).backward()
            scalar_loss({"x": out_s}).backward()
            grads = dict(plain.named_parameters())
            for name, p in synced.named_parameters():
                assert torch.count_nonzero(p.grad) > 0, name
                torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6,
                                           msg=name)
    buffers = dict(plain.named_buffers())
    for name, b in synced.named_buffers():
        torch.testing.assert_close(b, buffers[name], msg=name)
