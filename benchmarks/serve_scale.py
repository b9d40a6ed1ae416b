"""Serving on several replicas (`stadapter serve --ray`, stadapter/runtime/ray_app.py) on a local Ray cluster:
throughput and latency of 1 vs 2 replicas, and what routing by task buys over a task-blind router.

    python benchmarks/serve_scale.py                  # 16 tasks, 4 resident sets per replica, 600 requests
    python benchmarks/serve_scale.py --quick          # 8 tasks, 200 requests
    python benchmarks/serve_scale.py --json out.json

Four runs, each on a freshly deployed app (cold pools), with the same Zipf(1.1) stream of single-task requests
(one small H.264 clip, tiny backbone, CPU) sent by ``--concurrency`` closed-loop clients through the HTTP proxy:

    1 replica                 routed by task (Ray multiplexing)     torch threads: all --cpus
    2 replicas, by task       routed by task                        torch threads: --cpus / 2 each
    2 replicas, task-blind    Ray's default routing (power of two choices on queue length), the task ignored
    1 replica, 2x resident    as the first, with as many resident sets as the two replicas hold together
                              (separates the second replica's memory from its second process)

Per run, after ``--warmup`` requests: throughput (requests/s), p50 and p99 latency (client side), the affinity hit
rate (answers whose ``X-Stadapter-Resident`` is 1: the task's adapter set was on that replica's device before the
request) and cold loads per 1,000 requests (the other answers: each loaded its set from the store). Prints a
table, then as its LAST line one JSON object. Ray's own processes share the machine's cores with the replicas,
so on a small machine 2 replicas cannot be faster than 1: the ratio is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # test_runtime_support: bundles and clips


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_world(tmp: Path, tasks: int) -> tuple[str, Path, list[str]]:
    from stadapter.model.loading import load_backbone
    from stadapter.registry import open_registry
    from test_runtime_support import make_bundle, write_clip

    backbone = load_backbone("tiny", "none")
    db = f"sqlite:///{tmp / 'registry.db'}"
    names = [f"task{i:02d}" for i in range(tasks)]
    with open_registry(db, tmp / "home", upgrade=True) as reg:
        for i, name in enumerate(names):
            reg.register(make_bundle(tmp / f"b-{name}", backbone, name, seed=i, num_classes=5)[0])
    return db, write_clip(tmp / "clip.mp4"), names


def zipf_stream(names: list[str], n: int, s: float = 1.1, seed: int = 0) -> list[str]:
    weights = 1.0 / np.arange(1, len(names) + 1) ** s
    picks = np.random.default_rng(seed).choice(len(names), size=n, p=weights / weights.sum())
    return [names[int(i)] for i in picks]


def run_stream(url: str, clip: bytes, stream: list[str], concurrency: int) -> tuple[list[dict[str, Any]], float]:
    """Send ``stream`` with ``concurrency`` closed-loop clients; per request its latency, status and headers."""
    def one(client: httpx.Client, task: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        r = client.post("/v1/predict", files={"clip": ("clip.mp4", clip, "video/mp4")}, data={"tasks": task})
        return {"s": time.perf_counter() - t0, "status": r.status_code,
                "resident": r.headers.get("x-stadapter-resident"), "replica": r.headers.get("x-stadapter-replica")}

    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(lambda t: one(client, t), stream))
        return out, time.perf_counter() - t0


def pool_loads(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("stadapter_pool_loads_total{"))


def one_run(name: str, *, db: str, home: Path, clip: Path, stream: list[str], warmup: int, replicas: int,
            by_task: bool, args: argparse.Namespace, resident: int | None = None) -> dict[str, Any]:
    from ray import serve

    from stadapter.runtime.ray_app import APP_NAME, RaySettings, start

    port = args.port  # Serve's HTTP proxy keeps the port of its first start
    threads = max(1, args.cpus // replicas)
    resident = resident or args.resident
    settings = RaySettings(db=db, device="cpu", replicas=replicas, max_resident=resident, replica_cpus=0,
                           metrics_interval_s=0.5, route_by_task=by_task, server={"max_wait_ms": 5.0},
                           env={"STADAPTER_HOME": str(home), "OMP_NUM_THREADS": str(threads)})
    t0 = time.perf_counter()
    start(settings, port=port, blocking=False)
    url = f"http://127.0.0.1:{port}"
    deployed = time.perf_counter() - t0
    try:
        data = clip.read_bytes()
        warm, _ = run_stream(url, data, stream[:warmup], args.concurrency)
        time.sleep(1.5)
        loads0 = pool_loads(url)
        measured, wall = run_stream(url, data, stream[warmup:], args.concurrency)
        time.sleep(1.5)
        loads = pool_loads(url) - loads0
    finally:
        serve.delete(APP_NAME)
    ok = [m for m in measured if m["status"] == 200]
    lat = sorted(m["s"] * 1000 for m in ok)
    n = len(measured)
    hits = sum(m["resident"] == "1" for m in ok)
    result = {
        "run": name, "replicas": replicas, "resident_per_replica": resident,
        "routing": "task" if by_task else "task-blind",
        "torch_threads_per_replica": threads, "requests": n, "errors": n - len(ok),
        "throughput_rps": round(len(ok) / wall, 2), "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
        "hit_rate": round(hits / max(len(ok), 1), 3),
        "cold_loads_per_1000": round(1000 * (len(ok) - hits) / max(len(ok), 1), 1),
        "pool_loads_per_1000": round(1000 * loads / max(n, 1), 1),
        "replicas_used": len({m["replica"] for m in ok}), "deploy_s": round(deployed, 1),
        "warmup_errors": sum(w["status"] != 200 for w in warm),
    }
    print(f"{name:24s} {result['throughput_rps']:7.2f} req/s  p50 {result['p50_ms']:7.1f} ms  p99 "
          f"{result['p99_ms']:7.1f} ms  hit {result['hit_rate']:.3f}  cold/1000 {result['cold_loads_per_1000']:6.1f}"
          f"  (pool loads/1000 {result['pool_loads_per_1000']:.1f}, errors {result['errors']})", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--resident", type=int, default=4, help="adapter sets resident per replica")
    p.add_argument("--requests", type=int, default=600, help="measured requests per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--cpus", type=int, default=2, help="CPUs given to the local Ray cluster")
    p.add_argument("--quick", action="store_true", help="8 tasks, 200 requests after 60 of warm-up")
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    args = p.parse_args()
    args.port = free_port()
    if args.quick:
        args.tasks, args.requests, args.warmup = 8, 200, 60
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    with tempfile.TemporaryDirectory(prefix="serve-scale-") as tmp_name:
        tmp = Path(tmp_name)
        db, clip, names = make_world(tmp, args.tasks)
        stream = zipf_stream(names, args.warmup + args.requests)
        ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=100 << 20,
                 logging_level="ERROR", log_to_driver=False)
        try:
            common = {"db": db, "home": tmp / "home", "clip": clip, "stream": stream, "warmup": args.warmup,
                      "args": args}
            runs = [one_run("1 replica", replicas=1, by_task=True, **common),  # type: ignore[arg-type]
                    one_run("2 replicas, by task", replicas=2, by_task=True, **common),  # type: ignore[arg-type]
                    one_run("2 replicas, task-blind", replicas=2, by_task=False, **common),  # type: ignore[arg-type]
                    one_run("1 replica, 2x resident", replicas=1, by_task=True, resident=2 * args.resident,
                            **common)]  # type: ignore[arg-type]
        finally:
            ray.shutdown()
    one, two, blind, _ = runs
    summary = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "tasks": args.tasks, "resident_per_replica": args.resident,
        "zipf_s": 1.1, "concurrency": args.concurrency, "runs": runs,
        "throughput_ratio_2_vs_1": round(two["throughput_rps"] / one["throughput_rps"], 3),
        "p99_ratio_2_vs_1": round(two["p99_ms"] / one["p99_ms"], 3) if one["p99_ms"] and two["p99_ms"] else None,
        "cold_loads_per_1000_by_task_vs_blind": [two["cold_loads_per_1000"], blind["cold_loads_per_1000"]],
    }
    print(f"2 vs 1 replica: throughput x{summary['throughput_ratio_2_vs_1']}, p99 x{summary['p99_ratio_2_vs_1']} "
          f"on {summary['cpu']} ({summary['cores']} cores visible)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
