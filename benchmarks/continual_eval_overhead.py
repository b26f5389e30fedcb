"""Overhead of clframe's per-iteration continual evaluation (the stability-gap protocol).

    CLFRAME_DATA=/path/to/data python benchmarks/continual_eval_overhead.py

Writes ``benchmarks/results/continual_eval_overhead.md`` (tables, command, machine) and
``benchmarks/results/continual_eval_overhead.json`` (every raw timing). One thread (torch and
OpenMP), so the numbers do not depend on how busy the other core is; every comparison is a ratio
of numbers measured in this one process, interleaved repeat by repeat.

Part 1, one evaluation against the bare forward passes it has to do:
  ``ContinualEvaluation.evaluate(trainer, module)`` is timed against
  ``with torch.no_grad(): for chunk in chunks: module(x_chunk, t_chunk)`` over the callback's own
  pre-collated subset tensors, the same chunks (``eval_batch_size``: the callback's default, read
  from its signature, and 4096 for comparison) and the same module (ER of
  ``configs/split_mnist/er_stability_gap.yaml``, MLP 784-400-400, after 3 training steps of every
  task, so every task is in scope). A third timing, "bare + metrics", adds the per-chunk metric
  work (argmax, cross-entropy, one ``index_add_``) to the bare loop without any of the callback's
  bookkeeping, to say where an overhead comes from. Several scales show the per-call fixed cost.
  The callback's counts are first checked against a ``bincount`` reference.

Part 2, a whole per-iteration-evaluated run against Avalanche:
  Split-MNIST class-incremental, 5 tasks of 2 classes (natural order), 1,000 training samples per
  class (the same samples on both sides), batch 128, 1 epoch per task (16 iterations per task, 80
  in all), plain fine-tuning (clframe ``Finetune``, Avalanche ``Naive``), identical initial
  weights, SGD lr 0.01 momentum 0.9 (momentum reset at every task on both sides). Evaluation: the
  seen tasks after every iteration on the identical 1,000-sample test subset of each task (the
  callback's seeded subsets, handed to Avalanche as tensors). Each framework runs with and without
  per-iteration evaluation; evaluation time = difference of the medians. Both frameworks'
  evaluations are also timed directly (clframe: around ``evaluate``; Avalanche: ``before_eval`` to
  ``after_eval`` of a counting plugin), and the evaluations are counted. Forward hooks measure the
  time spent inside the model's ``forward`` during those evaluations, so the time outside it (the
  framework's own overhead) is reported too. Part 2b repeats the comparison with a linear model,
  whose forward is almost free, so evaluation time is mostly framework overhead (as on a GPU).

Takes about 4-5 minutes on 2 shared CPU cores (``--reps`` sets the runs per part-2 variant).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import median, quantiles  # noqa: E402

import torch  # noqa: E402
from common import machine  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402

for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # after the import, which sets them to INFO

from clframe.callbacks import ContinualEvaluation  # noqa: E402
from clframe.data.datamodule import ContinualDataModule  # noqa: E402
from clframe.strategies import ER, Finetune  # noqa: E402
from clframe.trainer import ContinualTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MLP = {"hidden_sizes": [400, 400], "init": "default"}
DEFAULT_CHUNK = inspect.signature(ContinualEvaluation).parameters["eval_batch_size"].default
BIG_CHUNK = 4096  # the default before it was lowered; kept for comparison
# The clframe variants of part 2: JSON key -> eval_batch_size.
CLFRAME_EVALS = {"clframe_eval": DEFAULT_CHUNK, f"clframe_eval_bs{BIG_CHUNK}": BIG_CHUNK}
BASELINE = {**dict.fromkeys(CLFRAME_EVALS, "clframe_noeval"),
            "avalanche_eval": "avalanche_noeval", "avalanche_eval_nometrics": "avalanche_noeval"}


def quartiles(xs):
    q = quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved in alternating order, warm-up discarded."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(warmup + repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


def trainer_kwargs(root: str) -> dict:
    return dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=root)


@contextlib.contextmanager
def quiet():
    """Lightning prints a few info lines per task fit; keep the console readable."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class TimedContinualEvaluation(ContinualEvaluation):
    """The library callback, unchanged, with a stopwatch around each evaluation and a count of stream ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_seconds, self.eval_calls, self.stream_end_calls = 0.0, 0, 0

    def evaluate(self, trainer, module):
        t0 = time.perf_counter()
        out = super().evaluate(trainer, module)
        self.eval_seconds += time.perf_counter() - t0
        self.eval_calls += 1
        return out

    def on_stream_end(self, trainer, pl_module):
        self.stream_end_calls += 1
        super().on_stream_end(trainer, pl_module)


# ====================================================================================== part 1
def er_setup(source: str, samples_per_task: int, eval_batch_size: int, root: str):
    """The config's ER module after 3 training steps of each of the 5 tasks (all 5 in scope)."""
    L.seed_everything(0, verbose=False)
    dm = ContinualDataModule(source=source, scenario="class", n_tasks=5, batch_size=256, eval_batch_size=1000, seed=0)
    module = ER(backbone="mlp", backbone_kwargs=MLP, optimizer="sgd", lr=0.01, momentum=0.9, buffer_size=2000,
                buffer_policy="class_balanced", new_weight=0.3)
    cb = ContinualEvaluation(every_n_steps=1, samples_per_task=samples_per_task, eval_batch_size=eval_batch_size,
                             plots=False, log_curves=False, save_dir=root)
    trainer = ContinualTrainer(steps_per_task=3, eval_after_task=False, callbacks=[cb], **trainer_kwargs(root))
    with quiet():
        trainer.fit(module, datamodule=dm)
    assert dm.current_task == 4 and trainer.global_step == 15
    module.train()  # as inside on_train_batch_end
    return trainer, module, cb, dm


def time_one_eval(trainer, module, cb, dm, in_scope: int, repeats: int, warmup: int) -> dict:
    dm.set_task(in_scope - 1)
    x_all, y_all, t_all = cb._data
    end, bs = cb._offsets[in_scope], cb.eval_batch_size
    chunks = [(x_all[lo:min(lo + bs, end)], y_all[lo:min(lo + bs, end)], t_all[lo:min(lo + bs, end)])
              for lo in range(0, end, bs)]
    n_tasks = len(cb._offsets) - 1

    def bare():
        with torch.no_grad():
            for x, _, t in chunks:
                module(x, t)

    def bare_metrics():  # the callback's per-chunk metric work, without its bookkeeping
        with torch.no_grad():
            stats = torch.zeros(3, n_tasks)
            for x, y, t in chunks:
                logits = module(x, t)
                correct = (logits.argmax(1) == y).float()
                loss = F.cross_entropy(logits, y, reduction="none")
                stats.index_add_(1, t, torch.stack([correct, torch.ones_like(correct), loss]))
            return stats

    def callback():
        return cb.evaluate(trainer, module)

    # correctness first: the callback's counts equal a bincount reference (the pre-fix computation)
    got = callback()
    with torch.no_grad():
        logits = torch.cat([module(x, t) for x, _, t in chunks])
    y, t = y_all[:end], t_all[:end]
    ref = torch.stack([torch.bincount(t, weights=(logits.argmax(1) == y).float(), minlength=n_tasks),
                       torch.bincount(t, minlength=n_tasks).float(),
                       torch.bincount(t, weights=F.cross_entropy(logits, y, reduction="none"), minlength=n_tasks)])
    assert torch.equal(got[:2], ref[:2]) and torch.allclose(got[2], ref[2], rtol=1e-4), (got, ref)
    assert module.training and all(m.training for m in module.modules())
    times = interleaved({"evaluate": callback, "bare": bare, "bare_metrics": bare_metrics}, repeats, warmup)
    # paired within a repeat (back to back), so slow drifts of the shared machine's load cancel
    paired = [e / b for e, b in zip(times["evaluate"], times["bare"], strict=True)]
    paired_m = [e / b for e, b in zip(times["evaluate"], times["bare_metrics"], strict=True)]
    return {
        "samples": end, "chunks": len(chunks), "chunk_size": bs, "tasks_in_scope": in_scope, "repeats": repeats,
        "median_s": {k: median(v) for k, v in times.items()},
        "quartiles_s": {k: quartiles(v) for k, v in times.items()},
        "ratio_evaluate_over_bare": median(paired), "ratio_evaluate_over_bare_quartiles": quartiles(paired),
        "ratio_evaluate_over_bare_metrics": median(paired_m),
        "fixed_overhead_us": 1e6 * median([e - b for e, b in zip(times["evaluate"], times["bare"], strict=True)]),
        "raw_s": times,
    }


def preprocess_cost(module, x_all, repeats: int) -> dict:
    """``ContinualModule.preprocess`` (in place on a fresh float copy) vs the out-of-place version it replaced."""
    mean, std = module.input_mean, module.input_std
    out = {}
    for bs in (DEFAULT_CHUNK, BIG_CHUNK):
        x = x_all[:bs]
        fns = {"in_place": lambda x=x: module.preprocess(x),
               "out_of_place": lambda x=x: (x.float().div(255.0) - mean) / std}
        assert torch.equal(fns["in_place"](), fns["out_of_place"]())
        times = interleaved(fns, repeats, max(3, repeats // 10))
        out[str(bs)] = {f"{k}_ms": 1e3 * median(v) for k, v in times.items()}
        out[str(bs)]["ratio_out_of_place_over_in_place"] = median(
            [o / i for o, i in zip(times["out_of_place"], times["in_place"], strict=True)])
    return out


def mode_switch_cost(repeats: int = 2000) -> dict:
    """The callback's mode bookkeeping alone (save every submodule's flag, ``eval()``, restore), in microseconds."""
    out = {}
    for backbone, shape in (("mlp", (1, 28, 28)), ("resnet18", (3, 32, 32))):
        kwargs = {"backbone_kwargs": MLP} if backbone == "mlp" else {}
        module = Finetune(backbone=backbone, num_classes=10, input_shape=shape, scenario="class", **kwargs)

        def switch(module=module):
            flags = [(m, m.training) for m in module.modules()]
            module.eval()
            for m, flag in flags:
                m.training = flag

        times = interleaved({"switch": switch}, repeats, 100)["switch"]
        out[backbone] = {"submodules": len(list(module.modules())), "median_us": 1e6 * median(times)}
    return out


def stream_end_check(root: str) -> dict:
    """Does ContinualEvaluation produce its metrics and CSV, with and without the trainer's end-of-task test?"""
    out = {}
    for eval_after_task in (True, False):
        d = Path(root) / f"eat_{eval_after_task}"
        L.seed_everything(0, verbose=False)
        cb = TimedContinualEvaluation(plots=False, save_dir=str(d))
        trainer = ContinualTrainer(steps_per_task=2, eval_after_task=eval_after_task, callbacks=[cb],
                                   **trainer_kwargs(str(d)))
        with quiet():
            trainer.fit(Finetune(), datamodule=ContinualDataModule(source="digits", n_tasks=5, seed=0))
        out[str(eval_after_task)] = {"evaluations": len(cb.steps), "metrics": len(cb.metrics),
                                     "stream_end_calls": cb.stream_end_calls,
                                     "csv_written": (d / "continual_eval.csv").exists()}
    return out


def part1(quick: bool) -> tuple[list[dict], dict]:
    big, small = (10, 50) if quick else (60, 400)
    D = DEFAULT_CHUNK
    cases = [  # (source, samples/task, chunk, tasks in scope, repeats)
        ("mnist", 1000, D, 5, big),
        ("mnist", 1000, BIG_CHUNK, 5, big),
        ("mnist", 1000, D, 2, big),
        ("mnist", 1000, D, 1, big),
        ("digits", 1000, D, 5, small),
        ("digits", 1000, D, 1, small),
        ("mnist", 10, D, 1, small),
    ]
    rows, setups = [], {}
    extra = {"default_eval_batch_size": D, "mode_switch": mode_switch_cost()}
    with tempfile.TemporaryDirectory() as root:
        extra["stream_end_check"] = stream_end_check(root)
        for source, spt, bs, scope, reps in cases:
            key = (source, spt, bs)
            if key not in setups:
                setups[key] = er_setup(source, spt, bs, root)
            res = time_one_eval(*setups[key], in_scope=scope, repeats=reps, warmup=max(3, reps // 10))
            res.update(source=source, samples_per_task=spt)
            rows.append(res)
            print(f"[part1] {source:6s} {res['samples']:5d} samples, {res['chunks']} chunk(s) of {bs}: evaluate "
                  f"{1e3 * res['median_s']['evaluate']:.3f} ms, bare {1e3 * res['median_s']['bare']:.3f} ms, "
                  f"ratio {res['ratio_evaluate_over_bare']:.3f}", flush=True)
        _, module, cb, _ = setups[("mnist", 1000, D)]
        extra["preprocess"] = preprocess_cost(module, cb._data[0], 4 * big)
    return rows, extra


# ====================================================================================== part 2
class ForwardTimer:
    """Times the model's forward calls made in eval mode (i.e. inside the evaluations), via module hooks."""

    def __init__(self, module: nn.Module) -> None:
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args):
        if not module.training:
            self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        if not module.training:
            self.seconds += time.perf_counter() - self._t0
            self.calls += 1


class AvalancheMLP(nn.Module):
    """clframe's MLP backbone + linear head, with clframe's on-device preprocessing (uint8 -> normalised, in place)."""

    def __init__(self, mean: float, std: float, hidden_sizes=(400, 400)) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.full((1, 1, 1), mean), persistent=False)
        self.register_buffer("input_std", torch.full((1, 1, 1), std), persistent=False)
        layers, width = [nn.Flatten()], 784
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = x.float().div_(255.0).sub_(self.input_mean).div_(self.input_std)
        return self.head(self.net(x))


def clframe_model(init_state=None, hidden_sizes=(400, 400)) -> Finetune:
    module = Finetune(backbone="mlp", backbone_kwargs={"hidden_sizes": list(hidden_sizes), "init": "default"},
                      optimizer="sgd", lr=0.01, momentum=0.9, mask_unseen_classes=False, num_classes=10,
                      input_shape=(1, 28, 28), scenario="class")
    if init_state is not None:
        module.load_state_dict(init_state)
    return module


def avalanche_state(clframe_state: dict) -> dict:
    out = {}
    for k, v in clframe_state.items():
        if k.startswith("backbone.net."):
            out["net." + k[len("backbone.net."):]] = v
        elif k.startswith("head."):
            out[k] = v
    return out


@torch.no_grad()
def subset_accuracy(forward, x, y, t, n_tasks) -> list[float]:
    logits = torch.cat([forward(x[i:i + 1000]) for i in range(0, len(y), 1000)])
    correct = (logits.argmax(1) == y).float()
    return (torch.bincount(t, weights=correct, minlength=n_tasks) / torch.bincount(t, minlength=n_tasks)).tolist()


def run_clframe(stream, init_state, hidden, eval_batch_size: int | None, root: str) -> dict:
    """One run; ``eval_batch_size=None`` runs without the callback."""
    L.seed_everything(0, verbose=False)
    dm = ContinualDataModule.from_stream(stream, batch_size=128)
    module = clframe_model(init_state, hidden)
    cb = None if eval_batch_size is None else TimedContinualEvaluation(
        every_n_steps=1, samples_per_task=1000, seed=0, plots=False, log_curves=False, save_dir=root,
        eval_batch_size=eval_batch_size)
    # the trainer calls the callback's on_stream_end (stability summary + CSV) at the end of fit
    trainer = ContinualTrainer(epochs_per_task=1, eval_after_task=False, callbacks=[cb] if cb else [],
                               **trainer_kwargs(root))
    fwd = ForwardTimer(module) if cb else None
    t0 = time.perf_counter()
    with quiet():
        trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "iterations": trainer.global_step, "module": module}
    if cb:
        assert cb.stream_end_calls == 1 and cb.metrics and (Path(root) / "continual_eval.csv").exists()
        out.update(evaluations=len(cb.steps), eval_calls=cb.eval_calls, eval_direct_s=cb.eval_seconds,
                   last_eval_acc=cb.accuracy[-1], samples_evaluated=sum(cb._offsets[k + 1] for k in cb.trained_task),
                   subset_data=cb._data, stability_metrics=dict(cb.metrics), eval_forward_s=fwd.seconds,
                   eval_forward_calls=fwd.calls, stream_end_calls=cb.stream_end_calls)
    return out


def make_avalanche_counter():
    from avalanche.core import SupervisedPlugin

    class Counter(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.evals = self.iters = self.eval_batches = self.eval_samples = 0
            self.eval_seconds = 0.0
            self._t0 = None

        def before_eval(self, strategy, **kwargs):
            self._t0 = time.perf_counter()

        def after_eval(self, strategy, **kwargs):
            self.eval_seconds += time.perf_counter() - self._t0
            self.evals += 1

        def after_eval_iteration(self, strategy, **kwargs):
            self.eval_batches += 1
            self.eval_samples += len(strategy.mb_y)

        def after_training_iteration(self, strategy, **kwargs):
            self.iters += 1

    return Counter()


def avalanche_benchmark(stream, subsets):
    from avalanche.benchmarks import tensors_benchmark

    x_all, y_all, t_all = subsets
    train, test = [], []
    for task in stream.tasks:
        x, y, _ = task.train.__getitems__(list(range(len(task.train))))
        train.append([x, y])
        sel = t_all == task.id
        test.append([x_all[sel], y_all[sel]])
    return tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0] * len(stream.tasks))


def run_avalanche(bm, init_state, mean, std, hidden, with_eval: bool, metrics: bool) -> dict:
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(0)
    model = AvalancheMLP(mean, std, hidden)
    model.load_state_dict(avalanche_state(init_state))
    counter = make_avalanche_counter()
    fwd = ForwardTimer(model) if with_eval else None
    chosen = (accuracy_metrics(experience=True), loss_metrics(experience=True)) if metrics else ()
    evaluator = EvaluationPlugin(*chosen, loggers=[])  # no InteractiveLogger / text output
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                     train_mb_size=128, train_epochs=1, eval_mb_size=1000, device="cpu", plugins=[counter],
                     evaluator=evaluator, eval_every=1 if with_eval else -1, peval_mode="iteration")
    t0 = time.perf_counter()
    for t, exp in enumerate(bm.train_stream):
        strategy.train(exp, eval_streams=[bm.test_stream[: t + 1]], reset_optimizer_state=True)
    wall = time.perf_counter() - t0
    last = evaluator.get_last_metrics() if metrics else {}
    last_acc = [last.get(f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}", float("nan"))
                for j in range(len(bm.train_stream))]
    return {"wall_s": wall, "iterations": counter.iters, "evaluations": counter.evals,
            "eval_batches": counter.eval_batches, "samples_evaluated": counter.eval_samples,
            "eval_direct_s": counter.eval_seconds, "last_eval_acc": last_acc, "model": model,
            "eval_forward_s": fwd.seconds if fwd else 0.0, "eval_forward_calls": fwd.calls if fwd else 0}


def part2(reps: int, hidden=(400, 400), with_nometrics: bool = True, tag: str = "mlp") -> dict:
    dm = ContinualDataModule(source="mnist", scenario="class", n_tasks=5, batch_size=128,
                             train_samples_per_class=1000, seed=0)
    stream = dm.stream
    scratch = ContinualEvaluation(samples_per_task=1000, seed=0)
    scratch._build_subsets(stream)
    subsets = scratch._data
    bm = avalanche_benchmark(stream, subsets)
    torch.manual_seed(0)
    init_state = copy.deepcopy(clframe_model(None, hidden).state_dict())  # the one initialisation of every run
    mean, std = stream.mean[0], stream.std[0]
    x_all, y_all, t_all = subsets
    variants = {name: (lambda root, bs=bs: run_clframe(stream, init_state, hidden, bs, root))
                for name, bs in {**CLFRAME_EVALS, "clframe_noeval": None}.items()}
    variants.update({
        "avalanche_eval": lambda root: run_avalanche(bm, init_state, mean, std, hidden, True, True),
        "avalanche_eval_nometrics": lambda root: run_avalanche(bm, init_state, mean, std, hidden, True, False),
        "avalanche_noeval": lambda root: run_avalanche(bm, init_state, mean, std, hidden, False, True),
    })
    if not with_nometrics:
        del variants["avalanche_eval_nometrics"]
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as root:
        for r in range(reps):
            for name, fn in (variants.items() if r % 2 == 0 else reversed(list(variants.items()))):
                res = fn(str(Path(root) / f"{name}_{r}"))
                if name.startswith("clframe"):
                    model = res.pop("module")
                    forward = lambda x, m=model: m(x, None)  # noqa: E731
                    if "subset_data" in res:
                        sub = res.pop("subset_data")
                        assert all(torch.equal(a, b) for a, b in zip(sub, subsets, strict=True)), \
                            "clframe evaluated other samples"
                else:
                    model = forward = res.pop("model")
                model.eval()
                res["final_acc_subsets"] = subset_accuracy(forward, x_all, y_all, t_all, 5)
                runs[name].append(res)
                print(f"[part2 {tag}] rep {r} {name:26s} wall {res['wall_s']:7.2f} s, iterations {res['iterations']}, "
                      f"evaluations {res.get('evaluations', 0)}, final acc "
                      f"{100 * sum(res['final_acc_subsets']) / 5:.2f}%", flush=True)
    # evaluations per number of tasks in scope: clframe 1 + iterations per task, Avalanche one more (do_final)
    its = runs["clframe_eval"][0]["iterations"] // 5
    assert 5 * (1 + its) == runs["clframe_eval"][0]["evaluations"]
    assert 5 * (2 + its) == runs["avalanche_eval"][0]["evaluations"]
    return {"tag": tag, "hidden_sizes": list(hidden), "runs": runs,
            "subset_sizes": torch.bincount(t_all).tolist(), "train_sizes": [len(t.train) for t in stream.tasks]}


def summarize_part2(p2: dict) -> dict:
    runs = p2["runs"]
    wall = {k: median([r["wall_s"] for r in v]) for k, v in runs.items()}
    s = {"wall_median_s": wall}
    for fw, base in BASELINE.items():
        if fw not in runs:
            continue
        r0 = runs[fw][0]
        diff = wall[fw] - wall[base]
        direct = median([r["eval_direct_s"] for r in runs[fw]])
        fl = median([r["eval_forward_s"] for r in runs[fw]])
        s[fw] = {"eval_time_by_difference_s": diff, "evaluations": r0["evaluations"],
                 "samples_evaluated": r0["samples_evaluated"],
                 "per_eval_by_difference_ms": 1e3 * diff / r0["evaluations"],
                 "eval_time_direct_s": direct, "per_eval_direct_ms": 1e3 * direct / r0["evaluations"],
                 "per_1000_samples_direct_ms": 1e6 * direct / r0["samples_evaluated"],
                 "forward_calls": r0["eval_forward_calls"], "forward_floor_s": fl,
                 "beyond_forward_direct_s": direct - fl, "beyond_forward_by_difference_s": diff - fl}
    a = s["avalanche_eval"]
    keys = {"per_run_by_difference": "eval_time_by_difference_s", "per_eval_by_difference": "per_eval_by_difference_ms",
            "per_run_direct": "eval_time_direct_s", "per_eval_direct": "per_eval_direct_ms",
            "per_sample_direct": "per_1000_samples_direct_ms"}
    for fw in CLFRAME_EVALS:  # ratio_avalanche_over_clframe (default chunk), ..._bs4096
        c = s[fw]
        ratio = {k: a[v] / c[v] for k, v in keys.items()}
        # what clframe could reach with zero overhead outside its forward: Avalanche's time / clframe's forward time
        ratio["bound_by_forward_per_run"] = a["eval_time_by_difference_s"] / c["forward_floor_s"]
        if "avalanche_eval_nometrics" in s:
            ratio["nometrics_per_run_by_difference"] = \
                s["avalanche_eval_nometrics"]["eval_time_by_difference_s"] / c["eval_time_by_difference_s"]
        s["ratio_avalanche_over_" + fw.replace("_eval", "")] = ratio
    return s


# ====================================================================================== report
def fmt_ms(s: float) -> str:
    ms = 1e3 * s
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def ratios_of(s2: dict) -> list[dict]:
    """Avalanche / clframe ratios, one per clframe column (default chunk first)."""
    return [s2["ratio_avalanche_over_" + fw.replace("_eval", "")] for fw in CLFRAME_EVALS]


def part2_table(w, p2: dict, s2: dict) -> None:
    runs = p2["runs"]
    c_def, c_big = CLFRAME_EVALS
    cols = [k for k in (c_def, c_big, "avalanche_eval", "avalanche_eval_nometrics") if k in s2]
    heads = {c_def: f"clframe (default `eval_batch_size={DEFAULT_CHUNK}`)", c_big: f"clframe, `eval_batch_size={BIG_CHUNK}`",
             "avalanche_eval": "Avalanche", "avalanche_eval_nometrics": "Avalanche, no metrics"}
    wall = s2["wall_median_s"]
    rs = ratios_of(s2)

    def row(label, cells, ratios=("", "")):
        w(f"| {label} | " + " | ".join(cells) + f" | {ratios[0]} | {ratios[1]} |")

    def ratio_cells(key, bold=False):
        return tuple((f"**{r[key]:.1f}**" if bold else f"{r[key]:.1f}") for r in rs)

    w("| | " + " | ".join(heads[k] for k in cols) + f" | Avalanche / clframe default | Avalanche / clframe {BIG_CHUNK} |")
    w("|---" * (len(cols) + 3) + "|")
    row("training iterations", [str(runs[k][0]["iterations"]) for k in cols])
    row("evaluations per run (counted)", [str(s2[k]["evaluations"]) for k in cols])
    row("test samples forwarded per run", [str(s2[k]["samples_evaluated"]) for k in cols])
    row("run wall time with per-iteration evaluation (s)", [f"{wall[k]:.2f}" for k in cols],
        tuple(f"{wall['avalanche_eval'] / wall[c]:.2f}" for c in (c_def, c_big)))
    row("run wall time without evaluation (s)", [f"{wall[BASELINE[k]]:.2f}" for k in cols],
        (f"{wall['avalanche_noeval'] / wall['clframe_noeval']:.2f}",) * 2)
    row("**evaluation time per run, by difference (s)**", [f"**{s2[k]['eval_time_by_difference_s']:.2f}**" for k in cols],
        ratio_cells("per_run_by_difference", bold=True))
    row("evaluation time per evaluation, by difference (ms)", [f"{s2[k]['per_eval_by_difference_ms']:.1f}" for k in cols],
        ratio_cells("per_eval_by_difference"))
    row("evaluation time per run, timed directly (s)", [f"{s2[k]['eval_time_direct_s']:.2f}" for k in cols],
        ratio_cells("per_run_direct"))
    row("evaluation time per evaluation, timed directly (ms)", [f"{s2[k]['per_eval_direct_ms']:.2f}" for k in cols],
        ratio_cells("per_eval_direct"))
    row("evaluation time per 1,000 test samples, direct (ms)",
        [f"{s2[k]['per_1000_samples_direct_ms']:.2f}" for k in cols], ratio_cells("per_sample_direct"))
    row("model forward calls inside the evaluations", [str(s2[k]["forward_calls"]) for k in cols])
    row("of which time inside the model's forward (s/run, forward hooks)",
        [f"{s2[k]['forward_floor_s']:.2f}" for k in cols])
    bd = {k: s2[k]["beyond_forward_direct_s"] for k in cols}
    row("**evaluation time outside the model's forward, direct (s/run)**", [f"**{bd[k]:.3f}**" for k in cols],
        tuple(f"**{bd['avalanche_eval'] / bd[c]:.0f}**" if bd[c] > 0 else "(n/a)" for c in (c_def, c_big)))
    acc = {k: [100 * sum(r["final_acc_subsets"]) / 5 for r in v] for k, v in runs.items()}
    row("final average accuracy on the 5 x 1,000 subsets (%), each run",
        [", ".join(f"{x:.2f}" for x in acc[k]) for k in cols])
    row("same, runs without evaluation (%)", [", ".join(f"{x:.2f}" for x in acc[BASELINE[k]]) for k in cols])
    row("per-task accuracy at the last evaluation, framework's own (%)",
        [" / ".join(f"{100 * x:.1f}" for x in runs[k][0]["last_eval_acc"]) if k != "avalanche_eval_nometrics"
         else "(no metrics)" for k in cols])
    w("")


def write_report(command: str, mach: dict, p1: list[dict], extra: dict, parts2: list[tuple[dict, dict]],
                 total_s: float) -> None:
    lines = []
    w = lines.append
    D, B = DEFAULT_CHUNK, BIG_CHUNK
    w("# Continual-evaluation overhead: clframe `ContinualEvaluation` vs bare forwards and vs Avalanche\n")
    w("Produced by `benchmarks/continual_eval_overhead.py` (method in its docstring). Command:\n")
    w(f"```bash\n{command}\n```\n")
    load = mach["loadavg_at_start"]
    w(f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs ({mach['cpus_available']} available to the "
      f"process, shared with other work; load average at start {', '.join(f'{x:.2f}' for x in load) if load else '?'}), "
      f"no GPU; {mach['platform']}; Python {mach['python']}, torch {mach['torch']} ({mach['torch_threads']} thread), "
      f"lightning {mach['lightning']}, avalanche-lib {mach['avalanche']}. Whole script: {total_s:.0f} s. "
      "Absolute times are single-thread CPU times on a shared machine; compare the ratios (every ratio is between "
      "numbers measured interleaved in the same process). Raw numbers: `continual_eval_overhead.json`. "
      f"clframe's default `eval_batch_size` (read from `ContinualEvaluation`'s signature) is {D}; {B} (the old "
      "default) is measured beside it.\n")

    w("## 1. One evaluation vs the bare forward passes over the same tensors\n")
    w("ER of `configs/split_mnist/er_stability_gap.yaml` (MLP 784-400-400 + 10-way head, class-incremental, 5 tasks, "
      "unseen-class mask on), after 3 training steps of every task. `evaluate` = "
      "`ContinualEvaluation.evaluate(trainer, module)` with the module in training mode, as in `on_train_batch_end`; "
      "`bare` = `with torch.no_grad(): for chunk: module(x_chunk, t_chunk)` over the callback's own pre-collated "
      "tensors and chunks; `bare + metrics` = `bare` plus argmax, cross-entropy and one `index_add_` per chunk "
      "(the work whose result the callback returns), without mode switching or precision context. "
      "Times: medians over the repeats (interleaved, alternating order, after warm-up). Ratios and differences: "
      "medians of the per-repeat values (each repeat times the three back to back, so load drifts of the shared "
      "machine cancel), with the quartiles of evaluate / bare. Goal: evaluate / bare <= 1.2.\n")
    w("| data | tasks in scope | samples | chunk size (chunks) | repeats | evaluate (ms) | bare (ms) | bare + metrics (ms) "
      "| **evaluate / bare** (quartiles) | evaluate / (bare + metrics) | evaluate - bare (us) |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in p1:
        m = r["median_s"]
        data = f"{r['source']}, {r['samples_per_task']}/task" if r["samples_per_task"] != 1000 else r["source"]
        w(f"| {data} | {r['tasks_in_scope']} | {r['samples']} | {r['chunk_size']} ({r['chunks']}) | {r['repeats']} "
          f"| {fmt_ms(m['evaluate'])} | {fmt_ms(m['bare'])} | {fmt_ms(m['bare_metrics'])} "
          f"| **{r['ratio_evaluate_over_bare']:.3f}** ({r['ratio_evaluate_over_bare_quartiles'][0]:.2f}-"
          f"{r['ratio_evaluate_over_bare_quartiles'][1]:.2f}) | {r['ratio_evaluate_over_bare_metrics']:.3f} "
          f"| {r['fixed_overhead_us']:.0f} |")
    w("")
    w("`digits` is scikit-learn's 8x8 digits (MLP 64-400-400, at most ~36 test samples per class): the small "
      "evaluations (like the last row, 10 samples per task) show the fixed per-call cost, which the large ones hide "
      "within timing noise (a negative `evaluate - bare` is noise; the machine was shared and loaded). The "
      "callback's counts were checked equal to a `bincount` reference computation (the pre-fix method), and every "
      "submodule's training flag restored, before timing.\n")
    by_chunk = {r["chunk_size"]: r for r in p1 if r["source"] == "mnist" and r["samples"] == 5000}
    if D in by_chunk and B in by_chunk:
        bd, bb = by_chunk[D]["median_s"]["bare"], by_chunk[B]["median_s"]["bare"]
        w(f"Chunk size on this CPU: the bare forwards over the same 5,000 MNIST samples take {1e3 * bd:.1f} ms in "
          f"chunks of {D} (the default) and {1e3 * bb:.1f} ms in chunks of {B} ({bb / bd:.2f}x); see section 3.\n")
    if "preprocess" in extra:
        pp = extra["preprocess"]
        w("`ContinualModule.preprocess` alone (uint8 chunk -> normalised floats), in place on the fresh float copy vs "
          "the out-of-place `(x.float().div(255) - mean) / std` it replaced (identical results, checked): "
          + "; ".join(f"chunk of {bs}: {v['in_place_ms']:.2f} ms vs {v['out_of_place_ms']:.2f} ms "
                      f"({v['ratio_out_of_place_over_in_place']:.2f}x)" for bs, v in pp.items()) + ".\n")
    if "mode_switch" in extra:
        ms = extra["mode_switch"]
        w("Part of the fixed per-call cost is the mode bookkeeping alone (save every submodule's training flag, "
          "`module.eval()`, restore each flag through `nn.Module.__setattr__`): "
          + ", ".join(f"{v['median_us']:.0f} us for {k} ({v['submodules']} submodules)" for k, v in ms.items())
          + ".")
        if p1:
            small = min(p1, key=lambda r: r["samples"])
            m = small["median_s"]
            w(f" In the smallest case ({small['samples']} samples, evaluate - bare = {small['fixed_overhead_us']:.0f} us), "
              f"the metric ops (argmax, cross-entropy, one `index_add_`) account for about "
              f"{1e6 * (m['bare_metrics'] - m['bare']):.0f} us (bare + metrics - bare), the mode bookkeeping for about "
              f"{ms['mlp']['median_us']:.0f} us, and the rest is slicing, the stats buffer and the precision context.")
        w("")

    for p2, s2 in parts2:
        r_def, r_big = ratios_of(s2)
        n_reps = len(p2["runs"]["clframe_eval"])
        hidden = p2["hidden_sizes"]
        arch = "MLP 784-" + "-".join(map(str, hidden)) + " + 10-way head" if hidden else "linear model 784 -> 10"
        if p2["tag"] == "mlp":
            w("## 2. Whole run with per-iteration evaluation: clframe vs Avalanche\n")
            w(f"Split-MNIST class-incremental, 5 tasks x 2 classes in natural order, {p2['train_sizes'][0]} training "
              "samples per task (1,000 per class, the identical samples on both sides), batch 128, 1 epoch per task, "
              f"{arch}, plain fine-tuning (clframe `Finetune` with `mask_unseen_classes=False` / Avalanche `Naive`), "
              "identical initial weights and preprocessing (uint8 in, scaled and normalised in place inside the "
              "model), SGD lr 0.01 momentum 0.9 reset at every task (`reset_optimizer_state=True` for Avalanche). "
              f"Evaluation after every iteration on the seen tasks, {p2['subset_sizes'][0]} identical test samples "
              "per task (clframe's seeded subsets, given to Avalanche as tensors through `tensors_benchmark`; clframe "
              "was checked to evaluate exactly these tensors). Avalanche: `eval_every=1, peval_mode=\"iteration\"`, "
              "`eval_mb_size=1000` (one batch per experience), `EvaluationPlugin(accuracy_metrics(experience=True), "
              "loss_metrics(experience=True), loggers=[])` (no InteractiveLogger; the no-metrics column uses "
              "`EvaluationPlugin(loggers=[])`), `strategy.train(exp, eval_streams=[test_stream[:t+1]])`; the "
              "evaluations are counted by a plugin. clframe: `ContinualEvaluation(every_n_steps=1, "
              "samples_per_task=1000, plots=False)` with the default and the 4096 chunk, "
              "`ContinualTrainer(eval_after_task=False)`; the trainer calls the callback's `on_stream_end` "
              "(stability summary + CSV) at the end of `fit`, inside the timed region (checked: exactly once per run, "
              "metrics and CSV present). No end-of-task test on either side. Wall times: medians of "
              f"{n_reps} runs of each variant, interleaved.\n")
        else:
            w("### 2b. The same runs with a linear model (forward passes nearly free)\n")
            w(f"Everything as above except the model, a {arch} (clframe `hidden_sizes=[]`), and no no-metrics "
              "variant. With the forward pass almost free, evaluation time is framework overhead: this is the "
              "regime of a GPU, where a 1,000-sample MLP forward takes microseconds while per-sample Python work "
              f"does not get faster. Medians of {n_reps} runs.\n")
        part2_table(w, p2, s2)
        w(f"Goal: clframe needs at least 5x less evaluation time than Avalanche. Measured, per run by difference: "
          f"**{r_def['per_run_by_difference']:.1f}x** with clframe's default chunk of {D} "
          f"(**{r_big['per_run_by_difference']:.1f}x** with `eval_batch_size={B}`); per evaluation "
          f"{r_def['per_eval_by_difference']:.1f}x; directly timed {r_def['per_eval_direct']:.1f}x per evaluation and "
          f"{r_def['per_sample_direct']:.1f}x per test sample"
          + (f"; against Avalanche's evaluation loop with no metrics at all "
             f"{r_def['nometrics_per_run_by_difference']:.1f}x per run" if "nometrics_per_run_by_difference" in r_def
             else "")
          + f". Upper bound at clframe's own forward speed (Avalanche's evaluation time / the time inside clframe's "
          f"forward): {r_def['bound_by_forward_per_run']:.1f}x.\n")
        sm = p2["runs"]["clframe_eval"][0].get("stability_metrics") or {}
        keys = ["stability/min_acc", "stability/wc_acc", "stability/wf10", "stability/gap_depth"]
        if all(k in sm for k in keys):
            w("clframe's stability summary of its first evaluated run: " + ", ".join(
                f"`{k}` {100 * sm[k]:.1f}" for k in keys) + ".\n")

    w("## 3. What distorts the comparison\n")
    notes = [
        "**Evaluation count.** clframe evaluates once before a task's first update (`on_train_start`) and after "
        "every update (`on_train_batch_end`; the `on_train_epoch_end` evaluation of the same step is deduplicated): "
        "1 + 16 per task. Avalanche's `PeriodicEval` evaluates before each `train` call (`do_initial`), after every "
        "iteration, and again after the experience (`do_final`, which in iteration mode repeats the last iteration's "
        "evaluation, as its own comment says): 1 + 16 + 1 per task, 5.9% more evaluations and test samples. The "
        "per-evaluation and per-sample rows remove that difference.",
        "**Where the time goes in Avalanche.** Every evaluation, for every seen experience, switches the dataset to "
        "its eval transform group (`eval_dataset_adaptation`), builds a new `DataLoader` (`make_eval_dataloader`), "
        "fetches the 1,000 samples one by one through `AvalancheDataset.__getitem__`, collates them with the "
        "default collate, runs `model_adaptation`, saves and restores the training state and fires the callbacks "
        "of every plugin and metric. clframe keeps the subsets as ready tensors on the model's device and does one "
        "fused pass over all seen tasks. The no-metrics column isolates Avalanche's loop and data path from its "
        "metric plugins.",
        "**The forward pass sets a floor on CPU.** With one thread, the MLP 784-400-400 costs per test sample the "
        "same order of time as Avalanche's whole per-sample data path, so even an evaluation with zero framework "
        "overhead could only be (forward + Avalanche's overhead) / forward times faster than Avalanche (the upper "
        "bound given under each table). The row 'outside the model's forward' (directly timed evaluation minus the "
        "time inside the model's `forward`, measured by forward hooks during the same evaluations) and part 2b show "
        "the framework overhead itself. The forward includes the uint8 -> float preprocessing (identical on both "
        "sides).",
        "**Where clframe's evaluation runs.** Inside Lightning's `on_train_batch_end`, so it is part of the "
        "training loop; the by-difference number contains everything the callback costs (record bookkeeping, the "
        "per-task host transfer, the stream-end summary and CSV), the direct number only the `evaluate` calls. "
        "Avalanche's direct number spans `before_eval`..`after_eval` and misses the state save/restore around it.",
        "**Avalanche's evaluation changes its training.** Every evaluation `DataLoader` iterator draws its base "
        "seed from the global torch RNG, so with per-iteration evaluation Avalanche's training shuffles differ from "
        "the run without it (compare its two accuracy rows). clframe's evaluation consumes no random numbers: its "
        "runs with and without evaluation train identically.",
        f"**Chunk size on CPU.** A chunk of {B} makes each float copy of the input {B} x 784 x 4 B = "
        f"{B * 784 * 4 / 1e6:.1f} MB (and the first hidden activations {B * 400 * 4 / 1e6:.1f} MB), far larger than "
        f"this CPU's 1 MiB L2 per core; the default {D} makes them {D * 784 * 4 / 1e6:.1f} MB and "
        f"{D * 400 * 4 / 1e6:.1f} MB. Compare the two clframe columns; the size of the effect varies from run to run "
        "on this shared machine. Avalanche evaluates each 1,000-sample experience in one batch, close to clframe's "
        "default. On a GPU larger chunks can be passed explicitly.",
        "**Training loops differ** (Lightning vs Avalanche's template: Avalanche fetches training samples one by "
        "one through its dataset, clframe gathers a batch with one index; Lightning has a per-fit setup cost per "
        "task). That is why the runs without evaluation differ in wall time; it cancels in the difference but not "
        "in the total wall time.",
        "**Accuracy.** Same architecture, initial weights, data, optimiser and iterations; only the data order "
        "differs (each framework's own shuffling), so the final accuracies differ by that noise only. They are low "
        "because this is plain fine-tuning in a class-incremental stream (every earlier task is forgotten: "
        "per-task accuracy 0 except the last task) and because 16 iterations at lr 0.01 leave the last task only "
        "partly learned, on both sides alike; the framework's own last evaluation equals the accuracy recomputed "
        "here on the same samples.",
        "**Head.** clframe normally masks the logits of classes not seen yet in class-incremental streams; it is "
        "switched off here (`mask_unseen_classes=False`) so both frameworks train the same plain 10-way head. "
        "Part 1 uses the config's ER with the mask on.",
        "**Plots** (`plots=False`) and all logging output are off on both sides; with `plots=True` clframe draws two "
        "figures once per run, a one-off cost unrelated to per-iteration evaluation.",
        "**CPU only, one thread.** On a GPU the forward passes become nearly free for both, while Avalanche's "
        "per-sample Python data path does not get faster, so the ratio moves towards part 2b's. Host "
        "synchronisations, which matter only on a GPU, cannot be measured by this CPU benchmark (section 4).",
    ]
    for n in notes:
        w(f"- {n}")
    w("")

    w("## 4. Problems found in clframe's evaluation path, and fixed\n")
    w("An earlier version of this benchmark found four problems; the library has since changed. Their status, "
      "with this run's numbers:\n")
    probs, txt = [], []

    def versus(big: float, default: float) -> str:  # how the old default compares with the new one
        return "on par" if abs(big / default - 1) < 0.05 else f"{big / default:.2f}x the default's time"

    if D in by_chunk and B in by_chunk:
        txt.append(f"part 1, bare forwards over 5,000 samples: {1e3 * bd:.1f} ms at {D} vs {1e3 * bb:.1f} ms at {B} "
                   f"({versus(bb, bd)})")
    for p2, s2 in parts2:
        c, cb_ = s2["clframe_eval"], s2[f"clframe_eval_bs{B}"]
        txt.append(f"{'MLP' if p2['tag'] == 'mlp' else 'linear model'} runs: {c['forward_floor_s']:.2f} s vs "
                   f"{cb_['forward_floor_s']:.2f} s inside the forward per run, {c['eval_time_by_difference_s']:.2f} s "
                   f"vs {cb_['eval_time_by_difference_s']:.2f} s of evaluation "
                   f"({versus(cb_['eval_time_by_difference_s'], c['eval_time_by_difference_s'])})")
    pp = extra.get("preprocess", {})
    probs.append(f"**Slow default chunk on CPU (fixed).** `eval_batch_size` defaulted to {B}; the default is now "
                 f"{D}. Default vs {B} in this run: " + ("; ".join(txt) or "(not measured)") + ". The preprocessing "
                 "now normalises the fresh float copy in place (one full-size temporary instead of three)"
                 + (": " + "; ".join(f"{v['ratio_out_of_place_over_in_place']:.2f}x faster than out of place at "
                                     f"{bs}" for bs, v in pp.items()) if pp else "")
                 + " (section 1), which also shrinks the large chunk's penalty. Before both changes, the report on "
                 "this machine measured chunks of 4096 vs 1000 at 2.03x in part 1 and 4.11 s vs 3.13 s of MLP "
                 "evaluation per run (with 1000 as the comparison chunk and 5 runs).")
    probs.append("**Host synchronisations on CUDA (fixed, not verifiable here).** `evaluate` used three "
                 "`torch.bincount` per chunk, and PyTorch's CUDA bincount reads `self.min().cpu()` and "
                 "`self.max().item()` to size its output (`_bincount_cuda_template` in "
                 "`aten/src/ATen/native/cuda/SummaryOps.cu`); `ContinualModule._eval_step` had the same pattern. "
                 "Both now use one `index_add_` per chunk into a fixed-size buffer, which needs no host read. "
                 "Checked here on CPU: the callback's counts equal the `bincount` reference in every part-1 case; "
                 "the absence of syncs on a GPU was not measured (no GPU on this machine).")
    if "stream_end_check" in extra:
        chk = extra["stream_end_check"]

        def case(k):
            v = chk[k]
            return (f"{v['evaluations']} evaluations, `on_stream_end` called {v['stream_end_calls']}x, "
                    f"{v['metrics']} metrics, CSV {'written' if v['csv_written'] else 'missing'}")

        probs.append("**No metrics or CSV with `ContinualTrainer(eval_after_task=False)` (fixed).** "
                     "`ContinualTrainer._finish` returned before calling `on_stream_end`; it now always calls it. "
                     f"Checked: eval_after_task=True -> {case('True')}; False -> {case('False')}. This benchmark no "
                     "longer calls `on_stream_end` itself, and every part-2 clframe run asserts one call.")
    if p1:
        small = min(p1, key=lambda r: r["samples"])
        there = f" (evaluate / bare {by_chunk[D]['ratio_evaluate_over_bare']:.3f} there)" if D in by_chunk else ""
        probs.append(f"**Fixed per-call cost (unchanged).** About {small['fixed_overhead_us']:.0f} us per evaluation "
                     f"(smallest case: {small['ratio_evaluate_over_bare']:.2f}x the bare forward for "
                     f"{small['samples']} samples): irrelevant at the protocol's 5 x 1,000 samples on CPU{there}, "
                     "but the mode bookkeeping grows with the number of submodules (section 1) and on a GPU, where "
                     "the forward is short, it is a visible share. Restoring only the flags that changed, or "
                     "`module.train(was_training)` when all flags agree, would cut it.")
    mlp = [s2 for p2, s2 in parts2 if p2["tag"] == "mlp"]
    if mlp:
        r = ratios_of(mlp[0])[0]
        met = r["per_run_by_difference"] >= 5
        probs.append(f"**The 5x goal against Avalanche with the MLP on CPU: {'met' if met else 'not met'}** "
                     f"({r['per_run_by_difference']:.1f}x per run). "
                     + ("" if met else "It is bounded by the forward pass, not by the callback: with zero overhead "
                        f"outside the forward, clframe could reach at most {r['bound_by_forward_per_run']:.1f}x "
                        "(Avalanche's evaluation time / the time inside clframe's forward), and the time outside the "
                        "forward is already a small share (section 2); the linear model (2b) shows the framework "
                        "overhead ratio."))
    for n in probs:
        w(f"- {n}")
    w("")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "continual_eval_overhead.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="runs of each part-2 variant (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="fewer part-1 repeats (a smoke test)")
    parser.add_argument("--skip-part1", action="store_true", help="only the whole-run comparison")
    parser.add_argument("--skip-part2", action="store_true", help="only the single-evaluation timings")
    args = parser.parse_args()
    start = time.perf_counter()
    mach = machine()
    data = os.environ.get("CLFRAME_DATA", "")
    command = " ".join(["CLFRAME_DATA=" + (shlex.quote(data) if data else "..."), "python",
                        "benchmarks/continual_eval_overhead.py", *map(shlex.quote, sys.argv[1:])])
    p1, extra = ([], {}) if args.skip_part1 else part1(args.quick)
    parts2 = []
    if not args.skip_part2:
        for hidden, nometrics, tag in (((400, 400), True, "mlp"), ((), False, "linear")):
            p2 = part2(args.reps, hidden, nometrics, tag)
            parts2.append((p2, summarize_part2(p2)))
    total = time.perf_counter() - start
    write_report(command, mach, p1, extra, parts2, total)
    raw = {"command": command, "machine": mach, "total_s": total, "part1": p1, "checks": extra,
           "part2": [{**p2, "summary": s2} for p2, s2 in parts2]}
    (RESULTS / "continual_eval_overhead.json").write_text(json.dumps(raw, indent=1, default=float))
    print(f"wrote {RESULTS / 'continual_eval_overhead.md'} ({total:.0f} s)")


if __name__ == "__main__":
    main()
