"""Multi-task unsupervised domain adaptation: adversarial alignment in output space.

The paper's MTL-UDA setting (ADVENT-style, per task and per supervised scale): a labelled source
domain trains the network as usual, and for every aligned (task, scale) a patch discriminator
learns to tell source from target *domain maps* built from the network's predictions, while the
network learns to make its target maps look like source ones.

Domain maps are declared by the tasks (``Task.domain_map``, with ``Task.domain_context`` for what
the maps of one iteration share); each prediction is first upsampled, bilinear with
``align_corners=True``, to its domain's input size, and the map is built in fp32. The built-in
tasks' maps:

* ``semseg``: the weighted self-information map ``-p_c log p_c / log C`` of the softmax
  (C channels, each in [0, 1/e/log C]);
* ``depth``: ``(relu(x) - lo) / (hi - lo)`` where x is the predicted normalised inverse depth and
  ``lo, hi`` the min and max of the **current source batch's** ground truth (valid pixels, same
  units); the same range is used for source and target maps (1 channel);
* ``normals``: the L2-normalised prediction (3 channels);
* ``edges``: the predicted edge probability (softmax of a 2-channel head, sigmoid of a 1-channel
  one), i.e. the output brought to [0, 1] like the other regression maps (1 channel). The paper
  has no edges in its UDA setting; this is our choice.

One iteration (labels: source 0, target 1; BCE with logits against constant maps):

1. **network** (discriminators frozen): ``L_G = L_sup(source) + lambda_adv * mean_(t,s)
   BCE(D_ts(map_tgt), 0)``, i.e. the target maps are pushed towards the *source* label; one
   Adam step (optionally after gradient-norm clipping), one step of its schedule;
2. **discriminators** (network frozen, maps detached):
   ``L_D = lambda_disc * (mean_(t,s) BCE(D_ts(map_src), 0) + mean_(t,s) BCE(D_ts(map_tgt), 1))``;
   one Adam step for all of them, one step of the poly schedule.

The maps of step 2 are those of step 1 (computed before the network's update), so this is the
official order (both updates from the same forward passes). ``global_step`` counts iterations:
only the network's optimiser step is counted by Lightning (``max_steps``, ``val_check_interval``
and the schedules are in iterations). ``lambda_adv: 0`` gives the source-only baseline: the
target batch is not forwarded and the discriminators are not trained (so BN statistics see
source images only).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import fp32_context, resize_to
from ..models.discriminator import PatchDiscriminator
from ..tasks import get_task
from .module import MultiTaskModule, reject_gradient_weighting
from .optim import OPTIMIZERS, build_optimizer, build_scheduler

__all__ = ["SOURCE_LABEL", "TARGET_LABEL", "AdaptationModule", "domain_map"]

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


def domain_map(task: str, pred: Tensor, size: Sequence[int], context: Any = None) -> Tensor:
    """The discriminator input for ``task`` from raw output ``pred``: upsampled to ``size``
    (bilinear, ``align_corners=True``), then the task's ``domain_map`` in fp32."""
    with fp32_context(pred.device):
        return get_task(task).domain_map(resize_to(pred.float(), size), context)


def _bce(logits: Tensor, label: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(),
                                                                              label))


# --- the LightningModule --------------------------------------------------------------------

class AdaptationModule(MultiTaskModule):
    """Source-supervised multi-task training with adversarial output-space alignment.

    Everything of :class:`MultiTaskModule` is reused (model, losses, metrics, evaluation on the
    target's labelled split, reports, checkpoints); training runs in manual optimisation on the
    ``{"source": batch, "target": batch}`` batches of ``AdaptationDataModule``. Only the target
    *images* are used.

    Keyword arguments (every other one goes to :class:`MultiTaskModule`):
        lambda_adv: weight of the adversarial loss in the network's loss (paper 0.005);
            0 trains source only (no target forward, no discriminator updates).
        lambda_disc: weight of the discriminators' loss (paper: 1; the official code has the
            option but ignores it).
        align_tasks: tasks to align (default: all the model's tasks).
        align_scales: output scales to align (default: the loss's ``scales``; paper [1, 0]).
        adv_start_step: first iteration with adversarial training (official ``doda``: 0/1).
        discriminator: ``PatchDiscriminator`` options (``ndf`` 64, ``num_layers`` 5,
            ``negative_slope`` 0.2, ``flip`` 0.5).
        discriminator_optimizer: as ``optimizer`` (default Adam, lr 1e-4, betas (0.9, 0.99)).
        discriminator_scheduler: as ``scheduler`` (default poly, power 0.9, over ``max_steps``).
        clip_grad_norm: clip the network's gradient norm before its step (default None, as the
            official DA trainer; Lightning's ``gradient_clip_val`` must be null in manual
            optimisation).
    """

    def __init__(
        self,
        *,
        lambda_adv: float = 0.005,
        lambda_disc: float = 1.0,
        align_tasks: list[str] | None = None,
        align_scales: list[int] | None = None,
        adv_start_step: int = 0,
        discriminator: dict[str, Any] | None = None,
        discriminator_optimizer: dict[str, Any] | None = None,
        discriminator_scheduler: dict[str, Any] | None = None,
        clip_grad_norm: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        reject_gradient_weighting(self, after_step=True)
        self.automatic_optimization = False
        if lambda_adv < 0 or lambda_disc <= 0:
            raise ValueError(f"need lambda_adv >= 0 and lambda_disc > 0, got {lambda_adv}, "
                             f"{lambda_disc}")
        self.lambda_adv, self.lambda_disc = float(lambda_adv), float(lambda_disc)
        self.align_tasks = list(align_tasks) if align_tasks is not None else list(self.task_names)
        unknown = set(self.align_tasks) - set(self.task_names)
        if unknown or not self.align_tasks:
            raise ValueError(f"align_tasks {self.align_tasks} must be a non-empty subset of "
                             f"the model's tasks {self.task_names}")
        scales = align_scales if align_scales is not None else self.criterion.scales
        self.align_scales = [int(s) for s in scales]
        if not self.align_scales or len(set(self.align_scales)) != len(self.align_scales):
            raise ValueError(f"align_scales must be distinct and non-empty, got {scales}")
        self.adv_start_step = int(adv_start_step)
        self.clip_grad_norm = clip_grad_norm
        self.disc_optimizer_cfg = {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.99],
                                   **(discriminator_optimizer or {})}
        self.disc_scheduler_cfg = dict(discriminator_scheduler or {"name": "poly", "power": 0.9})
        self.pairs = [(t, s) for s in self.align_scales for t in self.align_tasks]
        self.discriminators = nn.ModuleDict({
            self.pair_key(t, s): PatchDiscriminator(
                get_task(t).domain_channels(self.net.tasks[t]), **(discriminator or {}))
            for t, s in self.pairs
        })
        self._checked_outputs = False

    @staticmethod
    def pair_key(task: str, scale: int) -> str:
        """Name of the discriminator of (task, scale), e.g. ``semseg_s0``."""
        return f"{task}_s{scale}"

    @property
    def adapting(self) -> bool:
        """Whether this iteration trains adversarially (a Python bool: no host sync)."""
        return self.lambda_adv > 0 and self.global_step >= self.adv_start_step

    # --- optimisers ---------------------------------------------------------------------------

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """``[network, discriminators]`` and their per-iteration schedules (stepped here)."""
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"AdaptationModule trains on one device; this trainer has world_size "
                f"{self.trainer.world_size} (set trainer.devices 1 / no DDP strategy)")
        total = self.trainer.estimated_stepping_batches
        opt_g = build_optimizer(self.net, self.loss_parameters(), self.optimizer_cfg)
        opt_d = self._build_disc_optimizer()
        schedulers = [build_scheduler(opt_g, self.scheduler_cfg, total),
                      build_scheduler(opt_d, self.disc_scheduler_cfg, total)]
        return [opt_g, opt_d], [s for s in schedulers if s is not None]

    def _build_disc_optimizer(self) -> torch.optim.Optimizer:
        """One optimiser, one parameter group per discriminator (named by its pair key); the
        official code's one Adam per discriminator with equal settings is the same update."""
        cfg = dict(self.disc_optimizer_cfg)
        name = cfg.pop("name", "adam")
        if name not in OPTIMIZERS:
            raise ValueError(f"discriminator optimizer '{name}' is not one of {sorted(OPTIMIZERS)}")
        lr = float(cfg.pop("lr"))
        if "betas" in cfg:
            cfg["betas"] = tuple(cfg["betas"])
        groups = [{"params": list(d.parameters()), "name": k}
                  for k, d in self.discriminators.items()]
        return OPTIMIZERS[name](groups, lr=lr, **cfg)

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        if not isinstance(schedulers, list):
            schedulers = [schedulers]
        with warnings.catch_warnings():  # the D schedule runs before D's first step (source only)
            warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)")
            for scheduler in schedulers:
                scheduler.step()

    # --- training -----------------------------------------------------------------------------

    def domain_contexts(self, source: Mapping[str, Tensor]) -> dict[str, Any]:
        """What each aligned task's maps share this iteration (e.g. the source depth range)."""
        return {t: get_task(t).domain_context(source) for t in self.align_tasks}

    def domain_maps(self, outputs: Mapping[str, Mapping[int, Tensor]], size: Sequence[int],
                    contexts: Mapping[str, Any]) -> dict[str, Tensor]:
        """``{pair_key: map}`` for every aligned (task, scale)."""
        if not self._checked_outputs:
            for t, s in self.pairs:
                if s not in outputs[t]:
                    raise KeyError(f"align_scales: the model outputs scales {sorted(outputs[t])}"
                                   f" for '{t}', not {s}")
            self._checked_outputs = True
        return {self.pair_key(t, s): domain_map(t, outputs[t][s], size, contexts[t])
                for t, s in self.pairs}

    def discriminate(self, maps: Mapping[str, Tensor], label: float) -> dict[str, Tensor]:
        """BCE of each discriminator on its map against the constant ``label``."""
        return {k: _bce(self.discriminators[k](m), label) for k, m in maps.items()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        src, tgt = batch["source"], batch["target"]
        opt_g, opt_d = self.optimizers()
        adapting = self.adapting
        logs: dict[str, Tensor] = {}

        # (1) network: source supervision + fooling the (frozen) discriminators on target maps
        with self.toggled_optimizer(opt_g):
            src_out = self(src["image"])
            losses = self.supervised_losses(src_out, src)
            g_loss = losses["total"]
            if adapting:
                contexts = self.domain_contexts(src)
                tgt_out = self(tgt["image"])
                tgt_maps = self.domain_maps(tgt_out, tgt["image"].shape[-2:], contexts)
                with torch.no_grad():
                    src_maps = self.domain_maps(src_out, src["image"].shape[-2:], contexts)
                adv_terms = self.discriminate(tgt_maps, SOURCE_LABEL)
                adv = torch.stack(list(adv_terms.values())).mean()
                g_loss = g_loss + self.lambda_adv * adv
                logs["train/adv"] = adv.detach()
                logs.update({f"train/adv/{k}": v.detach() for k, v in adv_terms.items()})
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            if self.clip_grad_norm:
                self.clip_gradients(opt_g, gradient_clip_val=self.clip_grad_norm,
                                    gradient_clip_algorithm="norm")
            opt_g.step()

        # (2) discriminators: source maps -> 0, target maps -> 1 (inputs detached)
        if adapting:
            with self.toggled_optimizer(opt_d):
                d_src = self.discriminate({k: m.detach() for k, m in src_maps.items()},
                                          SOURCE_LABEL)
                d_tgt = self.discriminate({k: m.detach() for k, m in tgt_maps.items()},
                                          TARGET_LABEL)
                d_src_mean = torch.stack(list(d_src.values())).mean()
                d_tgt_mean = torch.stack(list(d_tgt.values())).mean()
                d_loss = self.lambda_disc * (d_src_mean + d_tgt_mean)
                opt_d.zero_grad()
                self.manual_backward(d_loss)
                # not through LightningOptimizer.step: global_step counts iterations, not steps
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_no_closure)
            logs["train/disc"] = d_loss.detach()
            logs["train/disc_src"] = d_src_mean.detach()
            logs["train/disc_tgt"] = d_tgt_mean.detach()
        self._step_schedulers()

        self.log_training(losses, src["image"].shape[0], logs)
        return g_loss.detach()


def _no_closure() -> None:
    return None
