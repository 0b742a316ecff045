"""Derivatives of a 24 MP JPEG: memvault's pipeline against a naive Pillow baseline and pyvips.

Run as ``./run bench derivatives [--runs 7] [--rounds 2] [--cpu N]``. It generates a
6000x4000 photo-like JPEG (smooth colour fields plus sensor-like grain, ~8 MB at quality 90),
then, for each variant, starts a fresh Python process pinned to one CPU (``VIPS_CONCURRENCY=1``
for libvips) that makes all three derivatives ``--runs`` times. A fresh process per variant
makes the peak RSS (``VmHWM``, which counts libjpeg's and libvips's allocations outside
Python) that variant's alone. Variants run in turn, ``--rounds`` times, so load from other
processes on this shared machine hits all of them alike.

Variants:

- ``memvault``: ``make_derivatives`` (one DCT-scaled decode, display -> thumb -> placeholder,
  plus the ThumbHash).
- ``naive-pillow``: per output, ``Image.open`` -> ``load`` (a full-size decode; ``thumbnail``
  can no longer use ``draft``) -> ``exif_transpose`` -> ``thumbnail`` -> save. What the issue
  names as the baseline.
- ``pyvips``: the alternative we measured against: JPEG shrink-on-load to the same scale as
  memvault's draft, Lanczos3 to display size, then thumb and placeholder from it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import print_table

WIDTH, HEIGHT = 6000, 4000
DISPLAY, THUMB, PLACEHOLDER = (1920, 1080), (300, 300), (32, 32)


def make_photo(path: Path, seed: int = 24) -> None:
    """A 24 MP JPEG that decodes like a photo: smooth fields, gradients and fine grain."""
    from PIL import Image

    rng = random.Random(seed)
    fields = Image.frombytes("L", (WIDTH // 8, HEIGHT // 8), rng.randbytes(WIDTH * HEIGHT // 64))
    smooth = fields.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    gradient = Image.linear_gradient("L").resize((WIDTH, HEIGHT))
    grain = Image.frombytes("L", (WIDTH, HEIGHT), rng.randbytes(WIDTH * HEIGHT))
    blue = Image.blend(gradient, grain, 0.2)
    Image.merge("RGB", (gradient, smooth, blue)).save(path, "JPEG", quality=90)


# --- variants (run inside the worker process) -------------------------------------------------


def _memvault(path: str) -> list[int]:
    from memvault.derivatives import make_derivatives

    result = make_derivatives(path)
    return [len(d.data) for d in (result.display, result.thumb, result.placeholder)]


def _naive_pillow(path: str) -> list[int]:
    from PIL import Image, ImageOps

    sizes = []
    for box, fmt in ((DISPLAY, "JPEG"), (THUMB, "WEBP"), (PLACEHOLDER, "WEBP")):
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
        image.thumbnail(box)
        buf = io.BytesIO()
        image.save(buf, fmt, quality=80)
        sizes.append(len(buf.getvalue()))
    return sizes


def _pyvips(path: str) -> list[int]:
    import pyvips

    header = pyvips.Image.new_from_file(path)
    shrink = 1
    for candidate in (8, 4, 2):  # the same rule as Pillow's draft: stay >= the display size
        if min(header.width // DISPLAY[0], header.height // DISPLAY[1]) >= candidate:
            shrink = candidate
            break
    loaded = pyvips.Image.new_from_file(path, shrink=shrink, access="sequential")
    display = loaded.thumbnail_image(DISPLAY[0], height=DISPLAY[1], size="down").copy_memory()
    thumb = display.thumbnail_image(THUMB[0], height=THUMB[1]).copy_memory()
    placeholder = thumb.thumbnail_image(PLACEHOLDER[0], height=PLACEHOLDER[1])
    return [
        len(display.jpegsave_buffer(Q=80, keep="none")),
        len(thumb.webpsave_buffer(Q=80, keep="none")),
        len(placeholder.webpsave_buffer(Q=50, keep="none")),
    ]


VARIANTS: dict[str, Callable[[str], list[int]]] = {
    "memvault": _memvault,
    "naive-pillow": _naive_pillow,
    "pyvips": _pyvips,
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def worker(variant: str, path: str, runs: int, cpu: int) -> None:
    """Run one variant ``runs`` times in this (fresh) process and print a JSON line."""
    os.sched_setaffinity(0, {cpu})
    fn = VARIANTS[variant]
    # Import the libraries before reading the idle RSS, so "peak - idle" is pixel memory.
    if variant == "pyvips":
        import pyvips  # noqa: F401
    else:
        import PIL.Image
        import PIL.ImageOps  # noqa: F401

        import memvault.derivatives  # noqa: F401
    idle = _status_kib("VmRSS")
    walls, cpus = [], []
    sizes: list[int] = []
    for _ in range(runs):
        wall, cpu_time = time.perf_counter(), time.process_time()
        sizes = fn(path)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu_time)
    peak = _status_kib("VmHWM")
    print(json.dumps({"walls": walls, "cpus": cpus, "idle": idle, "peak": peak, "sizes": sizes}))


def _spawn(variant: str, path: Path, runs: int, cpu: int) -> dict[str, object]:
    env = {**os.environ, "VIPS_CONCURRENCY": "1"}
    argv = [sys.executable, __file__, "--worker", variant, str(path), str(runs), str(cpu)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--cpu", type=int, default=1, help="the CPU every worker is pinned to")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, path, runs, cpu = args.worker
        worker(variant, path, int(runs), int(cpu))
        return

    with tempfile.TemporaryDirectory(prefix="bench-derivatives-") as tmp:
        photo = Path(tmp) / "photo-24mp.jpg"
        make_photo(photo)
        print(
            f"source: {WIDTH}x{HEIGHT} JPEG, {photo.stat().st_size / 1e6:.1f} MB; "
            f"{args.rounds} processes x {args.runs} runs per variant, pinned to CPU {args.cpu}; "
            f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
            flush=True,
        )
        results: dict[str, list[dict[str, object]]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name in VARIANTS:
                results[name].append(_spawn(name, photo, args.runs, args.cpu))

    def walls(name: str) -> list[float]:
        return [w for r in results[name] for w in r["walls"]]  # type: ignore[attr-defined]

    def cpus(name: str) -> list[float]:
        return [c for r in results[name] for c in r["cpus"]]  # type: ignore[attr-defined]

    def peak(name: str) -> int:
        return max(int(r["peak"]) for r in results[name]) // 1024  # type: ignore[call-overload]

    def growth(name: str) -> int:
        return max(int(r["peak"]) - int(r["idle"]) for r in results[name]) // 1024  # type: ignore[call-overload]

    base_wall = statistics.median(walls("naive-pillow"))
    base_growth = growth("naive-pillow")
    rows = []
    for name in VARIANTS:
        median_wall = statistics.median(walls(name))
        rows.append(
            [
                name,
                f"{median_wall * 1000:.0f}",
                f"{min(walls(name)) * 1000:.0f}",
                f"{statistics.median(cpus(name)) * 1000:.0f}",
                f"{base_wall / median_wall:.2f}",
                str(peak(name)),
                str(growth(name)),
                f"{growth(name) / base_growth:.2f}",
                "/".join(str(s) for s in results[name][-1]["sizes"]),  # type: ignore[attr-defined]
            ]
        )
    print_table(
        [
            "variant",
            "median ms",
            "min ms",
            "median CPU ms",
            "x faster",
            "peak MiB",
            "peak-idle MiB",
            "mem vs naive",
            "bytes display/thumb/placeholder",
        ],
        rows,
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("command: ./run bench derivatives")


if __name__ == "__main__":
    main()
