"""The job's progress display: counts, rate, time left and τ, as a plain line when the output is not a terminal."""

import io

from storage.metadata import metadata_table
from workflows.progress import JobProgress


def rows(n: int, tau: float | None) -> object:
    return metadata_table([{"prompt_id": f"p{i}", "prompt": "p", "seed": i, "model": "tiny", "status": "ok",
                            "tau": tau} for i in range(n)])


def test_plain_lines_come_at_most_every_interval_and_at_the_end():
    now = [0.0]
    out = io.StringIO()
    progress = JobProgress(10, out, every_s=30.0, clock=lambda: now[0], tty=False)
    now[0] = 10.0
    progress.update(rows(2, 0.5))
    assert out.getvalue() == ""  # under the interval: nothing yet
    now[0] = 40.0
    progress.update(rows(2, 0.25))
    assert out.getvalue().splitlines() == ["progress: 4/10 images (40%), 0.10 images/s, ETA 00:01:00, τ 0.250"]
    now[0] = 50.0
    progress.update(rows(6, None))  # dense rows keep the last τ
    progress.close()
    assert out.getvalue().splitlines()[-1] == "progress: 10/10 images (100%), 0.20 images/s, ETA 00:00:00, τ 0.250"


def test_a_terminal_gets_a_live_bar_and_counts_never_pass_the_total():
    out = io.StringIO()
    progress = JobProgress(3, out, tty=True)
    progress.update(rows(2, 0.5))
    progress.update(rows(2, 0.5))  # rows of a failed attempt generated again
    progress.close()
    assert progress.done == 3 and "3/3" in out.getvalue() and "τ=0.500" in out.getvalue()
