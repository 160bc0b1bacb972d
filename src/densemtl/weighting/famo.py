"""FAMO, fast adaptive multitask optimisation (Liu et al., 2023), as TorchJD's ``FAMO``."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import LossScalarisation, as_vector, torchjd_class


class FAMO(LossScalarisation):
    """Balances the rate at which every task loss falls, from loss values only.

    The back-propagated objective is ``c sum_t z_t log(w_t L_t)`` with ``z = softmax(logits)``;
    after every optimiser step the logits take one Adam step towards the tasks whose losses fell
    least, measured on the same batch with the updated model (one extra forward pass, no
    gradient). Options: ``lr`` (0.025) and ``weight_decay`` (0.001) of that Adam. The logits and
    the Adam state are saved with checkpoints.
    """

    name = "famo"
    needs_values_after_step = True

    def __init__(self, tasks: Sequence[str], lr: float = 0.025, weight_decay: float = 1e-3) -> None:
        super().__init__(tasks)
        self.famo = torchjd_class("scalarization", "FAMO", self.name)(
            len(self.tasks), lr=float(lr), weight_decay=float(weight_decay))
        # The logits get no gradient from the model's loss (FAMO learns them in after_step):
        # keep them out of the set DDP expects gradients for.
        self.famo._w.requires_grad_(False)

    def combine(self, values: Tensor) -> Tensor:
        return self.famo(as_vector(values))

    def after_step(self, values: Tensor) -> None:
        self.famo._w.requires_grad_(True)
        try:
            self.famo.update(as_vector(values).detach())
        finally:
            self.famo._w.requires_grad_(False)

    # TorchJD keeps its Adam and the pre-step losses in plain attributes: checkpoint them.
    def get_extra_state(self) -> dict[str, Any]:
        opt = self.famo._optimizer
        prev = self.famo._prev_losses
        return {"adam": None if opt is None else copy.deepcopy(opt.state_dict()),
                "prev_losses": None if prev is None else prev.cpu()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("adam") is not None:
            self.famo._optimizer = torch.optim.Adam([self.famo._w], lr=self.famo.lr,
                                                    weight_decay=self.famo.weight_decay)
            self.famo._optimizer.load_state_dict(state["adam"])
        prev = state.get("prev_losses")
        self.famo._prev_losses = None if prev is None else prev.to(self.famo._w.device)
