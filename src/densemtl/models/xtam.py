"""Cross-task attention (xTAM) and the multi-task exchange block (mTEB) of DenseMTL.

For every ordered pair source -> target at a decoder stage with C channels:

    f_dir   = ReLU(conv3x3(f_source))                       Extractor
    sa      = conv3x3(f_dir) * sigmoid(conv3x3(f_dir))      SelfAttentionGate, C/2 channels
    sxtam   = alpha * up(softmax(Q K^T / sqrt(C)) V)        SpatialCrossTaskAttention
              Q from f_target (strided), K, V from f_dir (max-pooled)
    f_s->t  = CBR1x1([sa, sxtam, (cxtam)])                  proj

and per target: f~_t = f_t + CBR1x1(concat over sources of f_s->t)   (fusion "add").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .heads import conv_bn_relu

ATTENTION_IMPLS = ("sdpa", "explicit")
FUSIONS = ("add", "prod", "concat")


def attend(q: Tensor, k: Tensor, v: Tensor, impl: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(C)) v over flattened positions.

    ``q`` [B,C,hq,wq]; ``k``, ``v`` [B,C,hk,wk]. Returns [B,C,hq,wq]. ``sdpa`` uses
    ``scaled_dot_product_attention`` (memory linear in the number of positions with the fused
    kernels); ``explicit`` materialises the attention matrix exactly as the official code.
    """
    b, c, hq, wq = q.shape
    # token-major and contiguous: the fused SDPA kernels (flash / memory-efficient, CPU and CUDA)
    # need a unit stride on the channel dimension and silently fall back to the quadratic-memory
    # math kernel otherwise
    qf = q.flatten(2).transpose(1, 2).contiguous()  # [B, Nq, C]
    kf = k.flatten(2).transpose(1, 2).contiguous()  # [B, Nk, C]
    vf = v.flatten(2).transpose(1, 2).contiguous()
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(qf.unsqueeze(1), kf.unsqueeze(1), vf.unsqueeze(1))
        out = out.squeeze(1)
    elif impl == "explicit":
        weights = torch.softmax(qf @ kf.transpose(1, 2) / math.sqrt(c), dim=-1)
        out = weights @ vf
    else:
        raise ValueError(f"attention implementation '{impl}' is not one of {ATTENTION_IMPLS}")
    return out.transpose(1, 2).reshape(b, c, hq, wq)


class SelfAttentionGate(nn.Module):
    """Spatial self-attention gate: conv3x3(x) * sigmoid(conv3x3(x)), no biases."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.feat = nn.Conv2d(cin, cout, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.feat(x) * torch.sigmoid(self.gate(x))


class SpatialCrossTaskAttention(nn.Module):
    """SxTAM: spatial attention with the query from the target and key/value from the source.

    The query is the target map subsampled with stride ``downsample`` (nearest), the keys and
    values the source map max-pooled by ``downsample``; each goes through 1x1 conv + BN + ReLU.
    The attended map is upsampled back (nearest, each value over a ds x ds block) and scaled by
    a per-channel ``alpha`` initialised to 0, so the branch starts as an exact zero.
    """

    def __init__(
        self,
        channels: int,
        downsample: int,
        alpha: bool = True,
        query_channels: int | None = None,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention '{attention}' is not one of {ATTENTION_IMPLS}")
        self.downsample = int(downsample)
        self.attention = attention
        self.query = conv_bn_relu(query_channels or channels, channels)
        self.key = conv_bn_relu(channels, channels)
        self.value = conv_bn_relu(channels, channels)
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1, 1)) if alpha else None

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        ds = self.downsample
        if ds > 1:
            target_small = target[..., ::ds, ::ds]
            source_small = F.max_pool2d(source, ds, ds, ceil_mode=True)
        else:
            target_small, source_small = target, source
        out = attend(self.query(target_small), self.key(source_small),
                     self.value(source_small), self.attention)
        if ds > 1:
            out = F.interpolate(out, scale_factor=ds, mode="nearest")
            out = out[..., : target.shape[-2], : target.shape[-1]]
        return out * self.alpha if self.alpha is not None else out


class ChannelCrossTaskAttention(nn.Module):
    """CxTAM: channel cross-task attention (the official class is missing; this is ours).

    Each target channel attends over the source channels. With the target map ``x`` [B,Ct,H,W]
    and the extracted source map ``y`` [B,Cs,H,W] flattened over the N = H*W positions,
    ``A = softmax(x y^T / sqrt(N))`` is a [B, Ct, Cs] affinity (softmax over source channels) and
    the output is ``beta * (A y)``, a [B, Ct, H, W] map made of source channels. ``beta`` is one
    scalar initialised to 0, so the branch starts as an exact zero (like SxTAM's alpha). It adds
    one parameter per pair and costs O(Ct Cs N).
    """

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        b, ct, h, w = target.shape
        x, y = target.flatten(2), source.flatten(2)
        weights = torch.softmax(x @ y.transpose(1, 2) / math.sqrt(h * w), dim=-1)  # [B,Ct,Cs]
        return self.beta * (weights @ y).view(b, ct, h, w)


class XTAM(nn.Module):
    """One ordered task pair source -> target: Extractor, SA, SxTAM, CxTAM, projection.

    ``split`` (our definition; the official option is broken): the pair works at half width
    C/2 (extractor C -> C/2, attention at C/2) and projects to C/2, halving its cost.
    """

    def __init__(
        self,
        channels: int,
        downsample: int,
        sa: bool = True,
        sxtam: bool = True,
        cxtam: bool = False,
        alpha: bool = True,
        full_sa: bool = False,
        split: bool = False,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if not (sa or sxtam or cxtam):
            raise ValueError("an xTAM needs at least one of sa, sxtam, cxtam")
        width = channels // 2 if split else channels
        self.width = width
        self.extract = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU())
        sa_out = width if full_sa else width // 2
        self.sa = SelfAttentionGate(width, sa_out) if sa else None
        self.sxtam = (SpatialCrossTaskAttention(width, downsample, alpha, channels, attention)
                      if sxtam else None)
        self.cxtam = ChannelCrossTaskAttention() if cxtam else None
        proj_in = (sa_out if sa else 0) + (width if sxtam else 0) + (channels if cxtam else 0)
        self.proj = conv_bn_relu(proj_in, width)

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        f_dir = self.extract(source)
        parts = []
        if self.sa is not None:
            parts.append(self.sa(f_dir))
        if self.sxtam is not None:
            parts.append(self.sxtam(target, f_dir))
        if self.cxtam is not None:
            parts.append(self.cxtam(target, f_dir))
        return self.proj(torch.cat(parts, dim=1))


def fused_conv_bn_relu(x: Tensor, blocks: Sequence[nn.Sequential]) -> Tensor:
    """Several conv + BN + ReLU blocks on the same input, as one convolution.

    The blocks' weights are concatenated along the output channels; batch normalisation is per
    channel, so normalising the concatenation is the same as normalising each block. In training
    mode each block's running statistics are updated exactly as its own BatchNorm would.
    """
    convs = [b[0] for b in blocks]
    bns: list[nn.BatchNorm2d] = [b[1] for b in blocks]
    y = F.conv2d(x, torch.cat([c.weight for c in convs]), None, convs[0].stride,
                 convs[0].padding, convs[0].dilation)
    bn = bns[0]
    mean = torch.cat([b.running_mean for b in bns]) if bn.track_running_stats else None
    var = torch.cat([b.running_var for b in bns]) if bn.track_running_stats else None
    training = bn.training or not bn.track_running_stats
    y = F.batch_norm(y, mean, var, torch.cat([b.weight for b in bns]),
                     torch.cat([b.bias for b in bns]), training, bn.momentum or 0.0, bn.eps)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            sizes = [b.num_features for b in bns]
            for b, m, v in zip(bns, mean.split(sizes), var.split(sizes)):
                b.running_mean.copy_(m)
                b.running_var.copy_(v)
                b.num_batches_tracked.add_(1)
    return F.relu(y)


def resolve_source_order(
    tasks: Sequence[str], overrides: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """Sources of each target in fusion order: config task order unless overridden."""
    order = {t: [s for s in tasks if s != t] for t in tasks}
    for target, sources in (overrides or {}).items():
        if target not in order:
            raise ValueError(f"source_order: '{target}' is not one of the tasks {list(tasks)}")
        if sorted(sources) != sorted(order[target]):
            raise ValueError(
                f"source_order for '{target}' must be a permutation of {order[target]}, "
                f"got {list(sources)}")
        order[target] = list(sources)
    return order


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalise with batch statistics but leave their running
    statistics and counters untouched (for the recomputation of a checkpointed forward)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class ExchangeBlock(nn.Module):
    """mTEB at one decoder stage: an xTAM per ordered pair, then per-target fusion.

    ``fusion``: ``add`` f_t + post(F_t) (the paper), ``prod`` f_t * post(F_t), ``concat``
    post([f_t, F_t]); F_t concatenates the directional features in ``source_order``.

    ``batched`` (default) computes the pairs together: one extractor convolution per source
    (all its targets' extractors concatenated), one query convolution per target, one
    key+value and one gate+feature convolution per pair, and the attention of every pair in a
    single ``scaled_dot_product_attention`` call. Same parameters and outputs as the loop over
    pairs (``batched=False``, the reference), up to float rounding.

    ``checkpoint`` recomputes the block in the backward pass instead of keeping its activations
    (the largest share of the model's training memory: extractor, gate, query/key/value and
    projection maps of every pair), for about a third more exchange-block compute. BatchNorm
    running statistics are updated once per step, as without it, so outputs and trained
    weights are the same.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        channels: int,
        downsample: int,
        fusion: str = "add",
        source_order: Mapping[str, Sequence[str]] | None = None,
        batched: bool = True,
        checkpoint: bool = False,
        **xtam: bool | str,
    ) -> None:
        super().__init__()
        self.batched, self.checkpoint = batched, checkpoint
        if len(tasks) < 2:
            raise ValueError("an exchange block needs at least two tasks")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion '{fusion}' is not one of {FUSIONS}")
        self.fusion = fusion
        self.order = resolve_source_order(tasks, source_order)
        self.pairs = nn.ModuleDict({
            t: nn.ModuleDict({s: XTAM(channels, downsample, **xtam) for s in tasks if s != t})
            for t in tasks})
        width = next(iter(self.pairs[tasks[0]].values())).width
        post_in = (len(tasks) - 1) * width + (channels if fusion == "concat" else 0)
        self.post = nn.ModuleDict({t: conv_bn_relu(post_in, channels) for t in tasks})

    def forward(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.checkpoint and torch.is_grad_enabled() and self.training:
            names = list(feats)

            def run(*tensors: Tensor) -> tuple[Tensor, ...]:
                out = self._forward(dict(zip(names, tensors)))
                return tuple(out[t] for t in names)

            outs = torch.utils.checkpoint.checkpoint(
                run, *(feats[t] for t in names), use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), frozen_bn_statistics(self)))
            return dict(zip(names, outs))
        return self._forward(feats)

    def _forward(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.batched:
            directional = self._directional_batched(feats)
        else:
            directional = {(t, s): self.pairs[t][s](feats[t], feats[s])
                           for t, sources in self.order.items() for s in sources}
        return self._fuse(feats, directional)

    def _fuse(self, feats: Mapping[str, Tensor],
              directional_by_pair: Mapping[tuple[str, str], Tensor]) -> dict[str, Tensor]:
        out = {}
        for t, sources in self.order.items():
            directional = [directional_by_pair[t, s] for s in sources]
            if self.fusion == "concat":
                out[t] = self.post[t](torch.cat([feats[t], *directional], dim=1))
            elif self.fusion == "prod":
                out[t] = feats[t] * self.post[t](torch.cat(directional, dim=1))
            else:
                out[t] = feats[t] + self.post[t](torch.cat(directional, dim=1))
        return out

    def _directional_batched(self, feats: Mapping[str, Tensor]) -> dict[tuple[str, str], Tensor]:
        """f_{s->t} for every pair, with the pairs' convolutions and attention batched."""
        pairs = [(t, s) for t, sources in self.order.items() for s in sources]
        # Extractors: one convolution per source for all its targets.
        f_dir: dict[tuple[str, str], Tensor] = {}
        for s in self.order:
            targets = [t for t, src in pairs if src == s]
            convs = [self.pairs[t][s].extract[0] for t in targets]
            y = F.relu(F.conv2d(feats[s], torch.cat([c.weight for c in convs]),
                                torch.cat([c.bias for c in convs]), padding=1))
            f_dir.update(zip(((t, s) for t in targets), y.split(convs[0].out_channels, 1)))
        parts: dict[tuple[str, str], list[Tensor]] = {p: [] for p in pairs}
        first = self.pairs[pairs[0][0]][pairs[0][1]]
        if first.sa is not None:
            for t, s in pairs:
                sa = self.pairs[t][s].sa
                both = F.conv2d(f_dir[t, s], torch.cat([sa.feat.weight, sa.gate.weight]),
                                padding=1)
                feat, gate = both.chunk(2, dim=1)
                parts[t, s].append(feat * torch.sigmoid(gate))
        if first.sxtam is not None:
            for pair, y in self._sxtam_batched(feats, f_dir, pairs).items():
                parts[pair].append(y)
        if first.cxtam is not None:
            for t, s in pairs:
                parts[t, s].append(self.pairs[t][s].cxtam(feats[t], f_dir[t, s]))
        return {(t, s): self.pairs[t][s].proj(torch.cat(parts[t, s], dim=1)) for t, s in pairs}

    def _sxtam_batched(self, feats: Mapping[str, Tensor], f_dir: Mapping[tuple[str, str], Tensor],
                       pairs: list[tuple[str, str]]) -> dict[tuple[str, str], Tensor]:
        first = self.pairs[pairs[0][0]][pairs[0][1]].sxtam
        ds, width = first.downsample, first.value[0].out_channels
        queries: dict[tuple[str, str], Tensor] = {}
        for t in self.order:  # one query convolution per target
            sources = [s for tt, s in pairs if tt == t]
            x = feats[t][..., ::ds, ::ds] if ds > 1 else feats[t]
            q = fused_conv_bn_relu(x, [self.pairs[t][s].sxtam.query for s in sources])
            queries.update(zip(((t, s) for s in sources), q.split(width, 1)))
        keys, values = [], []
        for t, s in pairs:  # key and value of a pair share their input
            sx = self.pairs[t][s].sxtam
            y = F.max_pool2d(f_dir[t, s], ds, ds, ceil_mode=True) if ds > 1 else f_dir[t, s]
            k, v = fused_conv_bn_relu(y, [sx.key, sx.value]).split(width, 1)
            keys.append(k)
            values.append(v)
        q = torch.stack([queries[p] for p in pairs], 1)  # [B, P, C, hq, wq]
        k, v = torch.stack(keys, 1), torch.stack(values, 1)
        b, n_pairs, c, hq, wq = q.shape
        # [B, P, N, C], contiguous (see attend(): the fused kernels need it)
        q, k, v = (x.flatten(3).transpose(2, 3).contiguous() for x in (q, k, v))
        if first.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            logits = q @ k.transpose(2, 3) / math.sqrt(c)
            out = torch.softmax(logits, dim=-1) @ v
        out = out.transpose(2, 3).reshape(b, n_pairs * c, hq, wq)
        h, w = feats[pairs[0][0]].shape[-2:]
        if ds > 1:
            out = F.interpolate(out, scale_factor=ds, mode="nearest")[..., :h, :w]
        if first.alpha is not None:
            out = out * torch.cat([self.pairs[t][s].sxtam.alpha for t, s in pairs], dim=1)
        return dict(zip(pairs, out.split(c, 1)))
