"""Pretrain the small ViT that the small-scale prompt configs (``configs/prompt/*_tiny_cifar10.yaml``) freeze.

Tiny-ImageNet-200 train (the offline copy has the first 100 images of each class: 20k images; the full
100k set is used when the data root has it), 64 px images downsized once to 32 px, pixels in [0, 1] (the
configs leave ``backbone_mean``/``backbone_std`` unset). timm ``vit_tiny_patch16_224`` built with
``img_size=32, patch_size=4``, D = 192, 6 blocks, 3 heads (2.73 M parameters); AdamW, linear warm-up then
cosine, pad-4 random crop + flip, timm ``Mixup`` (mixup 0.8 / cutmix 1.0, label smoothing 0.1 folded into
the soft targets), drop-path 0.1, bf16 autocast on a GPU, seeded. Reports top-1 on Tiny-ImageNet valid
and saves

- ``runs/backbones/vit_tiny_tinyimagenet.pt``: the timm state dict, head included (``load_vit_checkpoint``
  drops the head; the prompt strategies train their own); also written at every evaluation, so a run
  stopped early keeps its latest weights;
- ``runs/backbones/vit_tiny_tinyimagenet.json``: the training record (arguments, per-epoch loss and
  accuracy, wall time, throughput).

One command (the defaults are the run behind benchmarks/RESULTS.md: 85 epochs, 6.3 min on one NVIDIA
H100 while other jobs shared the GPU; on 2 CPU cores the same run would take many hours)::

    CLFRAME_DATA=/path/to/data python benchmarks/pretrain_backbone.py

``--score runs/backbones/vit_tiny_tinyimagenet.pt`` scores a saved checkpoint on the whole valid split.
``--time-budget-min M`` times 30 steps first and sets ``--epochs`` to what fits M minutes (the recorded run:
``--time-budget-min 5.5`` -> 85 epochs); ``--bench 30`` only measures throughput (images/s) and exits.
The recorded run reached 17.6 % top-1 on the first 4,000 valid images (43 % on training images; the full
10k valid score is in benchmarks/RESULTS.md). An earlier CPU run of a 227k-parameter ViT (patch 8, D = 64,
4 blocks, 3 epochs, 23 minutes on 2 shared cores) reached only 2.3 %: too weak for any prompt comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="clframe data root (default: $CLFRAME_DATA, then clframe's default)")
    p.add_argument("--out", default=str(ROOT / "runs/backbones/vit_tiny_tinyimagenet.pt"))
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--epochs", type=int, default=85)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $OMP_NUM_THREADS or 2)")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate on valid every N epochs (and at the end)")
    p.add_argument("--bench", type=int, default=0, help="only time this many training steps, then exit")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (timm Mixup; 0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (timm Mixup; 0: off)")
    p.add_argument("--score", default=None, metavar="CHECKPOINT",
                   help="only score a saved checkpoint (this architecture) on the whole valid split, then exit")
    p.add_argument("--time-budget-min", type=float, default=0.0,
                   help="if > 0: time 30 steps first and set --epochs to what fits this many minutes of training")
    return p.parse_args()


def load_data(root: str | None, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiny-ImageNet as uint8 tensors (N, 3, size, size), resized once (area averaging) from 64 px."""
    from clframe.data.sources import load_source

    data = load_source("tiny_imagenet", root=root)

    def shrink(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == size:
            return x.contiguous()
        out = [F.interpolate(x[i:i + 2048].float(), size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)
               for i in range(0, len(x), 2048)]
        return torch.cat(out)

    return shrink(data.train_x), data.train_y, shrink(data.test_x), data.test_y


def crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Pad-``padding`` random crop and horizontal flip per image (zero padding), float batch."""
    b, _, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    rows = torch.arange(h, device=x.device)[None] + dy[:, None]  # (b, h)
    cols = torch.arange(w, device=x.device)[None].expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (b, w)
    idx_b = torch.arange(b, device=x.device)[:, None, None, None]
    idx_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[idx_b, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device).float().div_(255)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(xb)
        correct += int((logits.argmax(1).cpu() == y[i:i + batch].cpu()).sum())
    model.train()
    return correct / len(x)


def save(model: torch.nn.Module, record: dict, out: Path) -> None:
    """The timm state dict (head included) and the training record next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
    record["checkpoint"] = str(out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    import timm

    t0 = time.time()
    train_x, train_y, valid_x, valid_y = load_data(args.data_root, args.img_size)
    n_classes = int(train_y.max()) + 1
    load_s = time.time() - t0
    print(f"data: train {tuple(train_x.shape)}, valid {tuple(valid_x.shape)}, {n_classes} classes ({load_s:.1f}s)",
          flush=True)

    if device.type == "cuda":  # 20k images at 32 px are 61 MB: keep them on the GPU, no loader needed
        train_x, train_y = train_x.to(device), train_y.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    mixer = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup

        mixer = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                      num_classes=n_classes)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(args.seed)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=n_classes,
                                  img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                                  depth=args.depth, num_heads=args.heads, drop_path_rate=args.drop_path).to(device)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n]
        no_decay = [p for n, p in model.named_parameters()
                    if not (p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
        return model, opt

    model, opt = build()
    if args.score:
        model.load_state_dict(torch.load(args.score, map_location=device, weights_only=True))
        top1 = evaluate(model, valid_x, valid_y, device)
        print(json.dumps({"checkpoint": args.score, "valid_top1": round(top1, 4), "valid_images": len(valid_x)}))
        return
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(train_x) // args.batch_size  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    def train_step(step: int, idx: torch.Tensor) -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = idx.to(train_x.device)
        xb = crop_flip(train_x[idx].to(device).float().div_(255), gen)
        yb = train_y[idx].to(device)
        with autocast:
            if mixer is not None:  # soft targets (mixup / cutmix, label smoothing folded in)
                xb, soft = mixer(xb, yb)
                loss = torch.sum(-soft * F.log_softmax(model(xb).float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(model(xb).float(), yb, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    model.train()
    if args.time_budget_min > 0:  # size the run: time 30 steps (after a warm-up), then rebuild from the seed
        idx = torch.randperm(len(train_x), generator=gen)
        for s in range(5):
            train_step(0, idx[s * args.batch_size:(s + 1) * args.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        for s in range(30):
            train_step(0, idx[s * args.batch_size:(s + 1) * args.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s = (time.time() - t) / 30
        args.epochs = max(1, int(args.time_budget_min * 60 / (step_s * steps_per_epoch)))
        print(f"{step_s * 1000:.1f} ms/step, {steps_per_epoch} steps/epoch: {args.epochs} epochs fit "
              f"{args.time_budget_min} min", flush=True)
        model, opt = build()
        gen.manual_seed(args.seed)
        total = steps_per_epoch * args.epochs
        warmup = int(args.warmup_epochs * steps_per_epoch)
    if args.bench:
        idx = torch.randperm(len(train_x), generator=gen)
        train_step(0, idx[:args.batch_size])  # warm-up
        t = time.time()
        for s in range(args.bench):
            train_step(s, idx[s * args.batch_size:(s + 1) * args.batch_size])
        ips = args.bench * args.batch_size / (time.time() - t)
        t = time.time()
        evaluate(model, valid_x[:2000], valid_y[:2000], device)
        eval_ips = 2000 / (time.time() - t)
        print(json.dumps({"params": n_params, "train_img_per_s": round(ips, 1), "eval_img_per_s": round(eval_ips, 1),
                          "epoch_s": round(len(train_x) / ips, 1), "threads": threads}))
        return

    record: dict = {"args": vars(args), "device": str(device), "threads": threads, "params": n_params,
                    "train_images": len(train_x), "valid_images": len(valid_x), "classes": n_classes,
                    "architecture": {"timm_name": "vit_tiny_patch16_224", "img_size": args.img_size,
                                     "patch_size": args.patch_size, "embed_dim": args.embed_dim, "depth": args.depth,
                                     "num_heads": args.heads},
                    "input": "pixels in [0, 1], no mean/std normalisation", "epochs": []}
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train_x), generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            losses.append(train_step(step, perm[b * args.batch_size:(b + 1) * args.batch_size]))
            step += 1
        entry = {"epoch": epoch + 1, "train_loss": round(sum(losses) / len(losses), 4), "seconds": round(time.time() - start, 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            entry["valid_top1"] = round(evaluate(model, valid_x, valid_y, device), 4)
            save(model, record, Path(args.out))  # a run stopped early keeps its latest evaluated weights
        record["epochs"].append(entry)
        print(json.dumps(entry), flush=True)
    train_s = time.time() - start
    top1 = record["epochs"][-1]["valid_top1"]
    train_top1 = evaluate(model, train_x[:5000], train_y[:5000], device)
    record.update({"valid_top1": top1, "train_top1_first5k": round(train_top1, 4), "train_seconds": round(train_s, 1),
                   "train_img_per_s": round(total * args.batch_size / train_s, 1)})
    out = Path(args.out)
    save(model, record, out)
    print(f"valid top-1 {top1:.4f} (train top-1 {train_top1:.4f}), {train_s / 60:.1f} min; saved {out}", flush=True)


if __name__ == "__main__":
    main()
