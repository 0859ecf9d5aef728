"""workflows.quality's own parts that need no model: the sample grid and the --only check."""

import numpy as np
import pytest
from PIL import Image

from workflows.quality import main, write_grid


@pytest.mark.parametrize(("count", "columns", "rows"), [(1, 1, 1), (2, 2, 1), (6, 4, 2), (8, 4, 2)])
def test_sample_grid_keeps_every_image(tmp_path, count, columns, rows):
    images = [np.full((4, 6, 3), i, dtype=np.uint8) for i in range(count)]
    write_grid(tmp_path, images, [f"p{i}" for i in range(count)])
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (4 * rows, 6 * columns, 3)
    last = count - 1
    assert (grid[4 * (last // columns), 6 * (last % columns)] == last).all()
    assert (tmp_path / "samples.txt").read_text().split() == [f"p{i}" for i in range(count)]


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
