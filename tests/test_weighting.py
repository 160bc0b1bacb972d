"""Multi-task weighting methods: each against a hand-built two-task case, and their glue with
the training module (gradients of a real network, resume, legacy checkpoints, bf16, errors)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from densemtl.models.densemtl import SharedFeatures
from densemtl.training.module import MultiTaskModule
from densemtl.weighting import WEIGHTINGS, LossScalarisation, build_weighting

# Two conflicting task gradients on a shared parameter theta: their sum [1, 1] increases the
# second loss (sum . b = -1 < 0).
A = torch.tensor([3.0, 0.0])
B = torch.tensor([-2.0, 1.0])


def two_task_step(name: str, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One update of ``name`` on L1 = theta.A + phi^2, L2 = theta.B + 2 phi at theta = 0,
    phi = 1: returns (theta's update direction, phi's gradient, the aggregator's weights)."""
    method = build_weighting({"name": name, **options}, ["t1", "t2"])
    theta = torch.nn.Parameter(torch.zeros(2))
    phi = torch.nn.Parameter(torch.tensor(1.0))
    trunk = theta * 1.0  # the shared trunk's output, and the cut the task branches start from
    features = SharedFeatures([trunk], [trunk.detach().requires_grad_()])
    x = features.inputs[0]
    values = torch.stack([x @ A + phi**2, x @ B + 2 * phi])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's solver notes
        weights = method.backward(values, features, [theta], [phi])
    return theta.grad, phi.grad, weights


GRADIENT_METHODS = [n for n, c in WEIGHTINGS.items() if c.uses_gradients]


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_do_not_just_sum_conflicting_gradients(name):
    options = {"max_norm": 0.0} if name == "nash_mtl" else {}
    d, phi_grad, weights = two_task_step(name, **options)
    assert float(phi_grad) == pytest.approx(4.0)  # task-specific: the plain sum 2 phi + 2
    assert not torch.allclose(d / d.norm(), (A + B) / (A + B).norm(), atol=1e-2)
    assert float(d @ B) > 0 and float(d @ A) > 0  # neither task's loss rises, unlike the sum
    if weights is not None:  # the update is the weighted sum of the task gradients
        torch.testing.assert_close(d, weights[0] * A + weights[1] * B, rtol=1e-4, atol=1e-5)


def projected(g: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """g minus its component along ``onto`` (when they conflict)."""
    return g - min(float(g @ onto), 0.0) / float(onto @ onto) * onto


def test_pcgrad_and_upgrad_match_their_closed_forms():
    surgery = projected(A, B) + projected(B, A)  # = [0.6, 2.2]
    torch.testing.assert_close(two_task_step("pcgrad")[0], surgery)
    # with two conflicting gradients, UPGrad's projections onto the dual cone are the same as
    # PCGrad's, and it averages them
    torch.testing.assert_close(two_task_step("upgrad")[0], surgery / 2, rtol=1e-3, atol=1e-3)


def test_mgda_is_the_minimum_norm_combination():
    alpha = float((B - A) @ B / ((A - B) @ (A - B)))  # 11/26
    d = two_task_step("mgda")[0]
    torch.testing.assert_close(d, alpha * A + (1 - alpha) * B, rtol=1e-3, atol=1e-3)
    assert float(d @ A) == pytest.approx(float(d @ B), rel=1e-3)  # equal improvement


def test_imtl_g_projects_equally_on_every_task_direction():
    d, _, weights = two_task_step("imtl_g")
    assert float(d @ A / A.norm()) == pytest.approx(float(d @ B / B.norm()), rel=1e-4)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-5)


def test_cagrad_improves_the_worst_task_within_its_ball():
    d = two_task_step("cagrad", c=0.4)[0]
    mean = (A + B) / 2
    assert float((d - mean).norm()) <= 0.4 * float(mean.norm()) + 1e-4
    assert min(float(d @ A), float(d @ B)) > min(float(mean @ A), float(mean @ B)) + 0.5


def test_aligned_mtl_uses_the_whitened_gramian():
    gram = torch.stack([A, B]) @ torch.stack([A, B]).T
    lam, vec = torch.linalg.eigh(gram)
    expected = lam.min().sqrt() * vec @ torch.diag(lam.rsqrt()) @ vec.T @ torch.full((2,), 0.5)
    torch.testing.assert_close(two_task_step("aligned_mtl")[2], expected, rtol=1e-4, atol=1e-5)


def test_nash_mtl_weights_solve_the_bargaining_condition():
    _, _, alpha = two_task_step("nash_mtl", max_norm=0.0)
    gram = torch.stack([A, B]) @ torch.stack([A, B]).T
    torch.testing.assert_close(alpha * (gram @ alpha), torch.ones(2), rtol=2e-2, atol=2e-2)


# --- loss scalarisations ---------------------------------------------------------------------

def test_fixed_is_the_plain_sum_and_geometric_mean_rescales_by_the_loss():
    values = torch.tensor([2.0, 8.0], requires_grad=True)
    total = build_weighting("fixed", ["a", "b"]).combine(values)
    assert float(total) == 10.0
    geo = build_weighting("geometric_mean", ["a", "b"]).combine(values)
    assert float(geo) == pytest.approx(4.0)
    (grad,) = torch.autograd.grad(geo, values)
    # d (v1 v2)^(1/2) / d v_t = geo / (2 v_t): the small loss gets the larger weight
    torch.testing.assert_close(grad, torch.tensor([1.0, 0.25]))


def test_uncertainty_weighting_formula_and_gradients():
    method = build_weighting("uncertainty", ["a", "b"])
    assert [id(p) for p in method.optimised_parameters()] == [id(method.uw.log_var)]
    values = torch.tensor([2.0, 8.0])
    with torch.no_grad():
        method.uw.log_var.copy_(torch.tensor([0.0, math.log(4.0)]))
    total = method.combine(values)
    # 0.5 exp(-s) v + 0.5 s
    assert float(total) == pytest.approx(0.5 * 2 + 0.5 * 8 / 4 + 0.5 * math.log(4.0))
    total.backward()
    torch.testing.assert_close(method.uw.log_var.grad, torch.tensor([-1.0 + 0.5, -1.0 + 0.5]))


def test_dwa_weights_follow_epoch_means_and_survive_a_checkpoint():
    method = build_weighting({"name": "dwa", "temperature": 2.0}, ["a", "b"])
    for epoch in ([1.0, 4.0], [0.5, 4.0]):  # two batches per epoch with these means
        for shift in (-0.1, 0.1):
            total = method.combine(torch.tensor(epoch) + shift)
            assert float(total) == pytest.approx(sum(epoch) + 2 * shift, rel=1e-6)
        method.new_epoch()
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2.0, 0)  # ratios 0.5/1, 4/4
    values = torch.tensor([1.0, 1.0], requires_grad=True)
    (grad,) = torch.autograd.grad(method.combine(values), values)
    torch.testing.assert_close(grad, expected)
    state = method.state_dict()  # mid-epoch: one batch of the third epoch is in its sums
    restored = build_weighting("dwa", ["a", "b"])
    restored.load_state_dict(state)
    for m in (method, restored):
        m.combine(torch.tensor([0.25, 1.0]))  # second batch of epoch 3: means [0.625, 1.0]
        m.new_epoch()
    probe = torch.tensor([1.0, 1.0], requires_grad=True)
    (grad,) = torch.autograd.grad(restored.combine(probe), probe)
    torch.testing.assert_close(grad, 2 * torch.softmax(torch.tensor([1.25, 0.25]) / 2.0, 0))


def test_famo_moves_weight_to_the_task_that_improved_least_and_resumes():
    method = build_weighting({"name": "famo", "lr": 0.1}, ["a", "b"])
    assert method.optimised_parameters() == []  # it learns its logits itself
    method.combine(torch.tensor([1.0, 1.0]))
    method.after_step(torch.tensor([0.5, 0.99]))  # task a fell a lot, task b hardly
    z = torch.softmax(method.famo._w, 0)
    assert float(z[1]) > float(z[0])
    restored = build_weighting({"name": "famo", "lr": 0.1}, ["a", "b"])
    restored.load_state_dict(method.state_dict())
    for m in (method, restored):
        m.combine(torch.tensor([0.5, 0.99]))
        m.after_step(torch.tensor([0.45, 0.98]))
    torch.testing.assert_close(restored.famo._w, method.famo._w)  # same Adam moments


def test_options_and_names_are_checked():
    with pytest.raises(ValueError, match="unknown weighting 'upgard' \\(did you mean 'upgrad'"
                                         "\\?\\); choose one of fixed"):
        build_weighting("upgard", ["a"])
    with pytest.raises(ValueError, match=r"'mgda': unknown option\(s\) eps \(its options: "
                                         r"epsilon, max_iters\)"):
        build_weighting({"name": "mgda", "eps": 1}, ["a"])
    with pytest.raises(ValueError, match=r"'upgrad': unknown option.*its options: none"):
        build_weighting({"name": "upgrad", "c": 1}, ["a"])
    with pytest.raises(ValueError, match=r"'dwa': .*temperature"):
        build_weighting({"name": "dwa", "temperature": 0}, ["a"])
    assert isinstance(build_weighting({"name": "test_weighting.HalfSum"}, ["a"]), HalfSum)


class HalfSum(LossScalarisation):
    """A user's own method, named by its dotted path."""

    name = "half_sum"

    def combine(self, values):
        return values.sum() / 2


# --- the training module's gradient path ------------------------------------------------------

TASKS = {"semseg": {"channels": 3}, "depth": {}}
NET = {"arch": "densemtl", "encoder": {"name": "resnet18", "pretrained": False},
       "decoder": {"num_ch_dec": [4, 8, 8, 8, 8]}, "exchange": {"stages": [1]}}


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 3, 32, 32, generator=g),
            "semseg": torch.randint(0, 3, (2, 32, 32), generator=g),
            "depth": torch.rand(2, 1, 32, 32, generator=g) * 5 + 0.5}


class _Trainer:
    """The two trainer attributes the module's backward reads, outside a Lightning run."""

    world_size = 1
    accumulate_grad_batches = 1


def test_module_backward_aggregates_the_encoder_jacobian_and_sums_the_rest(monkeypatch):
    from torchjd.aggregation import UPGrad

    torch.manual_seed(0)
    module = MultiTaskModule(TASKS, NET, loss={"weights": {"semseg": 10.0, "depth": 1.0}},
                             weighting={"name": "upgrad"})
    monkeypatch.setattr(MultiTaskModule, "trainer", property(lambda self: _Trainer()))
    batch = tiny_batch()
    shared, specific = module.net.shared_parameters(), module.net.task_parameters()
    assert {id(p) for p in shared} == {id(p) for p in module.net.encoder.parameters()}
    assert len(shared) + len(specific) == len(list(module.net.parameters()))
    # the reference: one backward per task, the Jacobian aggregated by hand (the same seed
    # before each forward: the same dropout masks)
    torch.manual_seed(1)
    values = module.criterion.weighted(module.criterion(module(batch["image"]), batch))
    rows = [torch.autograd.grad(v, shared + specific, retain_graph=True, allow_unused=True)
            for v in values]
    jac = torch.stack([torch.cat([g.reshape(-1) for g in r[:len(shared)]]) for r in rows])
    expected_shared = UPGrad()(jac)
    expected_rest = [sum(r[len(shared) + i] if r[len(shared) + i] is not None else 0
                         for r in rows) for i in range(len(specific))]
    # the module's path
    torch.manual_seed(1)
    outputs, features = module.net.forward_with_features(batch["image"])
    module._pending = (module.criterion.weighted(module.criterion(outputs, batch)), features)
    module.backward(torch.zeros(()))
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected_shared, rtol=1e-4, atol=1e-6)
    for p, e in zip(specific, expected_rest):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, jac.sum(0), rtol=1e-2)
    assert module._weights is not None and module._weights.shape == (2,)


def test_legacy_loss_weighting_and_checkpoint_keys_are_read():
    with pytest.warns(UserWarning, match="loss.weighting is deprecated"):
        module = MultiTaskModule(TASKS, NET, loss={"weighting": "dwa", "dwa_temperature": 3.0})
    assert module.weighting.name == "dwa" and module.weighting.dwa.temperature == 3.0
    with pytest.raises(ValueError, match=r"loss\.weighting and weighting are both set"):
        MultiTaskModule(TASKS, NET, loss={"weighting": "dwa"}, weighting={"name": "fixed"})
    state = {k: v for k, v in module.state_dict().items()}
    state.pop("weighting._extra_state")
    state.update({"criterion.dwa_history": torch.tensor([[2.0, 4.0], [1.0, 4.0]]),
                  "criterion.dwa_epochs": torch.tensor(2),
                  "criterion.dwa_weights": torch.ones(2)})
    checkpoint = {"state_dict": state}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    probe = torch.tensor([1.0, 1.0], requires_grad=True)
    (grad,) = torch.autograd.grad(module.weighting.combine(probe), probe)
    torch.testing.assert_close(grad, 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 3.0, 0))


def test_training_modules_with_more_than_task_losses_refuse_gradient_methods():
    from densemtl.training.uda import AdaptationModule

    with pytest.raises(ValueError, match="AdaptationModule does not support weighting "
                                         "'upgrad'; use a loss weighting"):
        AdaptationModule(tasks=TASKS, network=NET, weighting={"name": "upgrad"})
    with pytest.raises(ValueError, match="weighting 'famo'"):
        AdaptationModule(tasks=TASKS, network=NET, weighting={"name": "famo"})


# --- the gradient-conflict measurement -------------------------------------------------------

def test_conflict_metrics_from_a_gramian():
    from densemtl.training.conflict import conflict_metrics

    gram = torch.stack([A, B, torch.tensor([0.0, 2.0])]) @ \
        torch.stack([A, B, torch.tensor([0.0, 2.0])]).T
    logs = conflict_metrics(gram.double(), ["s", "d", "n"])
    assert logs["conflict/cos/s-d"] == pytest.approx(-6 / (3 * math.sqrt(5)))
    assert logs["conflict/cos/s-n"] == pytest.approx(0.0)
    assert logs["conflict/cos/d-n"] == pytest.approx(1 / math.sqrt(5))
    assert logs["conflict/cos_min"] == logs["conflict/cos/s-d"]
    assert logs["conflict/cos_mean"] == pytest.approx(
        (-6 / (3 * math.sqrt(5)) + 1 / math.sqrt(5)) / 3)
    assert logs["conflict/norm/d"] == pytest.approx(math.sqrt(5))


def test_task_gramian_is_that_of_the_per_task_encoder_gradients():
    from densemtl.training.conflict import task_gramian

    torch.manual_seed(0)
    module = MultiTaskModule(TASKS, NET, loss={"weights": {"semseg": 10.0, "depth": 1.0}})
    batch = tiny_batch()
    shared = module.net.shared_parameters()
    torch.manual_seed(1)
    values = module.criterion.weighted(module.criterion(module(batch["image"]), batch))
    rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        v, shared, retain_graph=True)]) for v in values]).double()
    buffers = [b.clone() for b in module.net.buffers()]
    torch.manual_seed(1)
    state = torch.get_rng_state()
    gram = task_gramian(module, batch)
    torch.testing.assert_close(gram, rows @ rows.T, rtol=1e-4, atol=1e-9)
    assert torch.equal(torch.get_rng_state(), state)  # training's random draws are untouched
    for before, after in zip(buffers, module.net.buffers()):  # and so are the BN statistics
        assert torch.equal(before, after)
    assert all(p.grad is None for p in module.parameters())


def test_a_missing_solver_is_named_with_the_install_line(monkeypatch):
    import torchjd._mixins

    real = torchjd._mixins.find_spec
    monkeypatch.setattr(torchjd._mixins, "find_spec",
                        lambda name: None if name == "cvxpy" else real(name))
    with pytest.raises(ValueError, match=r"^weighting 'cagrad' needs an optional solver \(cvxpy\)"
                                         r": pip install 'densemtl\[mtl-solvers\]'$"):
        build_weighting("cagrad", ["a", "b"])
    build_weighting("upgrad", ["a", "b"])  # quadprog is a dependency of densemtl itself


def test_legacy_uncertainty_checkpoint_keeps_its_log_variances():
    module = MultiTaskModule(TASKS, NET, weighting={"name": "uncertainty"})
    state = dict(module.state_dict())
    state["criterion.log_vars"] = torch.tensor([0.3, -0.2])
    del state["weighting.uw.log_var"]
    checkpoint = {"state_dict": state}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(module.weighting.uw.log_var.detach(), torch.tensor([0.3, -0.2]))
