"""workflows.quality's own parts that need no model: the sample grid and the --only check."""

import numpy as np
import pytest
from PIL import Image

from workflows.quality import caption_strip, main, write_grid


@pytest.mark.parametrize(("count", "columns", "rows"), [(1, 1, 1), (2, 2, 1), (6, 4, 2), (8, 4, 2)])
def test_sample_grid_keeps_every_image_with_its_prompt_under_it(tmp_path, count, columns, rows):
    images = [np.full((40, 60, 3), i, dtype=np.uint8) for i in range(count)]
    write_grid(tmp_path, images, [f"p{i}" for i in range(count)])
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    cell = grid.shape[0] // rows
    assert grid.shape == (cell * rows, 60 * columns, 3) and cell > 40
    for i in range(count):
        top, left = cell * (i // columns), 60 * (i % columns)
        assert (grid[top:top + 40, left:left + 60] == i).all()
        assert grid[top + 40:top + cell, left:left + 60].min() < 128  # the prompt, written in black
    assert (tmp_path / "samples.txt").read_text().split() == [f"p{i}" for i in range(count)]


def test_caption_strip_wraps_long_prompts():
    one_line = caption_strip("a red circle", 128)
    wrapped = caption_strip("a triangle in blue, solid and orange square, checkered, at the bottom left", 128)
    assert one_line.shape[1] == wrapped.shape[1] == 128 and wrapped.shape[0] >= 3 * one_line.shape[0] - 8


def test_unknown_table_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "q"), "--only", "taus"])
    assert exit_info.value.code == 2
    assert "unknown table(s) taus" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_only_writes_the_tables_it_measured(tmp_path):
    assert main(["--out", str(tmp_path), "--only", "alpha", "--prompts", "2", "--batch", "2"]) == 0
    report = (tmp_path / "quality.md").read_text()
    assert "### Dense and the τ grid" in report  # the dense row every table is measured against
    assert report.count("| dense |") == 1 and report.count("| α=") == 4
    assert "### Anchor grid" in report
    for unmeasured in ("### Frequency-aware", "### First sparse stage", "### Score block"):
        assert unmeasured not in report
