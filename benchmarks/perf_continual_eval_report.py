"""The Markdown report of ``perf.py continual-eval`` (tables, what distorts the comparison, problems found)."""

from __future__ import annotations

from perf_continual_eval_runs import BASELINE, BIG_CHUNK, CLFRAME_EVALS, DEFAULT_CHUNK


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


def ce_write_report(command: str, mach: dict, p1: list[dict], extra: dict, parts2: list[tuple[dict, dict]],
                 total_s: float) -> str:
    lines = []
    w = lines.append
    D, B = DEFAULT_CHUNK, BIG_CHUNK
    w("# Continual-evaluation overhead: clframe `ContinualEvaluation` vs bare forwards and vs Avalanche\n")
    w("Produced by `benchmarks/perf.py continual-eval` (method in its section docstring). Command:\n")
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
    return "\n".join(lines)
