"""What a task declares (:class:`Task`, with the base classes of the loss and metric it
brings) and the registry of tasks.

A task is one object that answers every task-specific question the rest of densemtl asks: how
its label looks in a sample (key, dtype, channels, "no label" value), how labels are resized,
flipped, validated or derived from other labels, how many output channels the network needs and
how raw outputs become physical units, its loss and metric, the main metric and the direction of
every metric, how a prediction is coloured and saved, the best constant prediction, and the map
an adaptation discriminator sees. Nothing outside the task modules branches on task names.

To add a task, subclass :class:`Task` (with a :class:`TaskLoss` and a :class:`TaskMetric`) and
call :func:`densemtl.tasks.register_task` once; see the README ("Adding a task").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from ..errors import did_you_mean
from ..functional import fp32_context, resize_to, sample_mask

IGNORE_INDEX = 255
"""Semantic label value that is never supervised nor scored."""

LABEL_RESIZES = ("nearest", "max")


def nearest_index(n_out: int, n_in: int, device: torch.device) -> Tensor:
    """Source index whose pixel centre is nearest to each target pixel centre."""
    pos = (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out)
    return pos.floor().long().clamp_(0, n_in - 1)


# --- the loss and metric interfaces -----------------------------------------------------------

class TaskLoss(nn.Module):
    """Base of a task's loss: resizes the prediction, masks unsupervised samples, runs in fp32.

    ``forward(pred, target, has)``: raw head output of one scale [B,C,h,w], the label at label
    resolution, optional bool [B] flags of the samples that carry the label. Subclasses implement
    :meth:`compute` on a prediction that already has the label's size; it must return a 0-dim
    fp32 tensor, never read values on the host, and be an exact 0 (attached to the graph) when
    nothing is supervised.
    """

    def forward(self, pred: Tensor, target: Tensor, has: Tensor | None = None) -> Tensor:
        if pred.dim() != 4:
            raise ValueError(f"{type(self).__name__}: prediction must be [B,C,H,W], got "
                             f"{tuple(pred.shape)}")
        with fp32_context(pred.device):
            pred = resize_to(pred.float(), target.shape[-2:])
            mask = sample_mask(has, pred.shape[0], pred.device)
            return self.compute(pred, target, mask)

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """``mask`` is float [B,1,1]: 1 for supervised samples."""
        raise NotImplementedError


class TaskMetric(Metric):
    """Base of a task's metric (a torchmetrics ``Metric``: states reduce correctly under DDP).

    ``update(pred, target, has=None)``: ``pred`` is the **raw** head output of one scale
    [B,C,h,w], resized bilinearly (``align_corners=True``) to the label size and decoded with the
    task's ``decode``; with ``decoded=True`` it is already in physical units at the label size.
    ``compute()`` returns ``{name: 0-dim tensor}``.

    Subclasses declare ``task`` (the registry name), ``directions`` (every metric name ->
    higher is better; a name ``a/b`` inherits the direction of ``a``) and ``fractions`` (names
    reported as fractions in [0, 1]), and implement :meth:`_accumulate` without host syncs.
    """

    task: ClassVar[str]
    directions: ClassVar[Mapping[str, bool]] = {}
    fractions: ClassVar[frozenset[str]] = frozenset()
    # options that differ by evaluation stage unless the config sets them, e.g. a slow exact
    # protocol in ``test`` only: ``{"test": {"bsds": True}}``
    stage_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # the unit of each metric that is not a fraction or a plain ratio (reports print it)
    units: ClassVar[Mapping[str, str]] = {}
    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, decoded: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decoded = decoded

    @classmethod
    def build(cls, channels: int | None = None, **options: Any) -> TaskMetric:
        """Construct from the task's output channels (most metrics ignore them) and options."""
        return cls(**options)

    def configure(self, dataset_class: type | None) -> None:
        """Adopt dataset-dependent defaults for options the config left unset (a run calls this
        once at set-up with the evaluated dataset's class)."""

    def update(self, pred: Tensor, target: Tensor, has: Tensor | None = None) -> None:
        size = tuple(target.shape[-2:])
        with fp32_context(pred.device), torch.no_grad():
            if self.decoded:
                if tuple(pred.shape[-2:]) != size:
                    raise ValueError(f"{type(self).__name__}: decoded predictions must have the "
                                     f"label size {size}, got {tuple(pred.shape[-2:])}")
            else:
                if pred.dim() != 4:
                    raise ValueError(f"{type(self).__name__}: raw predictions must be [B,C,H,W], "
                                     f"got {tuple(pred.shape)}")
                self._check_raw(pred)
                pred = get_task(self.task).decode(resize_to(pred.float(), size))
            mask = sample_mask(has, target.shape[0], target.device).bool()
            self._accumulate(pred, target, mask)

    def _check_raw(self, pred: Tensor) -> None:
        """Shape checks on the raw prediction (metadata only)."""

    def _accumulate(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        """``pred`` in physical units at label size; ``mask`` bool [B,1,1]."""
        raise NotImplementedError

    @classmethod
    def direction(cls, name: str) -> bool:
        """Whether higher is better for metric ``name`` (``IoU/car`` inherits ``IoU``)."""
        root = name.split("/")[0]
        if root not in cls.directions:
            raise KeyError(f"{cls.__name__} has no metric '{name}'; it has "
                           f"{', '.join(cls.directions)}")
        return cls.directions[root]


# --- the task declaration ---------------------------------------------------------------------

class Task:
    """One dense prediction task. Subclass, set the class attributes, override what differs.

    Class attributes:
        name: registry name; the key in configs, model outputs, batches and metric names.
        short: one-letter code used in config file names (S, D, N, E).
        label_key: key of the label in the sample dict (default: ``name``).
        label_dtype / label_channels: the label tensor is ``label_dtype`` [C,H,W] with C =
            ``label_channels``, or [H,W] when ``label_channels`` is None.
        fill_value: the "no label" value (padding of crops, samples without the label).
        label_resize: ``"nearest"`` (the source pixel whose centre is nearest) or ``"max"``
            (the maximum over the source pixels a target pixel covers: thin structures survive).
        derived_from: keys of a sample a dataset can compute this label from when it has no file
            for it (see :meth:`derive`), e.g. normals from ``depth`` and ``K``.
        uses_classes: the label holds ids of the dataset's classes (so two datasets trained
            together must share their class set).
        shares_label: the task is scored against the label of the task that owns
            ``label_key`` (registered first) and has no label handling of its own: datasets read
            that task's label for it, and transforms and batches treat it as that task's.
        default_channels: output channels when the config gives none (None: required).
        loss / metric: the :class:`TaskLoss` and :class:`TaskMetric` classes.
        main_metric: the metric delta_m and model selection use.
    """

    name: ClassVar[str]
    short: ClassVar[str] = ""
    label_key: ClassVar[str] = ""
    label_dtype: ClassVar[torch.dtype] = torch.float32
    label_channels: ClassVar[int | None] = 1
    fill_value: ClassVar[float] = 0.0
    label_resize: ClassVar[str] = "nearest"
    derived_from: ClassVar[tuple[str, ...]] = ()
    uses_classes: ClassVar[bool] = False
    shares_label: ClassVar[bool] = False
    default_channels: ClassVar[int | None] = 1
    loss: ClassVar[type[TaskLoss]]
    metric: ClassVar[type[TaskMetric]]
    main_metric: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and not cls.__dict__.get("label_key"):
            cls.label_key = cls.name

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # --- network output ---------------------------------------------------------------------

    def channels(self, requested: int | None) -> int:
        """Number of output channels, checking ``requested`` against the task's needs."""
        if requested is None:
            if self.default_channels is None:
                raise ValueError(f"task '{self.name}' needs 'channels' (the number of classes)")
            return self.default_channels
        if requested < 1:
            raise ValueError(f"task '{self.name}': channels must be >= 1, got {requested}")
        return int(requested)

    def decode(self, raw: Tensor) -> Tensor:
        """Raw head output [B,C,H,W] -> the prediction in physical units."""
        raise NotImplementedError

    # --- training and evaluation ------------------------------------------------------------

    def build_loss(self, **options: Any) -> TaskLoss:
        return self.loss(**options)

    def build_metric(self, channels: int | None = None, **options: Any) -> TaskMetric:
        return self.metric.build(channels, **options)

    def higher_is_better(self, metric: str) -> bool:
        """Direction of one of this task's metrics (without the ``task/`` prefix)."""
        return self.metric.direction(metric)

    # --- labels in the data pipeline --------------------------------------------------------

    def label_shape(self, height: int, width: int) -> tuple[int, ...]:
        c = self.label_channels
        return (height, width) if c is None else (c, height, width)

    def empty_label(self, height: int, width: int) -> Tensor:
        """A label that marks every pixel as unlabelled."""
        return torch.full(self.label_shape(height, width), self.fill_value, dtype=self.label_dtype)

    def label_from_numpy(self, array: np.ndarray) -> Tensor:
        """A decoded label [H,W] or [H,W,C] -> the contract's tensor (dtype and layout)."""
        a = np.asarray(array)
        if self.label_channels is not None:
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        dtype = torch.empty((), dtype=self.label_dtype).numpy().dtype
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))

    def resize_label(self, label: Tensor, size: tuple[int, int]) -> Tensor:
        """Resize one label map to ``size`` (see ``label_resize``)."""
        if self.label_resize == "max":
            x = label[None] if label.dim() == 3 else label[None, None]
            out = F.adaptive_max_pool2d(x.float(), size).to(label.dtype)
            return out[0] if label.dim() == 3 else out[0, 0]
        rows = nearest_index(size[0], label.shape[-2], label.device)
        cols = nearest_index(size[1], label.shape[-1], label.device)
        return label.index_select(-2, rows).index_select(-1, cols)

    def hflip_label(self, label: Tensor) -> Tensor:
        """Mirror a label left-right (vector labels override this to flip their x component)."""
        return label.flip(-1)

    def check_label(self, label: Tensor, num_classes: int | None = None) -> str | None:
        """What is wrong with the values of a label, or None (shape and dtype are checked
        elsewhere)."""
        if label.is_floating_point() and not bool(torch.isfinite(label).all()):
            return f"'{self.label_key}' must be finite"
        return None

    def derive(self, sample: Mapping[str, Any]) -> Tensor:
        """The label computed from the keys in ``derived_from`` (after the transforms)."""
        raise NotImplementedError(f"task '{self.name}' cannot be derived from other labels")

    def random_label(self, batch: int, height: int, width: int, channels: int,
                     generator: torch.Generator) -> Tensor:
        """A batch of valid random labels [B, ...] (benchmarks and tests)."""
        raise NotImplementedError

    # --- outputs ----------------------------------------------------------------------------

    def to_array(self, value: Tensor) -> np.ndarray:
        """One decoded prediction (no batch axis) -> the array ``predict`` saves."""
        arr = value.detach().cpu().numpy()
        return arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr

    def colour_range(self, label: np.ndarray) -> Any:
        """What a prediction's colouring should borrow from its ground truth (None: nothing)."""
        return None

    def colourise(self, value: np.ndarray, palette: np.ndarray | None = None,
                  colour_range: Any = None) -> np.ndarray:
        """A label or decoded prediction (no batch axis) -> uint8 [H,W,3]."""
        raise NotImplementedError

    # --- the constant predictor (the "trivial" rows of test reports) ------------------------

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        """Sums over a batch of labels that add up over batches."""
        raise NotImplementedError

    def constant(self, stats: Tensor) -> Any:
        """The best input-independent prediction, in physical units."""
        raise NotImplementedError

    def describe_constant(self, value: Any, class_names: Sequence[str] | None = None) -> str:
        """The constant prediction in words, for reports."""
        return str(value)

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        """Raw head output [B,C,H,W] of the constant prediction (``shape`` = B, H, W)."""
        raise NotImplementedError

    # --- domain adaptation --------------------------------------------------------------------

    def domain_channels(self, channels: int) -> int:
        """Channels of the map a discriminator sees, for a head with ``channels`` outputs."""
        return channels

    def domain_context(self, source_batch: Mapping[str, Tensor]) -> Any:
        """What the domain maps of one iteration share, read from the source batch."""
        return None

    def domain_map(self, raw: Tensor, context: Any = None) -> Tensor:
        """The discriminator input from a raw prediction already at the image size (fp32)."""
        raise NotImplementedError(f"task '{self.name}' has no domain map for adaptation")


# --- the registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, Task] = {}
_BY_LABEL: dict[str, Task] = {}


def register_task(task: Task | type[Task], *, replace: bool = False) -> Task:
    """Make ``task`` (an instance or a class) known by its name; returns the instance.

    Its label key must not be another task's. ``replace=True`` swaps out a task of the same name.
    """
    task = task() if isinstance(task, type) else task
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    for attr in ("name", "loss", "metric", "main_metric"):
        if not hasattr(task, attr):
            raise TypeError(f"task {type(task).__name__} does not declare '{attr}'")
    for attr, base in (("loss", TaskLoss), ("metric", TaskMetric)):
        value = getattr(task, attr)
        if not (isinstance(value, type) and issubclass(value, base)):
            raise TypeError(f"task '{task.name}': {attr} must be a {base.__name__} subclass, "
                            f"got {value!r}")
    if task.label_resize not in LABEL_RESIZES:
        raise ValueError(f"task '{task.name}': label_resize must be one of {LABEL_RESIZES}")
    task.higher_is_better(task.main_metric)  # the main metric must have a direction
    old = _REGISTRY.get(task.name)
    if old is not None and not replace:
        raise ValueError(f"a task named '{task.name}' is already registered "
                         "(pass replace=True to replace it)")
    other = _BY_LABEL.get(task.label_key)
    if task.shares_label:
        if other is None or other.name == task.name:
            raise ValueError(f"task '{task.name}' shares the label '{task.label_key}', but no "
                             "task owning that label is registered")
    elif other is not None and other.name != task.name:
        raise ValueError(f"label key '{task.label_key}' already belongs to task '{other.name}'")
    if old is not None and not old.shares_label:
        del _BY_LABEL[old.label_key]
    _REGISTRY[task.name] = task
    if not task.shares_label:
        _BY_LABEL[task.label_key] = task
    return task


def unregister_task(name: str) -> None:
    """Forget the task ``name`` (tests that register temporary tasks use this)."""
    task = _REGISTRY.pop(name)
    if not task.shares_label:
        del _BY_LABEL[task.label_key]


def get_task(name: str) -> Task:
    """The registered task ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown task '{name}'{did_you_mean(str(name), _REGISTRY)}; known tasks: "
            f"{', '.join(_REGISTRY)} (a task of your own must be registered with register_task, "
            "e.g. in a module listed under 'imports:' in the config)") from None


def registered_tasks() -> dict[str, Task]:
    """Every registered task by name (a copy), built-in ones first."""
    return dict(_REGISTRY)


def task_for_label(key: str) -> Task | None:
    """The task whose label lives under ``key`` in a sample, if any."""
    return _BY_LABEL.get(key)


def parse_tasks(spec: Mapping[str, Any] | Iterable[str]) -> dict[str, int]:
    """Normalise a task specification to an ordered ``{task: out_channels}`` dict.

    Accepts a mapping ``{semseg: {channels: 16}, depth: {}, ...}`` (``null`` values allowed, or
    an int meaning channels) or a plain list of names. The order given is kept: it is the task
    order everywhere (heads, exchange-block sources, losses, reports).
    """
    items: Iterable[tuple[str, Any]]
    items = spec.items() if isinstance(spec, Mapping) else ((name, None) for name in spec)
    out: dict[str, int] = {}
    for name, opts in items:
        task = get_task(name)
        if name in out:
            raise ValueError(f"task '{name}' is listed twice")
        if isinstance(opts, Mapping):
            unknown = set(opts) - {"channels"}
            if unknown:
                raise ValueError(f"task '{name}': unknown option(s) {sorted(unknown)}")
            channels = opts.get("channels")
        else:
            channels = opts
        out[name] = task.channels(channels)
    if not out:
        raise ValueError("at least one task is required")
    return out
