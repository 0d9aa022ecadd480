"""The page's rendering helpers on synthetic inputs (no lab, no server)."""
from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from PIL import Image

from app import render


@pytest.mark.parametrize("n_edits", [0, 11, 12, 13, 40, 200])
def test_accuracy_plot_draws_any_number_of_edits(n_edits):
    curve = [0.8 - 0.001 * i for i in range(n_edits + 1)]
    svg = render.accuracy_plot(curve, "editable", 1000)
    ElementTree.fromstring(svg)  # well-formed
    ticks = render.edit_ticks(n_edits)
    assert ticks[0] == 0 and all(isinstance(t, int) for t in ticks) and len(ticks) <= 13
    assert ticks == list(range(n_edits + 1)) if n_edits <= 12 else ticks[-1] > n_edits - (ticks[1] - ticks[0])
    points = re.search(r'points="([^"]*)"', svg).group(1).split()
    assert len(points) == n_edits + 1  # one vertex per curve value
    assert "80.0%" in svg and "1,000 images" in svg
    if n_edits:
        assert f"{-0.1 * n_edits:+.2f} points" in svg


def test_accuracy_plot_puts_higher_accuracy_higher_and_escapes_the_model_name():
    svg = render.accuracy_plot([0.90, 0.95, 0.85], "<b>&", 1000)
    assert "&lt;b&gt;&amp;" in svg and "<b>" not in svg
    ys = [float(p.split(",")[1]) for p in re.search(r'points="([^"]*)"', svg).group(1).split()]
    assert ys[1] < ys[0] < ys[2]  # SVG y grows downwards


@pytest.mark.parametrize("low, high", [(88.0, 92.0), (60.25, 91.5), (99.9, 101.1), (0.0, 100.0)])
def test_value_ticks_are_round_and_inside_the_range(low, high):
    ticks = render.value_ticks(low, high)
    assert 2 <= len(ticks) <= 11 and all(low - 1e-9 <= t <= high + 1e-9 for t in ticks)
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1


def test_image_files_are_written_once_per_distinct_image_and_decode_to_its_pixels():
    files = render.ImageFiles(most=3)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    first = files.path(images[0])
    assert files.path(images[0].clone()) == first  # same pixels, same file
    assert files.path(images[0], scale=8) != first and Image.open(files.path(images[0], scale=8)).size == (256, 256)
    assert np.array_equal(np.asarray(Image.open(first)), images[0].permute(1, 2, 0).numpy())
    paths = [files.path(image) for image in images[1:]]
    assert len(set(paths)) == 4 and all(Path(p).exists() for p in paths[-3:])
    assert not Path(first).exists()  # the least recently used beyond `most` are deleted
    assert sorted(p.name for p in files.folder.iterdir()) == sorted(Path(p).name for p in paths[-3:])
