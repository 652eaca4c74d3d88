"""Benchmark: `medsig embed` in 1 process against `--processes N` (sharded rows, one writer).

Same images, same tiny SigLIP, fresh store each run, one command line per run as a user runs
it. Prints, per run, the end-to-end wall time of the command (Python start-up, imports and
model load included) and the images/s of medsig's own report (rank 0's clock from the
collection load to the built index), then the speed-up of N processes over 1.

    .venv/bin/python bench/embed_sharded.py [--n 339] [--processes 2] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.embed import make_collection  # noqa: E402
from medsig.models.tiny import write_tiny  # noqa: E402


def run(spec: Path, model: Path, store: Path, processes: int, batch: int) -> dict:
    """One `medsig embed` command; its wall time and the images/s it reports."""
    cmd = [sys.executable, "-m", "medsig.cli", "embed", str(spec), "--model", str(model),
           "--store", str(store), "--batch-size", str(batch), "--processes", str(processes)]
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("OMP_NUM_THREADS", None)  # each run splits the cores over its processes itself
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr[-3000:])
    found = re.search(r"(\d+) embedded.*?\n([\d.]+) images/s", done.stdout, re.S)
    return {"processes": processes, "embedded": int(found.group(1)),
            "images_per_second": float(found.group(2)), "wall_s": round(wall, 2)}


def _median(runs: list[dict], processes: int) -> dict:
    """Median images/s and wall time of the runs with `processes` processes."""
    mine = [r for r in runs if r["processes"] == processes]
    return {key: statistics.median(r[key] for r in mine)
            for key in ("images_per_second", "wall_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=339)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each, order alternating")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "embed-sharded.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medsig-bench-"))
    try:
        spec = make_collection(work, args.n)
        model = write_tiny(work / "model", arch="siglip", image_size=args.image_size,
                           hidden_size=384, layers=6, heads=6, patch_size=16)
        order = [(1, args.processes), (args.processes, 1)]
        runs = [run(spec, model, work / f"q{k}-{p}", p, args.batch_size)
                for k in range(args.repeats) for p in order[k % 2]]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'processes':>9s} {'images/s (report)':>18s} {'wall s (command)':>17s}")
    for r in runs:
        print(f"{r['processes']:9d} {r['images_per_second']:18.1f} {r['wall_s']:17.1f}")
    one, many = (_median(runs, p) for p in (1, args.processes))
    speedup = many["images_per_second"] / one["images_per_second"]
    print(f"medians: 1 process {one['images_per_second']:.1f} images/s ({one['wall_s']:.1f} s), "
          f"{args.processes} processes {many['images_per_second']:.1f} images/s "
          f"({many['wall_s']:.1f} s): speed-up {speedup:.2f}x (report), "
          f"{one['wall_s'] / many['wall_s']:.2f}x (wall); cpu cores: {os.cpu_count()}")
    result = {"n": args.n, "image_size": args.image_size, "cpu_count": os.cpu_count(),
              "load_average": round(os.getloadavg()[0], 1), "runs": runs,
              "median": {"1": one, str(args.processes): many},
              "speedup_report": round(speedup, 2),
              "speedup_wall": round(one["wall_s"] / many["wall_s"], 2)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
