"""Benchmark: POST /v1/predict throughput and latency, with and without micro-batching.

Starts `medsig.serve` in a subprocess on 127.0.0.1 (loopback only), then for 1, 8 and 32
concurrent clients sends at most --requests requests (or stops after --seconds) and prints
requests/s, p50 / p95 latency and the mean model batch size. Without --model it trains a
probe on a tiny random SigLIP and 80 generated wound images first (a few seconds).

    .venv/bin/python bench/serve.py [--model DIR] [--requests 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"


def tiny_model(work: Path) -> tuple[Path, list[Path]]:
    from medsig.data.collection import load_collection
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny
    from medsig.train.probe import train_probe

    tiny = write_tiny(work / "tiny", arch="siglip", image_size=64, seed=0)
    spec = synthesize("wound", work / "data", n=80, seed=0, image_size=128)
    model = train_probe(spec, tiny, work / "probe")
    return Path(model), load_collection(spec).image_paths[:16]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, batching: bool) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--_serve", str(model), "--port", str(port)]
    if batching:
        cmd.append("--batching")
    env = {**os.environ, "MEDSIG_API_KEY": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


async def load(url: str, images: list[bytes], clients: int, requests: int, seconds: float
               ) -> dict[str, float]:
    latencies: list[float] = []
    batches: list[int] = []
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker(limit: int, record: bool) -> None:
            nonlocal sent
            while sent < limit and time.perf_counter() < deadline:
                data = images[sent % len(images)]
                sent += 1
                start = time.perf_counter()
                r = await client.post("/v1/predict", files={"file": ("x.jpg", data)})
                r.raise_for_status()
                if record:
                    latencies.append(time.perf_counter() - start)
                    batches.append(r.json()["timing"]["batch_size"])

        await asyncio.gather(*(worker(2 * clients, False) for _ in range(clients)))  # warm-up
        sent = 0
        start = time.perf_counter()
        await asyncio.gather(*(worker(requests, True) for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"requests": len(ms), "rps": len(ms) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "batch": float(np.mean(batches))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="Trained model folder (default: a tiny one).")
    ap.add_argument("--requests", type=int, default=200, help="Requests per configuration.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Time limit per configuration.")
    ap.add_argument("--clients", default="1,8,32", help="Concurrent clients to try.")
    ap.add_argument("--_serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batching", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serve:  # the server process
        import uvicorn

        from medsig.serve import ServeSettings, create_app

        app = create_app(args._serve, settings=ServeSettings(batching=args.batching,
                                                             api_key=None))
        uvicorn.run(app, host=HOST, port=args.port, log_level="warning", access_log=False)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from medsig.models.predictor import load_predictor  # noqa: F401 (fail early)

            model, paths = args.model, []
        else:
            model, paths = tiny_model(Path(tmp))
        if not paths:
            from medsig.data.synth import synthesize

            spec = synthesize("wound", Path(tmp) / "q", n=16, seed=1, image_size=128)
            paths = sorted((spec.parent / "images").glob("*.jpg"))
        images = [p.read_bytes() for p in paths]
        clients = [int(c) for c in args.clients.split(",")]
        rows = []
        for batching in (False, True):
            port = free_port()
            proc = start_server(model, port, batching)
            try:
                for c in clients:
                    res = asyncio.run(load(f"http://{HOST}:{port}", images, c, args.requests,
                                           args.seconds))
                    rows.append(("on" if batching else "off", c, res))
                    print(f"batching {rows[-1][0]:>3}, {c:>2} clients: {res['rps']:.1f} req/s",
                          file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(10)
    print(f"\nPOST /v1/predict on {model if args.model else 'a tiny SigLIP probe'} "
          f"({os.cpu_count()} CPUs, loopback)")
    print(f"{'batching':>8} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'batch':>6}")
    for mode, c, r in rows:
        print(f"{mode:>8} {c:>7} {r['requests']:>8} {r['rps']:>8.1f} {r['p50']:>8.1f} "
              f"{r['p95']:>8.1f} {r['batch']:>6.1f}")


if __name__ == "__main__":
    main()
