"""``perf.py prompt-cost``: parameters, ViT passes and inference time of the prompt methods (method in
``PROMPT_COST_DOC``)."""

from __future__ import annotations

import argparse
from statistics import median

from timing import ROOT, interleaved

PROMPT_COST_DOC = """Cost of the prompt methods of ``benchmarks/suites/prompt.yaml``: trainable parameters, ViT forward passes per
image and inference time per image, measured on the model each config builds after the last of 5 tasks.

A timing harness, so not a suite: it builds each model in memory (random weights: the cost does not depend on them) and
times ``batch`` random images at batch 256 on one CPU thread, median of 5 after one warm-up pass::

    python benchmarks/perf.py prompt-cost  # every method of the suite
    python benchmarks/perf.py prompt-cost l2p ovor
"""

METHODS = ("l2p", "dualprompt", "coda_prompt", "oneprompt", "ovor", "linear_probe", "ncm")


def measure_cost(config: str, batch: int = 256, repeats: int = 5) -> dict:
    """Trainable parameters and inference cost of the model a config builds (after the last of 5 tasks)."""
    import torch

    from clframe.cli import ContinualCLI

    torch.set_num_threads(1)
    cli = ContinualCLI(args=["--config", str(ROOT / "configs/prompt" / f"{config}_tiny_cifar10.yaml"),
                             "--model.checkpoint_path=null", "--model.pretrained=false"], run=False)
    model = cli.model
    model.num_tasks = 5  # before building: DualPrompt's E-pool and CODA-P's components are per task
    model._stream_tasks = 5  # what DualPrompt.bind_stream records
    model._build(10, (3, 32, 32), "class")
    model.class_task.copy_(torch.arange(10) // 2)
    model.current_task.fill_(4)
    model.eval()
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        times = interleaved({"forward": lambda: model(x)}, repeats, 1)["forward"]
    return {"config": config, **model.parameter_report(), "vit_passes_per_image": model.forward_passes_per_image,
            "ms_per_image": 1000 * median(times) / batch}


def cmd_prompt_cost(args: argparse.Namespace) -> None:
    print("| method | trainable params | ViT passes / image | ms / image (CPU, 1 thread) |\n|---|---|---|---|")
    for config in args.configs:
        c = measure_cost(config)
        print(f"| {config} | {c['trainable']:,} ({c.get('prompt', 0):,} prompt) | {c['vit_passes_per_image']} "
              f"| {c['ms_per_image']:.2f} |", flush=True)
