"""Interval arithmetic, the hypernetwork and HyperInterval / HNet.

IBP soundness is checked by sampling thousands of weight/input points inside random boxes; the strategy
tests run short Split-Digits streams on the CPU (a few seconds each, cached per module).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from clframe import ContinualDataModule, ContinualTrainer
from clframe.cli import run_cli
from clframe.metrics import backward_transfer
from clframe.strategies.interval import (
    HNet,
    HyperInterval,
    HyperNetwork,
    Interval,
    ibp,
    target_cnn,
    target_mlp,
)
from tests.conftest import QUIET_TRAINER

REPO = Path(__file__).resolve().parents[1]
N = 4000  # sampled points per soundness check


def box(*shape: int, nonneg: bool = False, scale: float = 1.0, gen: torch.Generator) -> Interval:
    centre = torch.randn(*shape, generator=gen) * scale
    radius = torch.rand(*shape, generator=gen) * 0.3 * scale
    if nonneg:
        centre = centre.abs() + radius  # lower bound >= 0
    return Interval(centre, radius)


def sample(b: Interval, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points drawn inside ``b`` (a quarter of them on vertices, where linear maps attain their extremes)."""
    u = torch.rand(n, *b.centre.shape, generator=gen) * 2 - 1
    u[: n // 4] = u[: n // 4].sign()
    return b.centre + u * b.radius


def assert_inside(out: torch.Tensor, bounds: Interval, tol: float = 1e-4) -> None:
    lo, hi = bounds.lower, bounds.upper
    assert (out >= lo - tol).all() and (out <= hi + tol).all(), f"max violation {(lo - out).max()}, {(out - hi).max()}"


# ---------------------------------------------------------------------------------------------- IBP soundness
@pytest.mark.parametrize("x_kind", ["point", "general", "nonneg"])
@pytest.mark.parametrize("w_kind", ["point", "interval"])
def test_linear_bounds_hold_for_every_sampled_point(x_kind: str, w_kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    xb = box(7, nonneg=x_kind == "nonneg", gen=gen)
    wb, bb = box(5, 7, gen=gen), box(5, gen=gen)
    x = xb.centre if x_kind == "point" else xb
    w, b = (wb.centre, bb.centre) if w_kind == "point" else (wb, bb)
    bounds = ibp.as_interval(ibp.linear(x, w, b, nonneg=x_kind == "nonneg"))
    xs = xb.centre.expand(N, 7) if x_kind == "point" else sample(xb, N, gen)
    ws = wb.centre.expand(N, 5, 7) if w_kind == "point" else sample(wb, N, gen)
    bs = bb.centre.expand(N, 5) if w_kind == "point" else sample(bb, N, gen)
    out = torch.einsum("noi,ni->no", ws, xs) + bs
    assert_inside(out, bounds)
    if x_kind != "general" or w_kind == "point":  # these forms are exact: the extremes are reached on vertices
        assert (out.amin(0) - bounds.lower).abs().max() <= 1e-5 + 0.25 * bounds.radius.max()


def test_the_non_negative_form_is_tighter_than_the_general_one() -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = box(16, 10, nonneg=True, gen=gen), box(4, 10, gen=gen)
    exact, general = ibp.linear(x, w, nonneg=True), ibp.linear(x, w, nonneg=False)
    assert (exact.lower >= general.lower - 1e-5).all() and (exact.upper <= general.upper + 1e-5).all()
    assert (exact.radius < general.radius - 1e-3).any()


@pytest.mark.parametrize("nonneg", [False, True])
def test_conv2d_bounds_hold_with_interval_weights_and_inputs(nonneg: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    xb, wb, bb = box(2, 6, 6, nonneg=nonneg, gen=gen), box(3, 2, 3, 3, gen=gen), box(3, gen=gen)
    bounds = ibp.conv2d(Interval(xb.centre[None], xb.radius[None]), wb, bb, nonneg=nonneg, padding=1)
    n = 500
    xs, ws, bs = sample(xb, n, gen), sample(wb, n, gen), sample(bb, n, gen)
    out = torch.stack([F.conv2d(xs[i : i + 1], ws[i], bs[i], padding=1)[0] for i in range(n)])
    assert_inside(out, Interval(bounds.centre[0], bounds.radius[0]))


def test_activations_and_pooling_are_sound_and_collapse_at_zero_radius() -> None:
    gen = torch.Generator().manual_seed(3)
    xb = box(3, 4, 4, gen=gen)
    xs = sample(xb, N, gen)
    cases = [(ibp.relu, F.relu), (lambda t: ibp.max_pool2d(t, 2), lambda t: F.max_pool2d(t, 2)),
             (lambda t: ibp.avg_pool2d(t, 2), lambda t: F.avg_pool2d(t, 2)), (ibp.flatten, lambda t: t.flatten(1)),
             (lambda t: ibp.monotone(torch.tanh, t), torch.tanh)]
    for interval_fn, point_fn in cases:
        bounds = interval_fn(Interval(xb.centre[None], xb.radius[None]))
        assert_inside(point_fn(xs), Interval(bounds.centre, bounds.radius))
        zero = interval_fn(Interval(xb.centre[None], torch.zeros_like(xb.centre)[None]))
        assert torch.allclose(zero.centre, point_fn(xb.centre[None])) and zero.radius.abs().max() == 0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_whole_target_networks_are_sound_with_interval_weights_and_inputs(kind: str) -> None:
    gen = torch.Generator().manual_seed(4)
    net = target_mlp((1, 4, 4), 3, (8, 8), input_nonneg=True) if kind == "mlp" else \
        target_cnn((1, 8, 8), 3, channels=(4,), hidden_sizes=(6,), input_nonneg=True)
    shape = (1, 4, 4) if kind == "mlp" else (1, 8, 8)
    wb = box(net.num_params, scale=0.3, gen=gen)
    xb = box(*shape, nonneg=True, scale=0.5, gen=gen)
    bounds = net(Interval(xb.centre[None], xb.radius[None]), wb)
    n = 2000 if kind == "mlp" else 300
    xs, ws = sample(xb, n, gen), sample(wb, n, gen)
    out = torch.cat([net(xs[i : i + 1], ws[i]) for i in range(n)])
    assert_inside(out, Interval(bounds.centre[0], bounds.radius[0]))
    point = net(xb.centre[None], Interval(wb.centre, torch.zeros_like(wb.centre)))
    assert torch.allclose(point.centre, net(xb.centre[None], wb.centre), atol=1e-5) and point.radius.max() == 0


def test_worst_case_logits_take_the_lower_end_for_the_label_only() -> None:
    z = Interval(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.5, 1.0]]))
    assert torch.equal(ibp.worst_case_logits(z, torch.tensor([1])), torch.tensor([[1.5, 1.5, 4.0]]))


def test_modules_with_own_point_weights_propagate_interval_activations() -> None:
    """The InTAct use: point weights owned by the layers, interval activations."""
    gen = torch.Generator().manual_seed(5)
    net = ibp.IntervalSequential(ibp.IntervalConv2d(2, 3, 3, padding=1), ibp.IntervalReLU(), ibp.IntervalAvgPool2d(2),
                                 ibp.IntervalFlatten(), ibp.IntervalLinear(12, 5), ibp.IntervalReLU(),
                                 ibp.IntervalLinear(5, 2))
    assert net.param_shapes() == [] and net.num_params == 0
    xb = box(2, 4, 4, gen=gen)
    bounds = net(Interval(xb.centre[None], xb.radius[None]))
    with torch.no_grad():
        assert_inside(net(sample(xb, N, gen)), Interval(bounds.centre[0], bounds.radius[0]))
    with pytest.raises(ValueError, match="external weights"):
        target_mlp((1, 2, 2), 2, (3,))(torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------- hypernetwork
@pytest.mark.parametrize("chunk_size", [None, 37])
def test_hypernetwork_shapes_and_interval_soundness(chunk_size: int | None) -> None:
    torch.manual_seed(0)
    hnet = HyperNetwork(250, 6, (16, 16), chunk_size=chunk_size, chunk_emb_dim=3)
    assert hnet(torch.randn(6)).shape == (250,) and hnet(torch.randn(4, 6)).shape == (4, 250)
    if chunk_size:  # the chunked output layer is far smaller than one with an entry per target weight
        assert hnet.layers[-1].weight.shape == (37, 16) and hnet.chunk_embeddings.shape == (7, 3)
    e = Interval(torch.randn(6), torch.full((6,), 0.1))
    with torch.no_grad():
        w = hnet(e)
        assert w.centre.shape == w.radius.shape == (250,) and (w.radius >= 0).all()
        points = hnet(sample(e, 2000, torch.Generator().manual_seed(1)))
    assert_inside(points, w)
    batched = hnet(Interval(e.centre.expand(3, 6), e.radius.expand(3, 6)))
    assert torch.allclose(batched.centre[1], w.centre, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the strategy
SMALL = dict(backbone_kwargs={"hidden_sizes": [32, 32]}, hnet_hidden=[32, 32], embedding_dim=8, lr=3e-3)
STEPS = 120


@dataclass
class Run:
    model: HyperInterval
    trainer: ContinualTrainer
    datamodule: ContinualDataModule
    snapshots: dict[int, torch.Tensor]


class Snapshots(L.Callback):
    """theta_M of task 0 after every task (to see whether later tasks move it)."""

    def __init__(self) -> None:
        self.theta0: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module: HyperInterval) -> None:
        w = pl_module.generate(pl_module.embedding_box(0, pl_module.hparams.epsilon))
        self.theta0[int(pl_module.current_task)] = (w.centre if isinstance(w, Interval) else w).clone()


def fit(cls=HyperInterval, scenario: str = "task", n_tasks: int = 3, **kwargs) -> Run:
    L.seed_everything(0, verbose=False)
    dm = ContinualDataModule(source="digits", scenario=scenario, n_tasks=n_tasks, class_order=list(range(2 * n_tasks)),
                             batch_size=32, eval_batch_size=512, normalize=False)
    snaps = Snapshots()
    trainer = ContinualTrainer(steps_per_task=STEPS, logger=False, callbacks=[snaps], default_root_dir=tempfile.mkdtemp(),
                               **QUIET_TRAINER)  # results files go there, not into the working directory
    model = cls(**{**SMALL, "epsilon": 0.3, "beta": 0.05, **kwargs}) if cls is HyperInterval else cls(**{**SMALL, **kwargs})
    trainer.fit(model, datamodule=dm)
    return Run(model, trainer, dm, snaps.theta0)


_CACHE: dict[str, Run] = {}

CONFIGS = {
    "hi": {},
    "hi_no_reg": {"beta": 0.0},
    "nested": {"nested": True, "epsilon": 3.0, "beta": 1.0, "custom_init": True},
    "hnet": {"cls": HNet, "beta": 0.05},
    "hi_class": {"scenario": "class"},
}


@pytest.fixture(scope="module")
def runs():
    def get(name: str) -> Run:
        if name not in _CACHE:
            _CACHE[name] = fit(**CONFIGS[name])
        return _CACHE[name]

    return get


def test_short_split_digits_run_learns_without_forgetting(runs) -> None:
    run = runs("hi")
    matrix = run.trainer.accuracy_matrix
    metrics = run.trainer.continual_results["metrics"]
    assert min(matrix[-1]) > 0.9 and backward_transfer(matrix) > -0.03
    assert 0.0 < metrics["final/worst_case_acc"] <= metrics["final/avg_acc"] + 1e-6
    assert 0.5 < metrics["final/cil_acc"] <= metrics["final/task_inference_acc"] + 1e-6  # chance is 1/6
    rows = run.trainer.continual_results["extra_accuracy"]["worst_case"]
    assert len(rows) == 3
    assert metrics["final/worst_case_learning_acc"] == pytest.approx(sum(r[i] for i, r in enumerate(rows)) / 3)


def test_the_regulariser_keeps_earlier_generated_weights_close(runs) -> None:
    with_reg, without = runs("hi"), runs("hi_no_reg")
    drift = {name: (r.snapshots[2] - r.snapshots[0]).norm() / r.snapshots[0].norm()
             for name, r in (("reg", with_reg), ("none", without))}
    assert drift["reg"] < 0.2 * drift["none"], drift
    assert without.trainer.accuracy_matrix[-1][0] < with_reg.trainer.accuracy_matrix[-1][0]


def test_finished_embeddings_are_frozen_and_targets_stored(runs) -> None:
    model = runs("hi").model
    assert bool(model.learned.all()) and not any(e.requires_grad for e in model.task_embeddings)
    assert model.reg_targets.shape == (2, model.target.num_params)  # taken at the start of task 2
    params = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    assert id(model.task_embeddings[2]) in params and id(model.task_embeddings[0]) not in params


def test_schedule_ramps_eps_and_kappa_in_the_first_half() -> None:
    model = HyperInterval(epsilon=2.0, kappa_min=0.5, num_classes=4, input_shape=[1, 2, 2], scenario="task",
                          n_embeddings=2, outputs_per_task=2)
    model._iters_per_task = 100
    assert model.schedule(0) == (0.0, 1.0)
    eps, kappa = model.schedule(49)
    assert eps == pytest.approx(2.0) and kappa == pytest.approx(1 - 5e-5 * 49)
    assert model.schedule(50) == (2.0, 0.5)  # the reference's jump to kappa_min at half-task
    model.hparams.kappa_schedule = "linear"
    assert model.schedule(25)[1] == pytest.approx(0.75)


def test_train_loss_selection_restores_the_lowest_loss_copy_and_the_universal_box_radius() -> None:
    from types import SimpleNamespace

    model = HyperInterval(epsilon=2.0, nested=True, model_selection="train_loss", num_classes=4,
                          input_shape=[1, 2, 2], scenario="task", n_embeddings=2, outputs_per_task=2)
    model._iters_per_task = 100

    def after_update(i: int, loss: float) -> None:
        model.task_step.fill_(i + 1)  # training_step has counted iteration i
        model._last_loss = loss
        model.select_copy()

    after_update(20, 0.1)  # eps(20) = 0.82 does not round to eps = 2 yet: ignored
    assert model._best is None
    after_update(50, 1.0)
    kept = [p.clone() for p in model.hypernet.parameters()]
    with torch.no_grad():
        for p in model.hypernet.parameters():
            p.add_(1.0)
    after_update(55, 0.5)  # checked every 10 iterations only
    after_update(60, 2.0)  # a higher loss
    assert model._best is not None and model._best[0] == 1.0
    model.on_task_end(SimpleNamespace(id=0))
    assert all(torch.equal(a, b) for a, b in zip(kept, model.hypernet.parameters(), strict=True))
    assert model._best is None and bool(model.learned[0])
    # The universal embedding is evaluated as a box of radius eps/M (the reference) or the intersection's half-width.
    with torch.no_grad():
        centre, half = model.universal
        full = model.generate(Interval(centre, torch.full_like(centre, 2.0 / model.hparams.embedding_dim)))
        assert torch.equal(model.universal_weights().centre, full.centre)
        model._weight_cache.clear()
        model.hparams.universal_radius = "intersection"
        assert torch.equal(model.universal_weights().centre, model.generate(Interval(centre, half)).centre)


def test_nested_boxes_intersect_and_the_universal_embedding_works(runs) -> None:
    run = runs("nested")
    model, metrics = run.model, run.trainer.continual_results["metrics"]
    boxes = [model.embedding_box(j, 10.0) for j in range(3)]
    inner = 10.0 / (2 * model.hparams.embedding_dim)
    for b in boxes:  # every box contains [-eps/(2M), eps/(2M)]^M
        assert (b.lower <= -inner + 1e-6).all() and (b.upper >= inner - 1e-6).all()
    centre, radius = model.universal
    for b in boxes:
        assert ((centre - radius) >= b.lower - 1e-6).all() and ((centre + radius) <= b.upper + 1e-6).all()
    assert metrics["final/universal_acc"] > 0.6 and metrics["final/avg_acc"] > 0.6  # 2-way tasks: chance is 0.5


def test_hnet_is_the_epsilon_zero_baseline(runs) -> None:
    run = runs("hnet")
    assert run.model.hparams.epsilon == 0.0
    metrics = run.trainer.continual_results["metrics"]
    assert "final/worst_case_acc" not in metrics and metrics["final/avg_acc"] > 0.9
    with pytest.raises(ValueError, match="fixes epsilon"):
        HNet(epsilon=1.0)


def test_class_incremental_streams_use_entropy_task_inference(runs) -> None:
    run = runs("hi_class")
    metrics = run.trainer.continual_results["metrics"]
    assert metrics["final/given_task_acc"] > 0.9
    assert 0.4 < metrics["final/avg_acc"] <= metrics["final/given_task_acc"] + 1e-6


def test_checkpoint_round_trip_gives_identical_predictions(runs, tmp_path: Path) -> None:
    run = runs("nested")
    path = tmp_path / "hi.ckpt"
    run.trainer.save_checkpoint(path)
    loaded = HyperInterval.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.n_embeddings == 3 and torch.equal(loaded.universal, run.model.universal)
    assert torch.equal(loaded.reg_targets, run.model.reg_targets)
    loaded.eval()
    run.model.eval()
    with torch.no_grad():
        for task in run.datamodule.stream:
            x, y, t = task.test.__getitems__(list(range(len(task.test))))
            assert torch.equal(loaded(x, t), run.model(x, t)), f"task {task.id}: predictions differ after loading"
            xp = loaded.preprocess(x)
            a, b = loaded.target_logits(xp, loaded.universal_weights()), run.model.target_logits(xp, run.model.universal_weights())
            assert torch.equal(a[0], b[0]) and torch.equal(a[1].radius, b[1].radius)


def test_configs_parse_through_the_cli(tmp_path: Path) -> None:
    """Every HyperInterval config runs end to end (shrunk to digits, 2 tasks, a few steps)."""
    for config in ["split_mnist/hyperinterval.yaml", "split_mnist/hnet.yaml", "split_mnist/hyperinterval_nested.yaml",
                   "permuted_mnist/hyperinterval.yaml", "permuted_mnist/hnet.yaml",
                   "permuted_mnist/hyperinterval_nested.yaml"]:
        cli = run_cli(["fit", "--config", str(REPO / "configs" / config), "--data.source=digits", "--data.n_tasks=2",
                       "--trainer.steps_per_task=2", "--model.backbone_kwargs={hidden_sizes: [8]}",
                       "--model.chunk_size=500", f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                       "--trainer.logger=false"])
        assert len(cli.trainer.accuracy_matrix) == 2 and bool(cli.model.learned.all()), config
