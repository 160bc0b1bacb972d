"""Dynamic Weight Average (Liu et al., 2019), as TorchJD's ``DWA`` scalariser."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import LossScalarisation, as_vector, torchjd_class


class DWA(LossScalarisation):
    """``sum_t lambda_t w_t L_t`` with ``lambda = T softmax(r / temperature)`` and ``r_t`` the ratio
    of task t's mean loss over the last two epochs (``lambda = 1`` in the first two epochs).

    Options: ``temperature`` (2 in the paper). The epoch means are of the values this method was
    given: under DDP these are the losses averaged over processes, so every process keeps the
    same history. The history (and the running sums of a part-done epoch) are saved with
    checkpoints.
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        self.dwa = torchjd_class("scalarization", "DWA", self.name)(float(temperature))

    def combine(self, values: Tensor) -> Tensor:
        self._move_history(values.device)
        return self.dwa(as_vector(values))

    def _move_history(self, device: torch.device) -> None:
        """A restored history is on the CPU: move it next to the losses."""
        dwa = self.dwa
        if dwa._loss_sum is not None and dwa._loss_sum.device != device:
            dwa._loss_sum = dwa._loss_sum.to(device)
        dwa._previous_averages = [t.to(device) for t in dwa._previous_averages]

    def new_epoch(self) -> None:
        self.dwa.step()  # closes the previous epoch (a no-op before the first)

    # TorchJD keeps the history in plain attributes: carry them through checkpoints.
    _STATE = ("_loss_sum", "_n_batches", "_previous_averages")

    def get_extra_state(self) -> dict[str, Any]:
        state = {k: getattr(self.dwa, k) for k in self._STATE}
        state["_loss_sum"] = None if state["_loss_sum"] is None else state["_loss_sum"].cpu()
        state["_previous_averages"] = [t.cpu() for t in state["_previous_averages"]]
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.dwa._loss_sum = state["_loss_sum"]
        self.dwa._n_batches = int(state["_n_batches"])
        self.dwa._previous_averages = list(state["_previous_averages"])
