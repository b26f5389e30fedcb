"""Heatmap PNGs (confusion matrix, accuracy matrix) drawn with Pillow alone.

Every run writes a confusion matrix at its end; with matplotlib that picture cost about a quarter of a
second of CPU plus half a second to import pyplot, a visible share of a short run. Pillow (already needed
by torchvision) draws the same picture in a few milliseconds: the cells are one numpy array scaled up,
and only the labels are drawn as text.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colormap = Literal["blues", "viridis"]

# Anchor colours, evenly spaced from the low to the high end; values in between are interpolated linearly.
# "blues": the nine-class ColorBrewer Blues scheme. "viridis": the viridis map sampled at 0, 0.1, ..., 1.
_ANCHORS: dict[str, tuple[str, ...]] = {
    "blues": ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c",
              "#08306b"),
    "viridis": ("#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70",
                "#7ad151", "#bddf26", "#fde725"),
}

_MAX_GRID = 1200  # px: the longer side of the cell grid never exceeds this (the image stays near 1600 px)
_MIN_GRID = 240  # px: tiny grids (1x1, 2x2) are still drawn large enough to read
_MAX_CELL = 48  # px: room for a four-digit count at the cell font size
_PAD = 10
_TICK = 4
_BAR_W = 16
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_FRAME = (64, 64, 64)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's embedded font at `size` px (decoding it takes a few ms, so it is kept)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _draw_centred(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
                  font: ImageFont.ImageFont | ImageFont.FreeTypeFont, fill: tuple[int, int, int]) -> None:
    """Centre by the text's own bounding box (works for bitmap fonts too, which take no `anchor`)."""
    left, top, right, bottom = font.getbbox(text)
    draw.text((xy[0] - (left + right) / 2, xy[1] - (top + bottom) / 2), text, font=font, fill=fill)


def _rotated_text(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """A vertical label (reading bottom to top) as a mask: Pillow cannot draw rotated text directly."""
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (max(1, int(right - left)), max(1, int(bottom - top))), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255)
    return mask.rotate(90, expand=True)


def colorize(values: np.ndarray, colormap: Colormap, vmin: float, vmax: float) -> np.ndarray:
    """RGB uint8 array (..., 3) for `values`; NaN becomes white (a blank cell)."""
    if colormap not in _ANCHORS:
        raise ValueError(f"colormap must be one of {sorted(_ANCHORS)}, got {colormap!r}")
    anchors = np.array([[int(h[k:k + 2], 16) for k in (1, 3, 5)] for h in _ANCHORS[colormap]], float)
    v = np.asarray(values, float)
    t = np.clip((np.nan_to_num(v, nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0) * (len(anchors) - 1)
    lo = np.minimum(t.astype(int), len(anchors) - 2)
    frac = (t - lo)[..., None]
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac
    rgb[np.isnan(v)] = _WHITE
    return np.rint(rgb).astype(np.uint8)


def _text_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    """Black on light cells, white on dark ones (perceived brightness, ITU-R BT.601 weights)."""
    return _WHITE if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 128 else _BLACK


def _tick_step(n: int, cell: float, room: int) -> int:
    """Label every `step`-th index, with step from 1, 2, 5, 10, 20, 50, ... so labels never overlap."""
    for k in itertools.count():
        step = (1, 2, 5)[k % 3] * 10 ** (k // 3)
        if step * cell >= room or step >= n:
            return step
    raise AssertionError("unreachable")


def _bar_ticks(vmin: float, vmax: float, height: int, label_h: int) -> list[float]:
    """Five evenly spaced colour-bar values, fewer when the bar is too short for them."""
    for n in (5, 3, 2):
        if height >= (n - 1) * (label_h + 6):
            return list(np.linspace(vmin, vmax, n))
    return [vmin, vmax]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def write_heatmap(values: np.ndarray, path: str | Path, *, title: str = "", xlabel: str = "",
                  ylabel: str = "", cell_text: Sequence[Sequence[str]] | None = None,
                  colormap: Colormap = "blues", vmin: float = 0.0, vmax: float = 1.0,
                  colorbar_label: str = "") -> Path:
    """Write `values` (rows x cols, NaN = blank cell) as a PNG heatmap with a colour bar; returns the path.

    `cell_text` (same shape, "" for none) is printed in each cell in black or white by the cell's
    brightness (never in a NaN cell, nor where it does not fit); pass None for large grids. The file is
    written under a temporary name in the same folder and then renamed, so a reader never sees half a PNG.
    """
    v = np.asarray(values, float)
    if v.ndim != 2 or 0 in v.shape:
        raise ValueError(f"a heatmap needs a non-empty 2-D array, got shape {v.shape}")
    if not vmax > vmin:
        raise ValueError(f"vmax must exceed vmin, got vmin={vmin}, vmax={vmax}")
    rows, cols = v.shape
    if cell_text is not None and (len(cell_text) != rows or any(len(r) != cols for r in cell_text)):
        raise ValueError(f"cell_text must have the shape of values, {rows} x {cols}")
    longest = max(rows, cols)
    cell = min(max(_MAX_CELL, _MIN_GRID / longest), _MAX_GRID / longest)
    cell = int(cell) if cell >= 1 else cell  # whole pixels per cell while there is room for them
    gw, gh = max(1, round(cols * cell)), max(1, round(rows * cell))
    cw, ch = gw / cols, gh / rows  # the actual cell size after rounding the grid

    title_font, label_font, tick_font = _font(14), _font(12), _font(11)
    cell_font = _font(11 if min(cw, ch) >= 30 else max(7, int(min(cw, ch) * 0.38)))

    tick_w = _text_size(tick_font, "8" * len(str(longest - 1)))[0]  # the widest index label, near enough
    tick_h = _text_size(tick_font, "0123456789")[1]
    bar_values = _bar_ticks(vmin, vmax, gh, tick_h)
    bar_w = max(_text_size(tick_font, _fmt(b))[0] for b in bar_values)
    title_h = _text_size(title_font, title)[1] if title else 0
    xlabel_h = _text_size(label_font, xlabel + "gy")[1] if xlabel else 0
    ylabel_mask = _rotated_text(ylabel, label_font) if ylabel else None
    bar_mask = _rotated_text(colorbar_label, label_font) if colorbar_label else None

    top = _PAD + (title_h + _PAD if title else 0)
    left = _PAD + (ylabel_mask.width + 8 if ylabel_mask else 0) + tick_w + _TICK + 3
    bar_x = left + gw + 20
    right_edge = bar_x + _BAR_W + _TICK + 3 + bar_w + (8 + bar_mask.width if bar_mask else 0) + _PAD
    bottom_edge = top + gh + _TICK + 3 + tick_h + (8 + xlabel_h if xlabel else 0) + _PAD
    width = max(right_edge, (_text_size(title_font, title)[0] if title else 0) + 2 * _PAD)
    tallest_label = max(m.height if m else 0 for m in (ylabel_mask, bar_mask))
    height = max(bottom_edge, top + tallest_label + _PAD)  # a vertical label may outgrow a short grid

    image = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(image)
    rgb = colorize(v, colormap, vmin, vmax)
    grid = Image.fromarray(rgb, "RGB")
    grid = grid.resize((gw, gh), Image.Resampling.NEAREST if gw >= cols else Image.Resampling.BOX)
    image.paste(grid, (left, top))
    draw.rectangle((left - 1, top - 1, left + gw, top + gh), outline=_FRAME)

    if cell_text is not None:
        for i in range(rows):
            for j in range(cols):
                text = cell_text[i][j]
                if text and not np.isnan(v[i, j]) and _text_size(cell_font, text)[0] <= cw - 2:
                    _draw_centred(draw, (left + (j + 0.5) * cw, top + (i + 0.5) * ch), text, cell_font,
                                  _text_colour(rgb[i, j]))

    for j in range(0, cols, _tick_step(cols, cw, tick_w + 6)):
        x = left + (j + 0.5) * cw
        draw.line((x, top + gh, x, top + gh + _TICK), fill=_FRAME)
        _draw_centred(draw, (x, top + gh + _TICK + 3 + tick_h / 2), str(j), tick_font, _BLACK)
    for i in range(0, rows, _tick_step(rows, ch, tick_h + 8)):
        y = top + (i + 0.5) * ch
        draw.line((left - 1 - _TICK, y, left - 1, y), fill=_FRAME)
        tw = _text_size(tick_font, str(i))[0]
        _draw_centred(draw, (left - _TICK - 4 - tw / 2, y), str(i), tick_font, _BLACK)

    # colour bar: one column of values from vmax (top) to vmin (bottom), stretched sideways
    ramp = colorize(np.linspace(vmax, vmin, gh)[:, None], colormap, vmin, vmax)
    image.paste(Image.fromarray(ramp, "RGB").resize((_BAR_W, gh)), (bar_x, top))
    draw.rectangle((bar_x - 1, top - 1, bar_x + _BAR_W, top + gh), outline=_FRAME)
    for b in bar_values:
        y = top + (vmax - b) / (vmax - vmin) * (gh - 1)
        draw.line((bar_x + _BAR_W, y, bar_x + _BAR_W + _TICK, y), fill=_FRAME)
        text = _fmt(b)
        tw = _text_size(tick_font, text)[0]
        _draw_centred(draw, (bar_x + _BAR_W + _TICK + 3 + tw / 2, y), text, tick_font, _BLACK)
    if bar_mask is not None:
        x = bar_x + _BAR_W + _TICK + 3 + bar_w + 8
        image.paste(_BLACK, (x, top + max(0, (gh - bar_mask.height) // 2)), bar_mask)

    if title:  # centred over the grid, shifted only as far as needed to stay inside the image
        half = _text_size(title_font, title)[0] / 2
        x = min(max(left + gw / 2, half + _PAD), width - half - _PAD)
        _draw_centred(draw, (x, _PAD + title_h / 2), title, title_font, _BLACK)
    if xlabel:
        _draw_centred(draw, (left + gw / 2, top + gh + _TICK + 3 + tick_h + 8 + xlabel_h / 2), xlabel,
                      label_font, _BLACK)
    if ylabel_mask is not None:
        image.paste(_BLACK, (_PAD, top + max(0, (gh - ylabel_mask.height) // 2)), ylabel_mask)

    return _save_atomic(image, Path(path))


def _save_atomic(image: Image.Image, path: Path) -> Path:
    """Write to a temporary name beside `path`, then rename over it (a rename within a folder is atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
