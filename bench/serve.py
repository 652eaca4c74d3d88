"""Benchmark: POST /v1/predict throughput, latency and memory under load, with and without
micro-batching.

Starts `medsig.serve` in a subprocess on 127.0.0.1 (loopback only, default limits: 64
requests in progress, 256 waiting per batcher), then for 1, 32, 64 and 128 concurrent
clients sends at most --requests requests (or stops after --seconds) and prints requests/s
answered 200, p50 / p95 latency of those, the mean model batch size, the 503 (busy) answers,
any other 5xx (must be 0) and the server's peak resident memory during that load (sampled
from /proc every 20 ms). A client that gets 503 retries after 50 ms (not the advised
Retry-After of 1 s, to keep the pressure on). Without --model it trains a probe on a tiny
random SigLIP and 80 generated wound images first (a few seconds).

    .venv/bin/python bench/serve.py [--model DIR] [--requests 300] [--seconds 20]
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
import threading
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


class PeakRss:
    """Peak resident memory (MB) of a process while in the `with` block (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        self.file = Path(f"/proc/{pid}/status")
        self.peak = 0.0
        self._stop = threading.Event()

    def _rss(self) -> float:
        try:
            for line in self.file.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


async def load(url: str, images: list[bytes], clients: int, requests: int, seconds: float
               ) -> dict[str, float]:
    latencies: list[float] = []
    batches: list[int] = []
    codes: dict[int, int] = {}
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
                try:
                    r = await client.post("/v1/predict", files={"file": ("x.jpg", data)})
                    code = r.status_code
                except httpx.HTTPError:
                    code = 599  # connection refused / reset: a failure, not backpressure
                if record:
                    codes[code] = codes.get(code, 0) + 1
                if code == 503:
                    await asyncio.sleep(0.05)
                elif code == 200 and record:
                    latencies.append(time.perf_counter() - start)
                    batches.append(r.json()["timing"]["batch_size"])

        await asyncio.gather(*(worker(2 * clients, False) for _ in range(clients)))  # warm-up
        sent = 0
        start = time.perf_counter()
        await asyncio.gather(*(worker(requests, True) for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {"ok": len(latencies), "rps": len(latencies) / wall,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "batch": float(np.mean(batches)) if batches else float("nan"),
            "busy": codes.get(503, 0),
            "other_5xx": sum(n for c, n in codes.items() if c >= 500 and c != 503),
            "other": sum(n for c, n in codes.items() if c < 500 and c != 200)}


def predict_bench(model: Path, images: list[bytes], clients: list[int], requests: int,
                  seconds: float) -> list[tuple[str, int, dict[str, float]]]:
    """Every client count against a fresh server with batching off, then on."""
    rows = []
    for batching in (False, True):
        port = free_port()
        proc = start_server(model, port, batching)
        try:
            for c in clients:
                with PeakRss(proc.pid) as mem:
                    res = asyncio.run(load(f"http://{HOST}:{port}", images, c, requests,
                                           seconds))
                res["peak_mb"] = mem.peak
                rows.append(("on" if batching else "off", c, res))
                print(f"batching {rows[-1][0]:>3}, {c:>3} clients: {res['rps']:.1f} req/s, "
                      f"{res['busy']} busy", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(10)
    return rows


def print_predict(rows: list[tuple[str, int, dict[str, float]]], what: str) -> None:
    print(f"\nPOST /v1/predict on {what} ({os.cpu_count()} CPUs, loopback; a shared machine: "
          "timings are indicative)")
    print(f"{'batching':>8} {'clients':>7} {'200 ok':>7} {'req/s':>7} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'batch':>6} {'503':>5} {'5xx!':>5} {'4xx':>4} {'peak MB':>8}")
    for mode, c, r in rows:
        print(f"{mode:>8} {c:>7} {r['ok']:>7} {r['rps']:>7.1f} {r['p50']:>8.1f} "
              f"{r['p95']:>8.1f} {r['batch']:>6.1f} {r['busy']:>5} {r['other_5xx']:>5} "
              f"{r['other']:>4} {r['peak_mb']:>8.0f}")
    bad = sum(r["other_5xx"] for _, _, r in rows)
    print(f"5xx other than 503: {bad} (must be 0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="Trained model folder (default: a tiny one).")
    ap.add_argument("--requests", type=int, default=300, help="Requests per configuration.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Time limit per configuration.")
    ap.add_argument("--clients", default="1,32,64,128", help="Concurrent clients to try.")
    ap.add_argument("--search-points", type=int, default=0,
                    help="Measure /v1/search at this many indexed points instead (e.g. 100000).")
    ap.add_argument("--_serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batching", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.search_points:
        bench_search(args.search_points, args.requests, [int(c) for c in args.clients.split(",")])
        return
    if args._serve:  # the server process, with the limits `medsig serve` uses
        import uvicorn

        from medsig.serve import ServeSettings, create_app
        from medsig.serve.cli import backstop_limit

        settings = ServeSettings(batching=args.batching, api_key=None)
        app = create_app(args._serve, settings=settings)
        uvicorn.run(app, host=HOST, port=args.port, log_level="warning", access_log=False,
                    limit_concurrency=backstop_limit(settings.max_concurrency))
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
        rows = predict_bench(model, images, clients, args.requests, args.seconds)
    print_predict(rows, str(model) if args.model else "a tiny SigLIP probe")


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
