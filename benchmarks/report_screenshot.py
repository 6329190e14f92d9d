"""Render reports/report.html in headless Chromium and save a PNG per window width, to check that the
static page opens offline and draws (tables, matplotlib's inline SVG charts, base64 thumbnails) without a
server or the network, on a desktop and a laptop screen.

    python benchmarks/report_screenshot.py [--html reports/report.html] [--out build/report_screenshot.png]
                                           [--width 1440 1280 1024] [--height 2400]

With several widths each PNG is named <out>_<width>.png. Needs Chromium (`apt-get install -y chromium`).
Prints each PNG's path, its size and the render time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Offline, no profile state, no first-run UI: the page must render from the file alone.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def find_chromium() -> str:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install -y chromium")


def screenshot(html: Path, out: Path, width: int, height: int, timeout_s: float = 120) -> float:
    """Render ``html`` to ``out`` (PNG) at ``width`` x ``height``; returns seconds taken."""
    if not html.exists():
        raise SystemExit(f"{html} not found: run `python -m pipeline report` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out.resolve()}",
               f"--window-size={width},{height}", html.resolve().as_uri()]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0 or not out.exists():
        sys.stderr.write(result.stderr[-2000:])
        raise SystemExit(f"chromium failed (exit {result.returncode})")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path, default=Path("reports/report.html"))
    parser.add_argument("--out", type=Path, default=Path("build/report_screenshot.png"))
    parser.add_argument("--width", type=int, nargs="+", default=[1280], help="window width(s) in pixels")
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    for width in args.width:
        out = args.out if len(args.width) == 1 else args.out.with_name(f"{args.out.stem}_{width}{args.out.suffix}")
        seconds = screenshot(args.html, out, width, args.height)
        print(f"{out} ({out.stat().st_size / 1024:.0f} KB, {width}x{args.height}) in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
