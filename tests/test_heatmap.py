"""The Pillow heatmaps: readable PNGs of sane size for any grid, blank NaN cells, and no matplotlib import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clframe.callbacks.heatmap import colorize, write_heatmap
from clframe.callbacks.plots import plot_accuracy_matrix, plot_confusion_matrix


def _confusion(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 20, (n, n)) + np.diag(rng.integers(500, 1100, n))


@pytest.mark.parametrize("n", [1, 10, 100, 200])
def test_confusion_matrix_png_loads_with_a_sane_size(tmp_path: Path, n: int) -> None:
    path = plot_confusion_matrix(_confusion(n), tmp_path / "confusion_matrix.png")
    assert path == tmp_path / "confusion_matrix.png"
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert 250 <= im.width <= 1600 and 250 <= im.height <= 1600
    assert [p.name for p in tmp_path.iterdir()] == ["confusion_matrix.png"]  # no temporary file left behind


def test_accuracy_matrix_with_fewer_rows_than_columns(tmp_path: Path) -> None:
    matrix = np.full((3, 5), np.nan)
    for i in range(3):
        matrix[i, : i + 1] = 0.9 - 0.1 * np.arange(i + 1)
    path = plot_accuracy_matrix(matrix.tolist(), tmp_path / "accuracy_matrix.png")
    with Image.open(path) as im:
        assert im.width > im.height  # the grid keeps its shape: wider than tall


def test_nan_cells_are_blank(tmp_path: Path) -> None:
    """The NaN cell is white where its neighbour, drawn with the darkest colour, starts one cell later."""
    rgb = colorize(np.array([[np.nan, 0.0]]), "viridis", 0, 1)
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, 1]) == (0x44, 0x01, 0x54)
    path = write_heatmap(np.array([[np.nan, 0.0]]), tmp_path / "h.png", colormap="viridis",
                         cell_text=[["x", "y"]])
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    dark = np.abs(pixels - [0x44, 0x01, 0x54]).sum(-1) <= 3
    ys, xs = np.nonzero(dark)
    x0 = xs.min()  # the dark cell's left edge (the colour bar lies further right)
    column = np.nonzero(dark[:, x0])[0]
    y0, y1 = column.min(), column.max()
    width = int(np.argmin(dark[y0, x0:]))  # the dark run along the cell's top row
    nan_cell = pixels[y0:y1 + 1, x0 - width + 1:x0 - 1]
    assert (nan_cell == 255).all()  # blank: no colour and no text


def test_colormap_ends_and_midpoint() -> None:
    rgb = colorize(np.array([0.0, 50.0, 100.0, -5.0, 200.0]), "blues", 0, 100)
    assert tuple(rgb[0]) == (0xF7, 0xFB, 0xFF) and tuple(rgb[2]) == (0x08, 0x30, 0x6B)
    assert tuple(rgb[3]) == tuple(rgb[0]) and tuple(rgb[4]) == tuple(rgb[2])  # values outside are clipped
    assert tuple(rgb[1]) == (0x6B, 0xAE, 0xD6)  # the middle anchor of the nine


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-D"):
        write_heatmap(np.zeros(3), tmp_path / "h.png")
    with pytest.raises(ValueError, match="cell_text"):
        write_heatmap(np.zeros((2, 2)), tmp_path / "h.png", cell_text=[["a"]])
    with pytest.raises(ValueError, match="colormap"):
        write_heatmap(np.zeros((2, 2)), tmp_path / "h.png", colormap="jet")  # type: ignore[arg-type]


def test_writing_a_confusion_matrix_does_not_import_matplotlib(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from clframe.callbacks.plots import plot_confusion_matrix, plot_accuracy_matrix\n"
        f"plot_confusion_matrix(np.eye(10) * 90 + 1, {str(tmp_path / 'c.png')!r})\n"
        f"plot_accuracy_matrix([[0.9, float('nan')], [0.5, 0.8]], {str(tmp_path / 'a.png')!r})\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=60)
    assert (tmp_path / "c.png").is_file() and (tmp_path / "a.png").is_file()
