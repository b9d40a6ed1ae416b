"""Soak: many concurrent clients against a real ``stadapter serve`` (tiny backbone, CPU) for a while, mixing good
clips, bad clips (a text file, a truncated MP4), unknown tasks, oversized chunked uploads and slow (stalled)
uploads -- the goals of issue 18: no 5xx, a flat server RSS, every slow client cut off within its timeout.

    python benchmarks/soak.py                     # 32 clients for 60 s
    python benchmarks/soak.py --quick             # 8 clients for 10 s
    python benchmarks/soak.py --clients 64 --seconds 300 --json soak.json

The server runs with an 8 MB upload limit and 2 s header / body timeouts, its TMPDIR pointed at a fresh folder.
Each client cycles through the request kinds (starting at a different one); a slow client sends its headers
and part of the body, then waits until the server cuts it off (cut off in time: within the body timeout + 2 s).
Every 0.2 s the server's VmRSS (/proc/PID/status) and the bytes in its TMPDIR are sampled; the RSS slope is
the Theil-Sen slope (median of pairwise slopes) over the run after its first fifth (warm-up). Prints a summary,
then as its LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hostile import (  # benchmarks/ is on sys.path when this runs as a script
    ServerProcess,
    World,
    chunks_of,
    cpu_model,
    log,
    multipart,
    proc_status_mb,
    request_head,
    send_chunked,
    tree_bytes,
    upload_part_head,
)

from hostile_corpus import write_hostile_clips

LIMIT_MB = 8
TIMEOUT_S = 2.0
KINDS = ["good", "good", "good", "text", "truncated", "unknown task", "oversized", "slow"]


@dataclass
class Tally:
    """What every client saw: (kind, status, seconds) per request, and the slow clients' waits."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[str, int, float]] = field(default_factory=list)
    slow_waits: list[float] = field(default_factory=list)

    def add(self, kind: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests.append((kind, status, seconds))


class Clients:
    def __init__(self, url: str, port: int, clips: dict[str, Path]) -> None:
        self.url, self.port = url, port
        self.bodies = {kind: multipart(clips[name].name.encode(), clips[name].read_bytes(), task)
                       for kind, name, task in [("good", "good", "walk"), ("text", "text", "walk"),
                                                ("truncated", "truncated", "walk"),
                                                ("unknown task", "good", "no-such-task")]}
        self.tally = Tally()

    def one(self, client: httpx.Client, kind: str) -> int:
        if kind == "oversized":
            return send_chunked(self.port, chunks_of(2 * LIMIT_MB << 20, 256 << 10))[0]
        if kind == "slow":
            return self.slow()
        body, headers = self.bodies[kind]
        return client.post(f"{self.url}/v1/predict", content=body, headers=headers).status_code

    def slow(self) -> int:
        """Headers and a part of a 100 kB body, then silence: the server must answer 408 or close."""
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.settimeout(TIMEOUT_S + 30)
            t0 = time.monotonic()
            sock.sendall(request_head(self.port, "Content-Length: 100000\r\n") + upload_part_head("slow.mp4"))
            try:
                response = sock.recv(100)
            except OSError:
                response = b""
            with self.tally.lock:
                self.tally.slow_waits.append(time.monotonic() - t0)
        return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0

    def run(self, index: int, until: float) -> None:
        with httpx.Client(timeout=120) as client:
            i = index
            while time.monotonic() < until:
                kind = KINDS[i % len(KINDS)]
                i += 1
                t0 = time.perf_counter()
                try:
                    status = self.one(client, kind)
                except httpx.HTTPError:
                    status = 0
                self.tally.add(kind, status, time.perf_counter() - t0)


def sample(pid: int, tmp: Path, stop: threading.Event, samples: list[tuple[float, float, int]]) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - t0, proc_status_mb(pid)["VmRSS"], tree_bytes(tmp)))
        stop.wait(0.2)


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Theil-Sen: the median of the slopes between every pair of samples (robust to the short spikes that
    concurrent uploads make), in MB per minute."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:] if x2 > x1]
    return 60 * statistics.median(slopes) if slopes else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(tally: Tally, samples: list[tuple[float, float, int]], seconds: float,
              server_5xx: float) -> dict[str, object]:
    by_kind: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for kind, status, took in tally.requests:
        by_kind[kind].append((status, took))
    kinds = {kind: {"requests": len(rows), "codes": dict(Counter(str(s) for s, _ in rows)),
                    "p50_ms": round(1000 * percentile([t for _, t in rows], 0.5), 1),
                    "p99_ms": round(1000 * percentile([t for _, t in rows], 0.99), 1)}
             for kind, rows in sorted(by_kind.items())}
    codes = Counter(str(s) for _, s, _ in tally.requests)
    late = samples[len(samples) // 5:]  # after warm-up
    return {"requests": len(tally.requests), "requests_per_s": round(len(tally.requests) / seconds, 1),
            "codes": dict(sorted(codes.items())), "kinds": kinds,
            "client_5xx": sum(n for c, n in codes.items() if c.startswith("5")), "server_5xx": server_5xx,
            "rss_start_mb": round(samples[0][1], 1), "rss_end_mb": round(samples[-1][1], 1),
            "rss_max_mb": round(max(s[1] for s in samples), 1),
            "rss_slope_mb_per_min": round(slope_mb_per_min([(t, r) for t, r, _ in late]), 2),
            "rss_median_first_half_mb": round(statistics.median(r for _, r, _ in late[:len(late) // 2]), 1),
            "rss_median_second_half_mb": round(statistics.median(r for _, r, _ in late[len(late) // 2:]), 1),
            "temp_peak_mb": round(max(s[2] for s in samples) / 2**20, 2), "temp_end_bytes": samples[-1][2],
            "slow_clients": len(tally.slow_waits),
            "slow_max_wait_s": round(max(tally.slow_waits, default=0.0), 2),
            "slow_all_cut_off_in_time": all(w <= TIMEOUT_S + 2 for w in tally.slow_waits)}


def soak(world: World, clients: int, seconds: float) -> dict[str, object]:
    clips = write_hostile_clips(world.root / "clips")
    extra = ["--preload", "walk", "--max-upload-mb", str(LIMIT_MB), "--body-timeout", str(TIMEOUT_S),
             "--header-timeout", str(TIMEOUT_S)]
    with ServerProcess(world.home, world.server_tmp, extra, world.logs / "serve-soak.log") as server:
        pool = Clients(server.url, server.port, clips)
        samples: list[tuple[float, float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(server.proc.pid, world.server_tmp, stop, samples))
        sampler.start()
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=pool.run, args=(i, until)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        time.sleep(1.0)  # one more sample after the last request
        stop.set()
        sampler.join()
        result = summarize(pool.tally, samples, took, server.server_errors())
    result["tracebacks_in_server_log"] = (world.logs / "serve-soak.log").read_text().count("Traceback")
    return result


def goals(result: dict[str, object]) -> dict[str, bool]:
    slope = result["rss_slope_mb_per_min"]
    assert isinstance(slope, float)
    return {"no 5xx": result["client_5xx"] == 0 and result["server_5xx"] == 0,
            "RSS flat (|slope| < 10 MB/min after warm-up)": abs(slope) < 10,
            "every slow client cut off within its timeout": bool(result["slow_all_cut_off_in_time"]),
            "temp dir empty at the end": result["temp_end_bytes"] == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 clients for 10 s")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 32; --quick 8)")
    parser.add_argument("--seconds", type=float, help="duration (default 60; --quick 10)")
    parser.add_argument("--json", help="also write the JSON result here")
    args = parser.parse_args()
    clients = args.clients or (8 if args.quick else 32)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    with tempfile.TemporaryDirectory(prefix="stadapter-soak-") as tmp:
        world = World(Path(tmp))
        log(f"soak: {clients} clients for {seconds:g} s on {cpu_model()}")
        result = soak(world, clients, seconds)
    met = goals(result)
    result = {"benchmark": "soak", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_model(),
              "clients": clients, "seconds": seconds, **result, "goals": met}
    print(f"\nSoak, {result['date']}, {cpu_model()}: {clients} clients x {seconds:g} s")
    print(render(result))
    for goal, ok in met.items():
        print(f"  {'met   ' if ok else 'MISSED'} {goal}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


def render(result: dict[str, object]) -> str:
    kinds = result["kinds"]
    assert isinstance(kinds, dict)
    lines = ["| kind | requests | codes | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for kind, row in kinds.items():
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(row["codes"].items()))
        lines.append(f"| {kind} | {row['requests']} | {codes} | {row['p50_ms']} | {row['p99_ms']} |")
    keys = ["requests_per_s", "codes", "client_5xx", "server_5xx", "rss_start_mb", "rss_end_mb", "rss_max_mb",
            "rss_slope_mb_per_min", "rss_median_first_half_mb",
            "rss_median_second_half_mb", "temp_peak_mb", "temp_end_bytes", "slow_clients", "slow_max_wait_s",
            "slow_all_cut_off_in_time", "tracebacks_in_server_log"]
    return "\n".join(lines) + "\n" + "\n".join(f"{k}: {result[k]}" for k in keys)


if __name__ == "__main__":
    main()
