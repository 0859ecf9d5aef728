"""Benchmark the run report on a large run: its size, the time to make it and the time it takes to open.

    python -m benchmarks.report --images 1000 --output bench-out/report-1000

Runs the job first where OUTPUT holds no run yet (held-out demo captions, masks saved, the config's model), then
makes the report with workflows.report and opens it in headless Chromium (Debian's `chromium`) three times.
Printed: images, page size in MB, seconds to make it, and seconds from navigation to the page's script having
drawn every mask (`body[data-ready]`), median of the three openings. Not a test: the figures depend on the
machine and on whatever else runs on it.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sparsevar.demo.scenes import held_out_captions
from storage.metadata import read_metadata
from workflows.report import write_report


def ensure_run(output: Path, images: int, config: str) -> None:
    """Run the job on `images` held-out captions unless OUTPUT already holds that many images."""
    if (output / "metadata").is_dir() and read_metadata(str(output), columns=["status"]).num_rows >= images:
        return
    prompts = output.parent / f"{output.name}-prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": c, "id": f"p{i}"}) + "\n"
                               for i, c in enumerate(held_out_captions(images))))
    command = [sys.executable, "-m", "workflows.generate", "--config", config, "--prompts", str(prompts),
               "--output", str(output), "--set", "output.save_masks=true", "--set", "output.report=false"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def open_seconds(page_file: Path, chromium: str) -> float:
    """Seconds from navigation start to every mask drawn, as the page's own clock gives them."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(page_file.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        seconds = page.evaluate("performance.now()") / 1e3
        browser.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--output", default="bench-out/report-1000")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--gallery", type=int, default=24)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: needs Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    output = Path(args.output).resolve()
    ensure_run(output, args.images, args.config)
    started = time.perf_counter()
    write_report(str(output), gallery_size=args.gallery)
    made_s = time.perf_counter() - started
    page_file = output / "report" / "index.html"
    opened = [open_seconds(page_file, chromium) for _ in range(3)]
    rows = read_metadata(str(output), columns=["status"]).num_rows
    print(f"| images | page MB | made in s | opens in s (median of 3) |\n|---|---|---|---|\n"
          f"| {rows} | {page_file.stat().st_size / 1e6:.2f} | {made_s:.2f} | {statistics.median(opened):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
