"""GeRe's general replay set: a small fixed set of generic samples built once and replayed in every task.

It is built from any clframe image source (``digits``, ``tiny_imagenet``, ``hf`` Parquet folders...),
from a plain text file, or from a text column of a Parquet file. The first ``n`` samples in file order
are taken (the reference set is the head of its file, not a random draw), so the set is the same in
every run. :class:`GeneralReplaySampler` decides which general samples go into each training step:
at their natural share (every general sample once per epoch, spread over the epoch's steps) or
exactly ``k`` per *global* batch (the reference code's ``num_interpolate_per_batch``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clframe.data.samplers import epoch_seed
from clframe.data.sources import load_source, resolve_data_root
from clframe.errors import ConfigError
from clframe.models.factory import check_kwargs


@dataclass
class GeneralSet:
    """Fixed general samples: uint8 images with labels of the starting model's own head, or right-padded
    token ids with their attention mask (labels are then the tokens themselves, unless ``labels`` holds
    the token ids because ``inputs`` are something else, e.g. cached hidden states of a frozen prefix)."""

    inputs: Tensor
    labels: Tensor | None = None
    mask: Tensor | None = None
    name: str = "general"

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def is_text(self) -> bool:
        return self.mask is not None


def imagenet_label_map(wnids: Sequence[str]) -> Tensor:
    """ImageNet-1k index of each WordNet id (Tiny-ImageNet's 200 classes are all ImageNet-1k classes),
    so an ImageNet classifier's head can be scored and replayed on them."""
    from timm.data import ImageNetInfo

    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    missing = [w for w in wnids if w not in index]
    if missing:
        raise ValueError(f"{len(missing)} class ids are not ImageNet-1k WordNet ids (e.g. {missing[:3]}); "
                         "load the source with class names as WordNet ids (tiny_imagenet: class_names='wnid')")
    return torch.tensor([index[w] for w in wnids])


def general_from_source(source: str, n: int | None = 1000, split: str = "train", per_class: int | None = None,
                        label_map: str | None = None, data_root: str | None = None,
                        options: dict[str, Any] | None = None) -> GeneralSet:
    """The first ``n`` images of a clframe source split (or the first ``per_class`` of each class), in file order.

    ``label_map="imagenet"`` maps the source's WordNet-id classes to ImageNet-1k indices.
    """
    data = load_source(source, root=data_root, **(options or {}))
    x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
    if per_class is not None:
        keep = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in y.unique()]).sort().values
        x, y = x[keep], y[keep]
    if n is not None:
        x, y = x[:n], y[:n]
    if label_map == "imagenet":
        y = imagenet_label_map(data.class_names)[y]
    elif label_map is not None:
        raise ValueError(f"label_map must be None or 'imagenet', got {label_map!r}")
    return GeneralSet(x.contiguous(), y.long().contiguous(), name=f"{source}:{split}")


_WIKITEXT_HEADING = re.compile(r"^\s*=( =)* .* =( =)*\s*$")


def text_documents(text: str, n: int | None, min_words: int = 8) -> list[str]:
    """Paragraphs of a text (non-empty lines with at least ``min_words`` words, WikiText headings skipped),
    in order, at most ``n``."""
    docs = [line.strip() for line in text.splitlines()
            if len(line.split()) >= min_words and not _WIKITEXT_HEADING.match(line)]
    return docs if n is None else docs[:n]


def tokenize_documents(docs: Sequence[str], tokenizer: Any, max_length: int) -> GeneralSet:
    """Token ids without special tokens, truncated to ``max_length`` and right-padded (pads keep the
    positions of the real tokens, as the anchors computed without padding need)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.bos_token_id or 0)
    rows = [tokenizer(d, add_special_tokens=False)["input_ids"][:max_length] for d in docs]
    rows = [r for r in rows if len(r) >= 2]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return GeneralSet(ids, mask=mask)


def general_from_text(path: str | Path, tokenizer: Any, n: int | None = 1000, max_length: int = 563,
                      min_words: int = 8, data_root: str | None = None) -> GeneralSet:
    """The first ``n`` paragraphs of a text file (relative paths are looked up under the data root)."""
    file = Path(path)
    if not file.is_absolute() and not file.exists():
        file = resolve_data_root(data_root) / file
    general = tokenize_documents(text_documents(file.read_text(encoding="utf-8"), n, min_words), tokenizer, max_length)
    general.name = file.name
    return general


def general_from_parquet_text(path: str | Path, tokenizer: Any, column: str = "text", n: int | None = 1000,
                              max_length: int = 563, data_root: str | None = None) -> GeneralSet:
    """The first ``n`` non-empty rows of a Parquet file's text column (e.g. a SlimPajama chunk)."""
    import pyarrow.parquet as pq

    file = Path(path)
    if not file.is_absolute() and not file.exists():
        file = resolve_data_root(data_root) / file
    texts = [t for t in pq.read_table(file, columns=[column]).column(column).to_pylist() if t and t.strip()]
    general = tokenize_documents(texts if n is None else texts[:n], tokenizer, max_length)
    general.name = file.name
    return general


def build_general_set(spec: dict[str, Any] | GeneralSet, tokenizer: Any = None) -> GeneralSet:
    """A general set from a config mapping: ``{source: name, ...}``, ``{text_file: path, ...}`` or
    ``{parquet: path, column: text, ...}``; other keys go to the matching builder."""
    if isinstance(spec, GeneralSet):
        return spec
    spec = dict(spec)
    n = spec.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"the general set's n must be a positive number of samples (or null for all), got {n!r}")
    if "source" in spec:
        builder, args = general_from_source, (spec.pop("source"),)
    elif tokenizer is None:
        raise ValueError("a text general set needs a tokenizer: use a language-model backbone (hf_causal_lm, smollm2)")
    elif "text_file" in spec:
        builder, args = general_from_text, (spec.pop("text_file"), tokenizer)
    elif "parquet" in spec:
        builder, args = general_from_parquet_text, (spec.pop("parquet"), tokenizer)
    else:
        raise ValueError(f"a general set spec needs one of 'source', 'text_file', 'parquet'; got keys {sorted(spec)}")
    check_kwargs(f"general set ({builder.__name__})", builder, spec, skip=("source", "path", "tokenizer"),
                 where="general")
    general = builder(*args, **spec)
    if len(general) == 0:
        raise ConfigError(f"the general set built from {spec} is empty; point it at data with samples, or raise n")
    return general


class GeneralReplaySampler:
    """Which general samples join each training step; a pure function of ``(seed, epoch, step)``.

    - ``k=None`` (natural share): every general sample once per epoch, in a fresh random order,
      spread evenly over the epoch's steps, so the share is ``n_general / (n_task + n_general)`` as when
      the set is concatenated to the task data (without the random batch-to-batch variation).
    - ``k`` given: exactly ``k`` general samples per *global* batch (all ranks together), drawn from
      successive reshuffles of the set (cycling); under DDP rank ``r`` takes positions ``r, r + W, ...``
      of the global draw, so the ranks' shares are disjoint and add up to ``k``.

    Deterministic for a fixed seed, so a run resumed mid-epoch replays what the original run would.
    """

    def __init__(self, n_general: int, k: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n_general < 1:
            raise ValueError("the general set is empty")
        if k is not None and k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.n, self.k, self.seed, self.rank, self.world_size = n_general, k, seed, rank, world_size

    def _perm(self, cycle: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, cycle)))

    def global_indices(self, epoch: int, step: int, steps_per_epoch: int) -> Tensor:
        """The general indices of global batch ``step`` of ``epoch`` (all ranks)."""
        if self.k is None:
            lo, hi = step * self.n // steps_per_epoch, (step + 1) * self.n // steps_per_epoch
            return self._perm(epoch)[lo:hi]
        if self.k == 0:
            return torch.empty(0, dtype=torch.long)
        start = (epoch * steps_per_epoch + step) * self.k
        cycles = range(start // self.n, (start + self.k - 1) // self.n + 1)
        stream = torch.cat([self._perm(c) for c in cycles])
        offset = start - cycles[0] * self.n
        return stream[offset: offset + self.k]

    def indices(self, epoch: int, step: int, steps_per_epoch: int, accumulate: int = 1) -> Tensor:
        """This rank's share of the general indices of micro-batch ``step``.

        With gradient accumulation over ``accumulate`` micro-batches, one global batch spans that many
        steps: its draw is split over them (micro-batch ``m`` takes positions ``m, m + A, ...``), so
        ``k`` still counts per optimizer step, all ranks and micro-batches together.
        """
        if accumulate > 1:
            batches = -(-steps_per_epoch // accumulate)
            draw = self.global_indices(epoch, step // accumulate, batches)[step % accumulate:: accumulate]
        else:
            draw = self.global_indices(epoch, step, steps_per_epoch)
        return draw[self.rank:: self.world_size]
