"""Benchmark: POST /v1/predict throughput and latency, with and without micro-batching.

Starts `medsig.serve` in a subprocess on 127.0.0.1 (loopback only), then for 1, 8 and 32
concurrent clients sends at most --requests requests (or stops after --seconds) and prints
requests/s, p50 / p95 latency and the mean model batch size. Without --model it trains a
probe on a tiny random SigLIP and 80 generated wound images first (a few seconds).

    .venv/bin/python bench/serve.py [--model DIR] [--requests 200] [--seconds 20]
    .venv/bin/python bench/serve.py --search-points 100000 [--clients 1,8]  # /v1/search
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
    ap.add_argument("--search-points", type=int, default=0,
                    help="Measure /v1/search at this many indexed points instead (e.g. 100000).")
    ap.add_argument("--_serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batching", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.search_points:
        bench_search(args.search_points, args.requests, [int(c) for c in args.clients.split(",")])
        return
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


# -- /v1/search at 100k indexed points (self-contained; flag --search-points) ----------------
def bench_search(points: int, requests: int, clients_list: list[int]) -> None:
    """POST /v1/search (text query, with and without a payload filter) against `points`
    indexed cases in the embedded store, next to the index-only search time in-process.

    The store holds 80 real embeddings of generated wounds (a tiny 768-d SigLIP probe) plus
    clustered 768-d vectors with the same payload layout up to `points`.
    """
    from medsig.data.synth import synthesize
    from medsig.index.runner import embed_collection
    from medsig.index.search import parse_where
    from medsig.index.store import VectorStore, close_store, point_id
    from medsig.models.tiny import write_tiny
    from medsig.train.probe import train_probe

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = write_tiny(work / "tiny", arch="siglip", image_size=64, hidden_size=768,
                          heads=12, seed=0)
        spec = synthesize("wound", work / "data", n=80, seed=0, image_size=96)
        model = train_probe(spec, tiny, work / "probe")
        store = work / "qdrant"
        start = time.perf_counter()
        embed_collection(spec, tiny, store, "cases", num_workers=0, progress=False)
        vs = VectorStore(store, "cases")
        template = vs.get(point_id("wound00000"), with_vectors=False).payload
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(200, 768)).astype(np.float32)
        urgency = ["home care", "needs attention"]
        for s in range(80, points, 2048):
            n = min(2048, points - s)
            label = rng.integers(0, 200, n)
            vec = {k: centres[label] + rng.normal(size=(n, 768)).astype(np.float32)
                   for k in vs.vector_sizes()}
            pay = [{**template, "id": f"x{s + i}", "split": ["train", "val", "test"][i % 3],
                    "labels": {**template["labels"], "urgency": urgency[label[i] % 2]}}
                   for i in range(n)]
            vs.upsert([point_id(p["id"]) for p in pay], vec, pay)
        vs.optimize()
        build_s = time.perf_counter() - start
        where = ["split=test", "labels.urgency=needs attention"]
        qv = centres[:50] + rng.normal(size=(50, 768)).astype(np.float32)
        local = {}
        for name, flt in (("none", None), ("filtered", parse_where(where))):
            times = []
            for q in qv:
                t = time.perf_counter()
                vs.search(q, "image", 10, flt)
                times.append((time.perf_counter() - t) * 1000)
            local[name] = np.percentile(times, [50, 95])
        close_store(store)
        port = free_port()
        cmd = [sys.executable, "-m", "medsig.cli", "serve", "--model", str(model), "--store",
               str(store), "--collection", "cases", "--port", str(port), "--log-level",
               "warning"]
        proc = subprocess.Popen(cmd, env={**os.environ, "MEDSIG_API_KEY": ""},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_health(proc, port)
            rows = [(c, name, asyncio.run(_search_load(f"http://{HOST}:{port}", c, requests,
                                                       None if name == "none" else where)))
                    for c in clients_list for name in ("none", "filtered")]
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"\nPOST /v1/search (text query, k=10) at {points} indexed points, embedded "
          f"Qdrant Edge, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(shared machine); index written and built in {build_s:.0f} s")
    print(f"index only, in-process: search p50/p95 {local['none'][0]:.1f} / "
          f"{local['none'][1]:.1f} ms, filtered ({' AND '.join(where)}) "
          f"{local['filtered'][0]:.1f} / {local['filtered'][1]:.1f} ms")
    print(f"{'clients':>7} {'filter':>8} {'requests':>8} {'req/s':>8} {'p50 ms':>8} "
          f"{'p95 ms':>8}")
    for c, name, r in rows:
        print(f"{c:>7} {name:>8} {r['requests']:>8} {r['rps']:>8.1f} {r['p50']:>8.1f} "
              f"{r['p95']:>8.1f}")


def _wait_health(proc: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 180 s")


async def _search_load(url: str, clients: int, requests: int, where: list[str] | None
                       ) -> dict[str, float]:
    texts = ["an infected wound with redness", "a healing incision", "swelling and pus",
             "dry wound edges", "erythema around staples"]
    latencies: list[float] = []
    sent = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def worker() -> None:
            nonlocal sent
            while sent < requests:
                body = {"text": texts[sent % len(texts)], "k": 10, "where": where or []}
                sent += 1
                t = time.perf_counter()
                r = await client.post("/v1/search", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        await client.post("/v1/search", json={"text": "warm up", "k": 10})
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"requests": len(ms), "rps": len(ms) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95))}


if __name__ == "__main__":
    main()
