"""Cross-task attention (xTAM) and the multi-task exchange block (mTEB) of DenseMTL.

For every ordered pair source -> target at a decoder stage with C channels:

    f_dir   = ReLU(conv3x3(f_source))                       Extractor
    sa      = conv3x3(f_dir) * sigmoid(conv3x3(f_dir))      SelfAttentionGate, C/2 channels
    sxtam   = alpha * up(softmax(Q K^T / sqrt(C)) V)        SpatialCrossTaskAttention
              Q from f_target (strided), K, V from f_dir (max-pooled)
    f_s->t  = CBR1x1([sa, sxtam, (cxtam)])                  proj

and per target: f~_t = f_t + CBR1x1(concat over sources of f_s->t)   (fusion "add").

``XTAM.run_pairs`` computes P pairs at once (``ExchangeBlock(batched=True)``); a single pair
(``XTAM.forward``, the pair loop ``batched=False``) is the same code with P = 1.
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


def _by_identity(tensors: Sequence[Tensor]) -> list[tuple[Tensor, list[int]]]:
    """The distinct tensor objects of ``tensors`` (first-seen order) with their positions."""
    groups: list[tuple[Tensor, list[int]]] = []
    for i, x in enumerate(tensors):
        for y, positions in groups:
            if y is x:
                positions.append(i)
                break
        else:
            groups.append((x, [i]))
    return groups


def stacked_conv(x: Tensor, convs: Sequence[nn.Conv2d]) -> Tensor:
    """Conv2d modules of the same kind (kernel, stride, padding) on the same input ``x``, as one
    convolution: their weights (and biases) concatenated, their outputs side by side."""
    if len(convs) == 1:
        return convs[0](x)
    c = convs[0]
    if c.padding_mode != "zeros" or c.groups != 1:
        raise ValueError("stacked_conv needs zero-padded, ungrouped convolutions")
    bias = None if c.bias is None else torch.cat([m.bias for m in convs])
    return F.conv2d(x, torch.cat([m.weight for m in convs]), bias, c.stride, c.padding,
                    c.dilation)


def stacked_conv_bn_relu(x: Tensor, blocks: Sequence[nn.Sequential]) -> list[Tensor]:
    """conv-BN-ReLU ``blocks`` (:func:`~densemtl.models.heads.conv_bn_relu`) on the same input:
    their convolutions as one (:func:`stacked_conv`), then each block's own BatchNorm and ReLU
    modules on its channels. Returns each block's output.

    Running the modules (not a functional copy of them) keeps their running statistics
    updated by themselves and keeps ``SyncBatchNorm.convert_sync_batchnorm`` effective.
    """
    y = stacked_conv(x, [b[0] for b in blocks])
    if len(blocks) == 1:
        return [blocks[0][2](blocks[0][1](y))]
    parts = y.split([b[1].num_features for b in blocks], dim=1)
    return [b[2](b[1](part)) for b, part in zip(blocks, parts)]


def attend(q: Tensor, k: Tensor, v: Tensor, impl: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(C)) v for each head: ``q`` [B,P,Nq,C], ``k``, ``v`` [B,P,Nk,C].

    ``sdpa`` uses ``scaled_dot_product_attention`` (memory linear in the number of positions
    with the fused kernels); ``explicit`` materialises the attention matrix exactly as the
    official code. The fused kernels (flash / memory-efficient, CPU and CUDA) need contiguous
    token-major inputs and silently fall back to the quadratic-memory math kernel otherwise.
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if impl == "explicit":
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
    raise ValueError(f"attention implementation '{impl}' is not one of {ATTENTION_IMPLS}")


def _tokens(maps: Sequence[Tensor]) -> Tensor:
    """[B,C,h,w] maps -> one contiguous token-major [B, len(maps), h*w, C] tensor."""
    return torch.stack([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


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
        return self.run([self], [target], [source])[0]

    @staticmethod
    def run(attns: Sequence[SpatialCrossTaskAttention], targets: Sequence[Tensor],
            sources: Sequence[Tensor]) -> list[Tensor]:
        """P attentions (built alike) at once, the i-th from ``sources[i]`` to ``targets[i]``.

        The query convolutions of the attentions reading the same target tensor are one
        convolution, and the P attentions are one attention call with P heads.
        """
        ds, (h, w) = attns[0].downsample, targets[0].shape[-2:]
        queries: list[Tensor] = list(targets)  # placeholders
        for target, idx in _by_identity(targets):
            small = target[..., ::ds, ::ds] if ds > 1 else target
            for i, q in zip(idx, stacked_conv_bn_relu(small, [attns[i].query for i in idx])):
                queries[i] = q
        keys, values = [], []
        for a, source in zip(attns, sources):
            small = F.max_pool2d(source, ds, ds, ceil_mode=True) if ds > 1 else source
            keys.append(a.key(small))
            values.append(a.value(small))
        out = attend(_tokens(queries), _tokens(keys), _tokens(values), attns[0].attention)
        outs = []
        for i, a in enumerate(attns):  # [B, Nq, C] -> [B, C, h, w] at the target's resolution
            y = out[:, i].transpose(1, 2).reshape(queries[i].shape)
            if ds > 1:
                y = F.interpolate(y, scale_factor=ds, mode="nearest")[..., :h, :w]
            outs.append(y if a.alpha is None else y * a.alpha)
        return outs


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


def _options(pair: XTAM) -> tuple:
    """What must agree between pairs computed together (it fixes every shape)."""
    sa, sx = pair.sa, pair.sxtam
    return (pair.extract[0].in_channels, pair.width, sa and sa.feat.out_channels,
            sx and (sx.downsample, sx.attention, sx.alpha is not None), pair.cxtam is not None)


class XTAM(nn.Module):
    """One ordered task pair source -> target: Extractor, SA, SxTAM, CxTAM, projection.

    ``split`` (our definition; the official option is broken): the pair works at half width
    C/2 (extractor C -> C/2, attention at C/2) and projects to C/2, halving its cost.

    ``forward`` is :meth:`run_pairs` with this pair alone.
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
        return self.run_pairs([self], [target], [source])[0]

    @staticmethod
    def run_pairs(pairs: Sequence[XTAM], targets: Sequence[Tensor],
                  sources: Sequence[Tensor]) -> list[Tensor]:
        """f_{s->t} of P pairs built alike, pair i from ``sources[i]`` to ``targets[i]``.

        Where pairs read the same input they share one operation: one extractor convolution
        per distinct source tensor (the weights of its pairs concatenated), one query
        convolution per distinct target tensor, and one attention call for all P pairs (pairs
        as heads). The rest (gate, key/value, projection, channel attention) runs pair by pair,
        with each pair's own modules. Pass the same tensor object for a shared input.
        """
        if len({_options(p) for p in pairs}) != 1:
            raise ValueError("run_pairs needs pairs built with the same options")
        first = pairs[0]
        f_dir: list[Tensor] = list(sources)  # placeholders
        for source, idx in _by_identity(sources):
            y = F.relu(stacked_conv(source, [pairs[i].extract[0] for i in idx]))
            for i, part in zip(idx, y.split(first.width, dim=1)):
                f_dir[i] = part
        parts: list[list[Tensor]] = [[] for _ in pairs]
        if first.sa is not None:
            for p, f, part in zip(pairs, f_dir, parts):
                part.append(p.sa(f))
        if first.sxtam is not None:
            sx = SpatialCrossTaskAttention.run([p.sxtam for p in pairs], targets, f_dir)
            for y, part in zip(sx, parts):
                part.append(y)
        if first.cxtam is not None:
            for p, t, f, part in zip(pairs, targets, f_dir, parts):
                part.append(p.cxtam(t, f))
        return [p.proj(torch.cat(part, dim=1) if len(part) > 1 else part[0])
                for p, part in zip(pairs, parts)]


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

    ``batched`` (default) computes all the pairs with one :meth:`XTAM.run_pairs` call: one
    extractor convolution per source, one query convolution per target, one attention call;
    ``batched=False`` calls each pair (``run_pairs`` of one pair). The same code, parameters and
    outputs (up to float rounding).

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
        keys = [(t, s) for t, sources in self.order.items() for s in sources]
        pairs = [self.pairs[t][s] for t, s in keys]
        targets, sources = [feats[t] for t, _ in keys], [feats[s] for _, s in keys]
        if self.batched:
            outs = XTAM.run_pairs(pairs, targets, sources)
        else:
            outs = [pair(t, s) for pair, t, s in zip(pairs, targets, sources)]
        return self._fuse(feats, dict(zip(keys, outs)))

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
