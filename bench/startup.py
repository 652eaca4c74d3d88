"""Benchmark: time from the command to the first batch (start-up), old tree vs this one.

Whole-process wall times (median of --repeat runs) of: ``import medsig.cli``,
``medsig --help`` and ``medsig embed --limit <one batch>`` on a tiny model and 16 generated
images (start-up dominates: interpreter, imports, model load, store open, worker start).
``--src`` adds more source trees to compare (e.g. an export of main's ``src``).

    .venv/bin/python bench/startup.py [--src /tmp/main/src] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parents[1] / "src"


def wall(cmd: list[str], src: Path, repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def setup(work: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE))
    from medsig.models.tiny import write_tiny

    model = write_tiny(work / "tiny", arch="siglip", image_size=64)
    (work / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = ["id,file,text"]
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            work / "img" / f"{i}.png")
        lines.append(f"r{i},{i}.png,a skin photo {i}")
    (work / "t.csv").write_text("\n".join(lines) + "\n")
    spec = work / "spec.yaml"
    spec.write_text("name: s\ntable: t.csv\nimage_root: img\n"
                    "columns: {image: file, id: id, text: text}\n")
    return model, spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        model, spec = setup(Path(tmp))
        print(f"{'source tree':<40}{'import cli':>12}{'--help':>10}{'embed 1 batch':>15}")
        for i, src in enumerate([*args.src, HERE]):
            imp = wall([py, "-c", "import medsig.cli"], src, args.repeat)
            hlp = wall([py, "-c", "from medsig.cli import main; import sys; "
                        "sys.argv = ['medsig', '--help']; main()"], src, args.repeat)
            emb = wall([py, "-c", "from medsig.cli import main; main()", "embed", str(spec),
                        "--model", str(model), "--store", str(Path(tmp) / f"q{i}"),
                        "--recreate", "--batch-size", "16", "--workers", "0"], src,
                       args.repeat)
            print(f"{str(src)[-40:]:<40}{imp:>11.2f}s{hlp:>9.2f}s{emb:>14.2f}s", flush=True)


if __name__ == "__main__":
    main()
