"""The measurements of ``perf.py continual-eval`` (method in ``CONTINUAL_EVAL_DOC``, ``perf_continual_eval.py``):
part 1, one evaluation against the bare forward passes; part 2, whole per-iteration-evaluated runs of
clframe and Avalanche."""

from __future__ import annotations

import copy
import inspect
import tempfile
import time
from pathlib import Path
from statistics import median

import lightning as L
import torch
from perf_avalanche import make_avalanche_counter
from timing import clock, interleaved, quartiles, quiet
from torch import nn
from torch.nn import functional as F

from clframe.callbacks import ContinualEvaluation
from clframe.data.datamodule import ContinualDataModule
from clframe.strategies import ER, Finetune
from clframe.trainer import ContinualTrainer

MLP = {"hidden_sizes": [400, 400], "init": "default"}
DEFAULT_CHUNK = inspect.signature(ContinualEvaluation).parameters["eval_batch_size"].default
BIG_CHUNK = 4096  # the default before it was lowered; kept for comparison
# The clframe variants of part 2: JSON key -> eval_batch_size.
CLFRAME_EVALS = {"clframe_eval": DEFAULT_CHUNK, f"clframe_eval_bs{BIG_CHUNK}": BIG_CHUNK}
BASELINE = {**dict.fromkeys(CLFRAME_EVALS, "clframe_noeval"),
            "avalanche_eval": "avalanche_noeval", "avalanche_eval_nometrics": "avalanche_noeval"}


def trainer_kwargs(root: str) -> dict:
    return dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=root)




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


def ce_run_clframe(stream, init_state, hidden, eval_batch_size: int | None, root: str) -> dict:
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
    with quiet(), clock() as t:
        trainer.fit(module, datamodule=dm)
    out = {"wall_s": t["wall"], "iterations": trainer.global_step, "module": module}
    if cb:
        assert cb.stream_end_calls == 1 and cb.metrics and (Path(root) / "continual_eval.csv").exists()
        out.update(evaluations=len(cb.steps), eval_calls=cb.eval_calls, eval_direct_s=cb.eval_seconds,
                   last_eval_acc=cb.accuracy[-1], samples_evaluated=sum(cb._offsets[k + 1] for k in cb.trained_task),
                   subset_data=cb._data, stability_metrics=dict(cb.metrics), eval_forward_s=fwd.seconds,
                   eval_forward_calls=fwd.calls, stream_end_calls=cb.stream_end_calls)
    return out


def ce_avalanche_benchmark(stream, subsets):
    from avalanche.benchmarks import tensors_benchmark

    x_all, y_all, t_all = subsets
    train, test = [], []
    for task in stream.tasks:
        x, y, _ = task.train.__getitems__(list(range(len(task.train))))
        train.append([x, y])
        sel = t_all == task.id
        test.append([x_all[sel], y_all[sel]])
    return tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0] * len(stream.tasks))


def ce_run_avalanche(bm, init_state, mean, std, hidden, with_eval: bool, metrics: bool) -> dict:
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
    with clock() as timed:
        for t, exp in enumerate(bm.train_stream):
            strategy.train(exp, eval_streams=[bm.test_stream[: t + 1]], reset_optimizer_state=True)
    wall = timed["wall"]
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
    bm = ce_avalanche_benchmark(stream, subsets)
    torch.manual_seed(0)
    init_state = copy.deepcopy(clframe_model(None, hidden).state_dict())  # the one initialisation of every run
    mean, std = stream.mean[0], stream.std[0]
    x_all, y_all, t_all = subsets
    variants = {name: (lambda root, bs=bs: ce_run_clframe(stream, init_state, hidden, bs, root))
                for name, bs in {**CLFRAME_EVALS, "clframe_noeval": None}.items()}
    variants.update({
        "avalanche_eval": lambda root: ce_run_avalanche(bm, init_state, mean, std, hidden, True, True),
        "avalanche_eval_nometrics": lambda root: ce_run_avalanche(bm, init_state, mean, std, hidden, True, False),
        "avalanche_noeval": lambda root: ce_run_avalanche(bm, init_state, mean, std, hidden, False, True),
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
