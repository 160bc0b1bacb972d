"""The two kinds of multi-task weighting: loss scalarisations and gradient aggregations.

Every method sees the task losses already multiplied by the fixed per-task weights of the loss
(``loss.weights``, the paper's balance of units) as one vector ``values`` in task order.

* A :class:`LossScalarisation` turns ``values`` into one scalar that is back-propagated as usual
  (fixed weights, uncertainty weighting, DWA, FAMO, geometric mean).
* A :class:`GradientAggregation` takes the gradient of every entry of ``values`` with respect to
  the parameters shared by all tasks (the model declares them: ``MultiTaskNet.shared_parameters``)
  and combines those per-task gradients into one update with a TorchJD aggregator (UPGrad, MGDA,
  PCGrad, ...). Parameters that belong to no single task's trunk get the plain sum of the task
  gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import UsageError

if TYPE_CHECKING:
    from ..models.densemtl import SharedFeatures

__all__ = ["GradientAggregation", "LossScalarisation", "Weighting"]


class Weighting(nn.Module):
    """Base of every method. Subclasses set ``name`` and take their options as keyword arguments
    of ``__init__`` after ``tasks``.

    Hooks the training module calls:

    * :meth:`new_epoch` at the start of every training epoch (what the method gathered since
      the previous call belongs to the epoch that just ended; called at the start rather than
      the end so that a checkpoint written after an epoch's last step, before the epoch-end
      hooks, resumes to the same state);
    * :meth:`after_step` after every optimiser step with ``values`` recomputed on the same batch
      by the updated model, only when ``needs_values_after_step`` is True (FAMO);
    * :meth:`optimised_parameters`: parameters the model's optimiser must learn (uncertainty).

    State that must survive a resume lives in the ``state_dict`` (parameters, buffers or
    ``get_extra_state``).
    """

    name: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = False
    linear: ClassVar[bool] = False
    """True when the update is linear in the task losses, so processes need not share loss
    values before combining them (fixed weights)."""
    needs_values_after_step: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)

    def optimised_parameters(self) -> list[nn.Parameter]:
        """Parameters of the method that the model's optimiser learns (none by default)."""
        return []

    def new_epoch(self) -> None:
        """Called at the start of every training epoch."""

    def after_step(self, values: Tensor) -> None:
        """Called after the optimiser step with the batch's losses under the new weights."""

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


class LossScalarisation(Weighting):
    """A method that turns the weighted task losses into one scalar."""

    def combine(self, values: Tensor) -> Tensor:
        """The scalar to back-propagate, from the weighted task losses ``values`` [T]."""
        raise NotImplementedError


class GradientAggregation(Weighting):
    """A method that combines the per-task gradients of the shared parameters (with TorchJD).

    Subclasses implement :meth:`build_aggregator`. The Jacobian is held in the parameters'
    dtype (float32 under bf16-mixed autocast), so the aggregation itself always runs in fp32.
    """

    uses_gradients = True

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.aggregator = self.build_aggregator()

    def build_aggregator(self) -> Any:
        """The ``torchjd.aggregation.Aggregator`` of this method."""
        raise NotImplementedError

    def backward(self, values: Tensor, features: SharedFeatures, shared: Sequence[Tensor],
                 specific: Sequence[Tensor],
                 reduce: Callable[[list[Tensor]], None] | None = None) -> Tensor | None:
        """Accumulate the aggregated update into ``.grad``.

        One backward per task from ``values[t]`` to the trunk's outputs (``features.inputs``)
        and the ``specific`` parameters (every trained parameter outside the trunk: they get
        the summed task gradients); then one batched backward (TorchJD's Jacobian engine) from
        the trunk's outputs to its parameters ``shared``, giving one gradient row per task,
        which the aggregator combines. ``reduce`` averages tensors in place across processes:
        it is applied to the per-task gradients before aggregation, so every process
        aggregates the same Jacobian. Returns the weights the aggregator gave the rows, when
        it has them.
        """
        from torchjd.autojac import backward as jacobian_backward
        from torchjd.autojac import jac_to_grad

        used, rows, summed = gradients_at_features(values, features, specific)
        for p, g in zip(specific, summed):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        # All task rows in one vmapped pass; one task at a time under autocast, where vmap
        # fails on some reduced-precision backward kernels (CPU bf16).
        mixed = any(features.outputs[k].dtype != torch.float32 for k in used)
        jacobian_backward([features.outputs[k] for k in used], jac_tensors=rows,
                          inputs=list(shared), parallel_chunk_size=1 if mixed else None)
        if reduce is not None:
            reduce([p.jac for p in shared if getattr(p, "jac", None) is not None])
            reduce([p.grad for p in specific if p.grad is not None])
        weights = jac_to_grad(list(shared), self.aggregator)
        return None if weights is None else weights.detach()


def gradients_at_features(values: Tensor, features: SharedFeatures,
                          specific: Sequence[Tensor] = ()
                          ) -> tuple[list[int], list[Tensor], list[Tensor | None]]:
    """One backward per task loss ``values[t]``, stopping at the trunk's outputs.

    Returns the indices of the trunk outputs some task uses, for each of them the per-task
    gradients stacked [T, *shape], and the gradient summed over tasks of each ``specific``
    parameter (None when no task uses it). The graph is kept (the task losses may share parts
    of it, e.g. cross-task attention); it is freed when the caller drops the losses.
    """
    inputs, specific = list(features.inputs), list(specific)
    rows: list[list[Tensor | None]] = [[] for _ in inputs]
    summed: list[Tensor | None] = [None] * len(specific)
    for value in values:
        grads = torch.autograd.grad(value, inputs + specific, retain_graph=True,
                                    allow_unused=True)
        for k, g in enumerate(grads[:len(inputs)]):
            rows[k].append(g)
        for i, g in enumerate(grads[len(inputs):]):
            if g is not None:
                summed[i] = g if summed[i] is None else summed[i] + g
    used = [k for k, r in enumerate(rows) if any(g is not None for g in r)]
    if not used:
        raise RuntimeError("no task loss depends on the shared trunk's outputs")
    stacked = [torch.stack([torch.zeros_like(inputs[k]) if g is None else g for g in rows[k]])
               for k in used]
    return used, stacked, summed


def torchjd_class(module: str, name: str, method: str) -> Any:
    """``torchjd.<module>.<name>``, with a one-line message when TorchJD is not installed."""
    import importlib

    try:
        return getattr(importlib.import_module(f"torchjd.{module}"), name)
    except ImportError as exc:
        raise UsageError(f"weighting '{method}' needs TorchJD: pip install "
                         f"'torchjd[full]>=0.18,<0.19' ({exc})") from None


def make_aggregator(method: str, factory: Callable[[], Any], extra: str = "") -> Any:
    """Build a TorchJD object, turning a missing optional solver into a one-line message."""
    try:
        return factory()
    except ImportError:
        hint = f" ({extra})" if extra else ""
        raise UsageError(f"weighting '{method}' needs an optional solver{hint}: "
                         "pip install 'densemtl[mtl-solvers]'") from None


def as_vector(values: Tensor) -> Tensor:
    """The losses as a float32 vector (the methods' arithmetic is in fp32)."""
    return values.float().reshape(-1) if values.dtype != torch.float32 else values.reshape(-1)
