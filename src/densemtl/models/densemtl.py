"""DenseMTL: shared encoder -> per-task padnet+ decoders -> mTEB -> rest of the decoders."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..images import ImageLike, as_image_batch, upsample_decode, working_size
from ..tasks import get_task
from .encoders import build_encoder
from .heads import TaskDecoder, resolve_num_ch_dec
from .xtam import ExchangeBlock

Outputs = dict[str, dict[int, Tensor]]


def decoder_sections(stages: Sequence[int], levels: int = 5) -> list[list[int]]:
    """Split the decoder levels L-1..0 after each stage: [1] -> [[4, 3, 2, 1], [0]] (L = 5)."""
    stages = sorted({int(s) for s in stages}, reverse=True)
    if any(s not in range(levels) for s in stages):
        raise ValueError(f"exchange stages must be decoder levels in 0..{levels - 1}, got {stages}")
    sections, current = [], []
    for level in range(levels - 1, -1, -1):
        current.append(level)
        if level in stages:
            sections.append(current)
            current = []
    if current:
        sections.append(current)
    return sections


def level_strides(reductions: Sequence[int]) -> list[int]:
    """Stride of each decoder level's output: level 0 at the image (1), level i > 0 at the
    resolution of encoder feature i-1."""
    return [1, *(int(r) for r in reductions[:-1])]


class SharedFeatures(NamedTuple):
    """The shared trunk's outputs (``outputs``, on the trunk's graph) and the detached copies
    the task branches consumed (``inputs``)."""

    outputs: list[Tensor]
    inputs: list[Tensor]


class MultiTaskNet(nn.Module):
    """Base of every model: task list, shared encoder, ``predict`` in physical units."""

    encoder: nn.Module

    def __init__(self, tasks: Mapping[str, int]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.config: dict[str, Any] = {}  # set by the registry; saved with checkpoints
        self.class_names: list[str] | None = None  # dataset metadata, kept by checkpoints
        self.palette: Any = None
        self.input_size: tuple[int, int] | None = None  # the training resolution (H, W)

    def shared_module(self) -> nn.Module:
        """The trunk every task's output depends on (the encoder). Gradient-aggregating
        weightings balance the task gradients of its parameters, taken at its outputs; a model
        whose shared trunk is not ``encoder`` overrides this."""
        return self.encoder

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trained parameters of :meth:`shared_module`."""
        return [p for p in self.shared_module().parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        """Every other trained parameter (decoders, exchange blocks, heads)."""
        shared = {id(p) for p in self.shared_module().parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in shared]

    def forward_with_features(self, image: Tensor) -> tuple[Outputs, SharedFeatures]:
        """``forward(image)`` with the task branches cut from the trunk: the outputs of
        :meth:`shared_module` are handed on as detached leaves, so one backward per task stops
        at them and one (batched) backward from them reaches the trunk's parameters."""
        kept: list[tuple[Tensor, Tensor]] = []

        def cut(_module: nn.Module, _args: Any, output: Any) -> Any:
            def leaf(t: Tensor) -> Tensor:
                if not (isinstance(t, Tensor) and t.requires_grad):
                    return t
                kept.append((t, t.detach().requires_grad_()))
                return kept[-1][1]

            if isinstance(output, Tensor):
                return leaf(output)
            if isinstance(output, dict):
                return {k: leaf(v) for k, v in output.items()}
            return type(output)(leaf(t) for t in output)

        handle = self.shared_module().register_forward_hook(cut)
        try:
            out = self(image)
        finally:
            handle.remove()
        return out, SharedFeatures([o for o, _ in kept], [x for _, x in kept])

    @property
    def max_stride(self) -> int:
        """The largest feature stride of the encoder (1 if it does not say)."""
        reductions = getattr(getattr(self, "encoder", None), "reductions", None)
        return int(max(reductions)) if reductions else 1

    @property
    def min_input_side(self) -> int:
        """The shortest image side ``predict`` runs the network at: two pixels at the stride of
        the encoder's second-deepest features (the decoders pad their maps by reflection, which
        needs at least two pixels; the deepest features may be a single pixel)."""
        reductions = sorted(getattr(getattr(self, "encoder", None), "reductions", None) or [1])
        return 2 * int(reductions[-2] if len(reductions) > 1 else reductions[-1])

    @torch.no_grad()
    def predict(self, image: ImageLike, *, size: tuple[int, int] | None = None,
                max_side: int | None = None) -> dict[str, Tensor]:
        """Eval-mode prediction at scale 0 in physical units, at the input's size.

        ``image``: a file path, a PIL image, a numpy array [H,W(,C)] or a tensor [3,H,W] /
        [B,3,H,W] (see :func:`densemtl.images.as_image_batch`; a float tensor must be in
        [0, 1]). The network runs at ``size`` (H, W) if given, else with the longer side capped
        at ``max_side``, else at the training resolution kept in the checkpoint
        (``input_size``: the same number of pixels, aspect ratio kept, never enlarged), and
        never below ``min_input_side``; each task's output is resized back to the input size
        and decoded: ``semseg`` class ids [B,H,W], ``depth`` metres [B,1,H,W], ``normals`` unit
        vectors [B,3,H,W], ``edges`` probabilities [B,1,H,W] (for the tasks the model has).
        Without a batch axis in the input, none in the outputs.
        """
        x, single = as_image_batch(image)
        param = next(self.parameters(), None)
        x = x.to(param.device if param is not None else "cpu")
        h, w = (int(v) for v in x.shape[-2:])
        work = working_size((h, w), exact=size, max_side=max_side, area_of=self.input_size,
                            minimum=self.min_input_side)
        if work != (h, w):
            x = F.interpolate(x, size=work, mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        was_training = self.training
        # On a CPU the exchange block's pairs run one at a time here: the same outputs with
        # about a third less peak memory (the pair loop is as fast as batching on a CPU).
        blocks = [m for m in self.modules() if isinstance(m, ExchangeBlock) and m.batched]
        pairwise = x.device.type == "cpu"
        self.eval()
        try:
            for block in blocks:
                block.batched = not pairwise
            out = self(x)
        finally:
            for block in blocks:
                block.batched = True
            self.train(was_training)
        pred = {t: upsample_decode(get_task(t), out[t][0].float(), (h, w)) for t in self.tasks}
        return {t: p[0] for t, p in pred.items()} if single else pred


class DenseMTL(MultiTaskNet):
    """The paper's model, with every ablation as a switch.

    encoder -> decoder section 1 (levels L-1..1) -> mTEB at ``stages`` -> section 2 (level 0).
    ``forward(image)`` returns raw head outputs ``{task: {scale: tensor}}``, scale s being
    decoder level s: with the defaults scale 1 (before the exchange; H/2 for the ResNets) and
    scale 0 (H, after it). Depth is the official parametrisation 65536 / (100 D + 1); use
    ``predict`` for physical units.

    Args:
        tasks: ordered ``{task: output channels}``; the order fixes the fusion order.
        encoder: ``build_encoder`` options (name, pretrained, dilated, normalisation,
            out_indices, options); any number L of feature levels.
        decoder: ``TaskDecoder`` options (num_ch_dec with L entries, scales, aspp, ...);
            ``scales`` may also be a mapping ``{task: scales}`` (a task not named keeps the
            default), e.g. a depth head learned from video at four scales next to a
            segmentation head at two.
        exchange: ``stages`` (decoder levels in 0..L-1 after which an mTEB runs),
            ``attn_stride`` (the stride at which SxTAM attends, 8 as the paper: its downsample
            is attn_stride / the stride of that level's output, at least 1), ``fusion``,
            ``source_order``
            ({target: [sources...]}) and the xTAM switches ``sa``, ``sxtam``, ``cxtam``,
            ``alpha``, ``full_sa``, ``split``, ``attention`` ("sdpa" or "explicit"), and
            ``batched`` (compute the task pairs together; ``false`` loops, as the official code),
            ``checkpoint`` (recompute the block in backward: much less training memory).
    """

    default_exchange: ClassVar[dict[str, Any]] = {
        "stages": [1], "attn_stride": 8, "fusion": "add", "source_order": None,
        "sa": True, "sxtam": True, "cxtam": False, "alpha": True, "full_sa": False,
        "split": False, "attention": "sdpa", "batched": True, "checkpoint": False,
    }

    def __init__(
        self,
        tasks: Mapping[str, int],
        encoder: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        exchange: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks)
        self.encoder = build_encoder(**(encoder or {}))
        enc = list(self.encoder.channels)
        levels = len(enc)
        decoder = dict(decoder or {})
        decoder["num_ch_dec"] = resolve_num_ch_dec(
            decoder.get("num_ch_dec"), levels, f"encoder '{self.encoder.name}'")
        scales = decoder.pop("scales", None)
        if isinstance(scales, Mapping):
            unknown = set(scales) - set(self.tasks)
            if unknown:
                raise ValueError(f"decoder scales name task(s) {sorted(unknown)} that the model "
                                 f"does not have ({list(self.tasks)})")
        per_task = {t: (scales.get(t) if isinstance(scales, Mapping) else scales)
                    for t in self.tasks}
        self.decoders = nn.ModuleDict(
            {t: TaskDecoder(enc, ch, **decoder,
                            **({} if per_task[t] is None else {"scales": per_task[t]}))
             for t, ch in self.tasks.items()})
        opts = {**self.default_exchange, **(exchange or {})}
        unknown = set(opts) - set(self.default_exchange)
        if unknown:
            raise ValueError(f"unknown exchange option(s): {sorted(unknown)}")
        stages = opts.pop("stages")
        if opts["sxtam"] and opts["alpha"] and not (opts["sa"] or opts["cxtam"]) and stages:
            warnings.warn(
                "exchange: SxTAM alone with alpha initialised to 0 never trains: the projection's "
                "BatchNorm sees a constant 0 input, its ReLU sits at 0, and no gradient reaches "
                "alpha or the attention (the same holds for the official code). Set "
                "exchange.alpha: false, or keep sa: true.", stacklevel=2)
        if len(self.tasks) < 2 or not (opts["sa"] or opts["sxtam"] or opts["cxtam"]):
            stages = []  # nothing to exchange: plain hard sharing (the official "no_distil")
        attn_stride = int(opts.pop("attn_stride"))
        self.sections = decoder_sections(stages, levels)
        self.stages = sorted(set(stages), reverse=True)
        num_ch_dec = decoder["num_ch_dec"]
        # SxTAM attends at stride ``attn_stride``; level s's output is at stride strides[s].
        strides = level_strides(self.encoder.reductions)
        self.exchange = nn.ModuleDict({
            str(s): self.build_exchange(num_ch_dec[s], max(1, attn_stride // strides[s]), opts)
            for s in self.stages})

    def build_exchange(self, channels: int, downsample: int, opts: dict[str, Any]) -> nn.Module:
        """The block inserted after a stage (PAD-Net+ overrides this)."""
        return ExchangeBlock(list(self.tasks), channels, downsample, **opts)

    def forward(self, image: Tensor) -> Outputs:
        feats = self.encoder(image)
        size = (image.shape[-2], image.shape[-1])
        x: dict[str, Tensor | None] = dict.fromkeys(self.tasks)
        out: Outputs = {t: {} for t in self.tasks}
        for section in self.sections:
            last = section[-1]
            exchange_here = str(last) in self.exchange
            # An exchange after level 0 must come before the final prediction.
            defer = 0 if exchange_here and last == 0 else None
            for t, dec in self.decoders.items():
                x[t], side = dec.run(feats, x[t], section, size, defer_side=defer)
                out[t].update(side)
            if exchange_here:
                x = dict(self.exchange[str(last)](x))
                if defer == 0:
                    for t, dec in self.decoders.items():
                        if "0" in dec.side:
                            out[t][0] = dec.side["0"](x[t])
        return out


class HardSharing(DenseMTL):
    """MTL baseline: same encoder and padnet+ decoders, no exchange (one section 4..0)."""

    def __init__(
        self,
        tasks: Mapping[str, int],
        encoder: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks, encoder, decoder, exchange={"stages": []})
