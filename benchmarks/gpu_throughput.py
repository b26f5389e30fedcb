"""Training throughput of ER and DER++ on Seq-CIFAR-10 with ResNet-18: clframe against two plain loops.

    CLFRAME_DATA=/path/to/data timeout 540 python benchmarks/gpu_throughput.py --device cuda      # the GPU run
    python benchmarks/gpu_throughput.py --device cpu --steps 5 --rounds 1 --synthetic 256 --nf 8  # CPU smoke run

The DER paper's setting: the 32x32 ResNet-18 (``--nf 64``), plain SGD (lr 0.03), batch 32 new + 32 replayed
(DER++: two replayed batches of 32), a reservoir memory of 500 samples updated every step, random crop
(zero padding 4) + horizontal flip on every training input, new and replayed. Measured, per strategy:

* ``clframe``: ``ContinualTrainer`` + ``ER`` / ``DERpp`` with the data module's device-resident path
  (``device_resident=True``), checkpointing, logging and the progress bar off, ``check_finite_loss=False``
  (its per-step host sync is the documented "last bit of speed" switch; the plain loops do not check either);
* ``clframe_host``: the same with ``device_resident=False`` (batches gathered on the host and copied over);
* ``plain_device``: a hand-written loop over the same uint8 tensors kept on the device: one gather per batch,
  the same batched crop+flip, a reservoir buffer on the device, no framework;
* ``plain_loader``: the same loop fed the way Mammoth and Avalanche feed it: a ``torch.utils.data.DataLoader``
  over PIL images with torchvision's ``RandomCrop(32, 4)``, ``RandomHorizontalFlip``, ``ToTensor`` and
  ``Normalize`` per sample, ``--workers`` worker processes (Mammoth's default 4), pinned memory. Its replay
  part is the device-side one of ``plain_device``, so the two plain loops differ only in how new batches arrive;
* ``plain_mammoth``: ``plain_loader`` plus Mammoth's handling of replayed samples: copied to the host, augmented
  one by one with the same torchvision transforms on PIL images, copied back (its buffers' ``get_data``).

Every variant trains the first ``--tasks`` tasks (2 classes each) for ``--warmup`` + ``--steps`` steps per
task; the timed part is each task's steps after its first ``--warmup``: wall clock from the end of the last
warm-up step to the end of the task's last step (waits for batches included), the device synchronised at
those two points only, so the host may queue work ahead of the device as in a real run.
Throughput is new (stream) images per second: ``32 x timed steps / seconds``. Rounds interleave the variants,
the order reversed every other round; medians over rounds are reported, with ratios of medians. Results go
to ``--out`` (JSON and Markdown), rewritten after every round, so a run stopped by ``timeout`` or
``--time-limit`` keeps the finished rounds. Nothing is downloaded: CIFAR-10 comes from ``CLFRAME_DATA``
(``cifar10-jpeg`` or torchvision's layout), or ``--synthetic N`` draws N random images per class instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clframe import ContinualDataModule, ContinualTrainer  # noqa: E402
from clframe.data.augment import crop_flip  # noqa: E402
from clframe.data.scenarios import class_incremental  # noqa: E402
from clframe.data.sources import SourceData, load_source  # noqa: E402
from clframe.models.factory import create_backbone  # noqa: E402
from clframe.models.speed import prepare_backbone, to_float  # noqa: E402
from clframe.strategies import ER, DERpp  # noqa: E402

STRATEGIES = ("er", "derpp")
SIDES = ("clframe", "clframe_host", "plain_device", "plain_loader", "plain_mammoth")
BATCH, MEMORY, LR, ALPHA, BETA = 32, 500, 0.03, 0.2, 0.5  # Mammoth's best_args for seq-cifar10, buffer 500


def load_data(synthetic: int | None) -> SourceData:
    if synthetic is None:
        return load_source("cifar10")
    gen = torch.Generator().manual_seed(0)
    n = 10 * synthetic
    return SourceData("synthetic-cifar10", torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                      torch.arange(n) % 10, torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=gen),
                      torch.arange(100) % 10, [str(c) for c in range(10)], (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of each task's steps after its first ``warmup`` ones, the device synchronised only where the
    timed part starts and ends (so the host may run ahead of the device, as it does in a real run)."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.per_task, self.device = warmup, warmup + steps, device
        self.seconds, self.steps = 0.0, 0
        self.task_start()

    def task_start(self) -> None:
        self.count, self.start = 0, None

    def step_end(self) -> None:
        self.count += 1
        if self.count in (self.warmup, self.per_task):
            sync(self.device)
            now = time.perf_counter()
            if self.count == self.warmup:
                self.start = now
            elif self.start is not None:
                self.seconds += now - self.start
                self.steps += self.per_task - self.warmup

    def images_per_second(self) -> float:
        return BATCH * self.steps / self.seconds if self.seconds else float("nan")


class _LightningStopwatch(L.Callback):
    def __init__(self, watch: Stopwatch) -> None:
        self.watch = watch

    def on_train_start(self, trainer, pl_module) -> None:
        self.watch.task_start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.watch.step_end()


# ---------------------------------------------------------------------------------------------- clframe
def run_clframe(strategy: str, stream, args, device: torch.device, on_device: bool) -> Stopwatch:
    L.seed_everything(0, verbose=False)
    watch = Stopwatch(args.warmup, args.steps, device)
    data = ContinualDataModule.from_stream(stream, batch_size=BATCH, train_transforms="cifar_crop_flip",
                                           device_resident=on_device)
    common = dict(backbone="resnet18", backbone_kwargs={"nf": args.nf}, lr=LR, buffer_size=MEMORY,
                  replay_batch_size=BATCH, mask_unseen_classes=False, check_finite_loss=False,
                  memory_format=args.memory_format, compile_backbone=args.compile)
    model = ER(**common) if strategy == "er" else DERpp(alpha=ALPHA, beta=BETA, **common)
    trainer = ContinualTrainer(steps_per_task=args.warmup + args.steps, eval_after_task=False, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                               accelerator=device.type, devices=1, precision=args.precision,
                               callbacks=[_LightningStopwatch(watch)])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(model, datamodule=data)
    return watch


# ---------------------------------------------------------------------------------------------- plain loops
class Net(nn.Module):
    def __init__(self, nf: int, memory_format: str, compile: bool) -> None:
        super().__init__()
        self.backbone = create_backbone("resnet18", (3, 32, 32), nf=nf)
        self.head = nn.Linear(self.backbone.num_features, 10)
        prepare_backbone(self.backbone, memory_format, compile)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class DeviceReservoir:
    """Algorithm R on the device: raw uint8 images, labels and (DER++) logits; the count stays on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seen, self.store = device, 0, {}

    def add(self, **values: Tensor) -> None:
        n = len(values["y"])
        if not self.store:
            self.store = {k: torch.zeros((MEMORY, *v.shape[1:]), dtype=v.dtype, device=self.device) for k, v in values.items()}
        pos = torch.arange(self.seen, self.seen + n, device=self.device)
        draw = (torch.rand(n, device=self.device, dtype=torch.float64) * (pos + 1)).long()
        slot = torch.where(pos < MEMORY, pos, draw)
        keep = slot < MEMORY  # rows of one batch that drew the same slot: one of them wins (no exact replay needed)
        rows = keep.nonzero().flatten()
        for k, v in values.items():
            self.store[k].index_put_((slot[rows],), v[rows])
        self.seen += n

    def sample(self) -> dict[str, Tensor] | None:
        size = min(self.seen, MEMORY)
        if size == 0:
            return None
        idx = torch.randperm(size, device=self.device)[:BATCH]
        return {k: v[idx] for k, v in self.store.items()}


def plain_loop(strategy: str, batches: Callable[[int], object], n_tasks: int, args, device: torch.device,
               mean: Tensor, std: Tensor, replay_prepare: Callable[[Tensor], Tensor] | None = None) -> Stopwatch:
    """ER or DER++ over ``batches(task)`` (an iterator of ``(float normalised x, y, raw uint8 x)``); replayed raw
    images go through ``replay_prepare`` (default: the batched crop+flip on the device)."""
    torch.manual_seed(0)
    net = Net(args.nf, args.memory_format, args.compile).to(device)
    watch, buffer = Stopwatch(args.warmup, args.steps, device), DeviceReservoir(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def prepare(raw: Tensor) -> Tensor:
        if replay_prepare is not None:
            return replay_prepare(raw)
        return to_float(crop_flip(raw), args.memory_format).div_(255).sub_(mean).div_(std)

    for task in range(n_tasks):
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        watch.task_start()
        for x, y, raw in batches(task):
            opt.zero_grad(set_to_none=True)
            with autocast:
                if strategy == "er":
                    replay = buffer.sample()
                    if replay is not None:
                        x, targets = torch.cat([x, prepare(replay["x"])]), torch.cat([y, replay["y"]])
                    else:
                        targets = y
                    loss = F.cross_entropy(net(x), targets)
                else:
                    out = net(x)
                    loss = F.cross_entropy(out, y)
                    first, second = buffer.sample(), buffer.sample()
                    if first is not None:
                        loss = loss + ALPHA * F.mse_loss(net(prepare(first["x"])), first["logits"])
                        loss = loss + BETA * F.cross_entropy(net(prepare(second["x"])), second["y"])
            loss.backward()
            opt.step()
            extra = {"logits": out.detach().float()} if strategy == "derpp" else {}
            buffer.add(x=raw, y=y, **extra)
            watch.step_end()
    return watch


def device_batches(stream, steps: int, device: torch.device, prepare: Callable[[Tensor], Tensor]):
    """The plain loop's device-resident feed: each task's tensors copied once, a permutation per epoch."""
    def per_task(task: int):
        train = stream.tasks[task].train
        x_all, y_all = train.inputs[train.indices].to(device), train.labels[train.indices].to(device)
        gen = torch.Generator(device=device).manual_seed(task)
        done = 0
        while done < steps:
            order = torch.randperm(len(y_all), device=device, generator=gen)
            for idx in order.split(BATCH):
                if done == steps:
                    return
                raw = x_all[idx]
                yield prepare(raw), y_all[idx], raw
                done += 1
    return per_task


class PILTask(torch.utils.data.Dataset):
    """One task's images as a torchvision-style data set: HWC uint8 arrays, PIL per item, v1 transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return self.transform(img), int(self.labels[i]), torch.from_numpy(self.images[i]).permute(2, 0, 1)


def torchvision_transform(mean, std):
    """The per-sample training transform of Mammoth's seq-cifar10 (torchvision v1, on PIL images)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def host_replay_prepare(device: torch.device, mean, std, memory_format: str) -> Callable[[Tensor], Tensor]:
    """Mammoth's way with replayed samples: back to the host, one PIL transform per sample, back to the device."""
    from torchvision.transforms.functional import to_pil_image

    transform = torchvision_transform(mean, std)

    def prepare(raw: Tensor) -> Tensor:
        x = torch.stack([transform(to_pil_image(img)) for img in raw.cpu()]).to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else x
    return prepare


def loader_batches(stream, steps: int, device: torch.device, workers: int, mean, std, memory_format: str):
    transform = torchvision_transform(mean, std)

    def per_task(task: int):
        train = stream.tasks[task].train
        data = PILTask(train.inputs[train.indices].permute(0, 2, 3, 1).contiguous().numpy(),
                       train.labels[train.indices].numpy(), transform)
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                                             pin_memory=device.type == "cuda", persistent_workers=False,
                                             generator=torch.Generator().manual_seed(task))
        done = 0
        while done < steps:
            for x, y, raw in loader:
                if done == steps:
                    return
                x = x.to(device, non_blocking=True)
                if memory_format == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(device, non_blocking=True), raw.to(device, non_blocking=True)
                done += 1
    return per_task


# ---------------------------------------------------------------------------------------------- driver
def run_variant(name: str, stream, args, device: torch.device) -> float:
    strategy, side = name.split(":")
    if side.startswith("clframe"):
        return run_clframe(strategy, stream, args, device, on_device=side == "clframe").images_per_second()
    mean = torch.tensor(stream.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(stream.std, device=device).view(1, 3, 1, 1)
    steps = args.warmup + args.steps
    if side == "plain_device":
        feed = device_batches(stream, steps, device,
                              lambda raw: to_float(crop_flip(raw), args.memory_format).div_(255).sub_(mean).div_(std))
    else:
        feed = loader_batches(stream, steps, device, args.workers, stream.mean, stream.std, args.memory_format)
    host = host_replay_prepare(device, stream.mean, stream.std, args.memory_format) if side == "plain_mammoth" else None
    return plain_loop(strategy, feed, args.tasks, args, device, mean, std, host).images_per_second()


def loader_rate(stream, device: torch.device, on_device: bool, epochs: int) -> float:
    """Batches per second of clframe's training loader alone over task 0 (``--loader-only``): the data path
    with no model, to see whether the device-resident mode pays on a given device."""
    data = ContinualDataModule.from_stream(stream, batch_size=BATCH, device_resident=on_device)
    trainer = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_progress_bar=False)
    data.trainer = trainer
    loader = data.train_dataloader()
    batches, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)
        for x, y, t in loader:
            x, y, t = (v.to(device, non_blocking=True) for v in (x, y, t))  # Lightning's batch transfer
            batches += 1
    sync(device)
    return batches / (time.perf_counter() - start)


def summarize(results: dict[str, list[float]]) -> tuple[dict, str]:
    med = {k: statistics.median(v) for k, v in results.items() if v}
    lines = ["| strategy | " + " | ".join(SIDES) + " | clframe / plain_device | plain_device / plain_loader | "
             "clframe / plain_loader | clframe / plain_mammoth |", "|---" * (len(SIDES) + 5) + "|"]
    ratios = {}
    for s in STRATEGIES:
        get = {side: med.get(f"{s}:{side}") for side in SIDES}
        if None in get.values():
            continue
        r = (get["clframe"] / get["plain_device"], get["plain_device"] / get["plain_loader"],
             get["clframe"] / get["plain_loader"], get["clframe"] / get["plain_mammoth"])
        names = ("clframe/plain_device", "plain_device/plain_loader", "clframe/plain_loader", "clframe/plain_mammoth")
        ratios[s] = dict(zip(names, r, strict=True))
        lines.append(f"| {s} | " + " | ".join(f"{get[side]:.0f}" for side in SIDES) + " | "
                     + " | ".join(f"{v:.2f}" for v in r) + " |")
    return {"median_images_per_second": med, "ratios": ratios}, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200, help="timed steps per task")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps at the start of every task (at least 1)")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nf", type=int, default=64, help="ResNet-18 width (64: the DER network)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of plain_loader (Mammoth: 4)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"])
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (every side)")
    p.add_argument("--synthetic", type=int, default=None, metavar="N", help="N random images per class, no data")
    p.add_argument("--variants", default=None, help="comma-separated subset, e.g. er:clframe,er:plain_device")
    p.add_argument("--time-limit", type=float, default=480.0, help="start no new round after this many seconds")
    p.add_argument("--source", default="cifar10", help="data source of --loader-only (e.g. mnist)")
    p.add_argument("--loader-only", type=int, default=0, metavar="EPOCHS",
                   help="time clframe's training loader alone (both modes) over EPOCHS epochs of task 0")
    p.add_argument("--out", default="benchmarks/results/gpu_throughput")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    begin = time.perf_counter()
    source = load_source(args.source) if args.loader_only and args.source != "cifar10" else load_data(args.synthetic)
    stream = class_incremental(source, n_tasks=5, seed=0)
    stream = dataclasses.replace(stream, tasks=stream.tasks[: args.tasks])  # the tasks every side trains
    variants = args.variants.split(",") if args.variants else [f"{s}:{side}" for s in STRATEGIES for side in SIDES]
    results: dict[str, list[float]] = {v: [] for v in variants}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for r in range(args.rounds):
        if args.loader_only:
            for on_device in ((True, False) if r % 2 == 0 else (False, True)):
                name = "loader:" + ("device_resident" if on_device else "host")
                results.setdefault(name, []).append(loader_rate(stream, device, on_device, args.loader_only))
                print(f"round {r} {name}: {results[name][-1]:.0f} batches/s", flush=True)
            continue
        if r and time.perf_counter() - begin > args.time_limit:
            print(f"time limit reached after {r} rounds", flush=True)
            break
        for name in variants if r % 2 == 0 else variants[::-1]:
            results[name].append(run_variant(name, stream, args, device))
            print(f"round {r} {name}: {results[name][-1]:.1f} images/s", flush=True)
        summary, table = summarize(results)
        record = {"args": vars(args), "device": gpu, "torch": torch.__version__, "rounds": results, **summary}
        out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        out.with_suffix(".md").write_text(f"Device: {gpu}; torch {torch.__version__}; {vars(args)}\n\n"
                                          f"Median stream images/s over {r + 1} round(s):\n\n{table}\n")
    if args.loader_only:
        med = {k: statistics.median(v) for k, v in results.items() if v}
        table = "\n".join(f"{k}: median {v:.0f} batches/s over {len(results[k])} rounds" for k, v in med.items())
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "device": gpu, "rounds": results,
                                                        "median_batches_per_second": med}, indent=2))
        out.with_suffix(".md").write_text(f"Device: {gpu}; {vars(args)}\n\n{table}\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
