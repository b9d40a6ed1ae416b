"""Hostile inputs through the real entry points, one case at a time in subprocesses, and the bounded-memory
figures of issue 18.

    python benchmarks/hostile.py                 # every case, every entry point, 2 GB upload (~8 min on 2 cores)
    python benchmarks/hostile.py --quick         # CI-size (~2 min): a subset of each kind, every clip in one
                                                 # predict / eval / train call, a 256 MB upload
    python benchmarks/hostile.py --json out.json --markdown table.md

Entry points: ``stadapter import`` and ``stadapter pull`` (the local Hub server of tests/hub_server.py) for the
crafted bundles of tests/hostile_corpus.py; ``stadapter predict``, ``stadapter eval`` and ``stadapter train``
(a train list, ``--max-steps 1``, tiny backbone) for the crafted clips; uploads to a real ``stadapter serve``
subprocess on 127.0.0.1 (hostile clips, file names, paths, sizes, stalls, disconnects); hostile task names at
the command line. Each outcome is classified: refused with one clear error line (or, in a train/eval list,
skipped with the clip named), a traceback (or a 5xx), wrongly accepted, wrote outside its folder (every file
under the run's root but the registry home and the server's temp dir is snapshotted before and after), data
lost (the registered versions and their blobs' digests are checked after every case). Control cases (a good
bundle, a good clip, a safe upload) must be accepted; refusing one counts as "wrongly refused".

Bounded memory: the one-frame 16000x16000 clip through ``stadapter predict`` (peak RSS of the child from
wait4) and over HTTP (the server's VmRSS / VmHWM from /proc before and after), and a chunked upload far past
the server's limit (2 GB; --quick: 256 MB) with the peak bytes of the server's TMPDIR sampled every 5 ms.
Prints a table, then as its LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "0"  # the benchmark publishes to its own local Hub server
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hostile_corpus import (  # noqa: E402
    BOUNDARY,
    PULLED,
    craft_hostile_bundles,
    good_bundle,
    multipart,
    peak_bytes,
    tree_bytes,
    write_hostile_clips,
    write_huge_clip,
)

HUB_TOKEN = "hf_hostile_bench_token_0123456789"
BAD_NAMES = ["../../escaped", "/abs/path", ".hidden", "a/b", "x" * 101, "spa ce"]
NOT_PULLABLE = {"symlink-listed", "symlink-extra", "directory-inside"}  # a Hub repo holds no links or folders
TRACEBACK = "Traceback (most recent call last)"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"unknown CPU, {os.cpu_count()} cores"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- outcomes -------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    entry: str
    case: str
    expect: str  # "refuse" or "accept"
    refused_clearly: bool = False
    accepted: bool = False
    traceback: bool = False
    wrote_outside: list[str] = field(default_factory=list)
    data_lost: list[str] = field(default_factory=list)
    detail: str = ""
    seconds: float = 0.0

    @property
    def wrong(self) -> str:
        """'' when the outcome is the expected one, else what went wrong."""
        if self.traceback:
            return "traceback"
        if self.expect == "refuse" and self.accepted:
            return "wrongly accepted"
        if self.expect == "accept" and not self.accepted:
            return "wrongly refused"
        if self.expect == "refuse" and not self.refused_clearly:
            return "unclear refusal"
        return ""


def first_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    return (errors or lines or [""])[0][:200]


def judge_command(outcome: Outcome, proc: subprocess.CompletedProcess[str], one_line: bool = True) -> None:
    """A command's outcome: accepted (exit 0), refused clearly (non-zero, an ``error:`` line, and with
    ``one_line`` nothing else on stderr), or a traceback."""
    text = proc.stdout + proc.stderr
    outcome.traceback = TRACEBACK in text
    outcome.accepted = proc.returncode == 0
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    has_error = any(line.startswith("error") for line in err_lines)
    outcome.refused_clearly = (proc.returncode != 0 and has_error and not outcome.traceback
                               and (len(err_lines) == 1 or not one_line))
    outcome.detail = first_error_line(proc.stderr) if proc.returncode else first_error_line(proc.stdout)


def summarize(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = table.setdefault(o.entry, {"tried": 0, "refused": 0, "accepted (controls)": 0, "tracebacks": 0,
                                         "wrongly accepted": 0, "wrongly refused": 0, "unclear refusal": 0,
                                         "written outside": 0, "data lost": 0})
        row["tried"] += 1
        row["refused"] += o.expect == "refuse" and not o.wrong
        row["accepted (controls)"] += o.expect == "accept" and not o.wrong
        row["tracebacks"] += o.traceback
        for what in ("wrongly accepted", "wrongly refused", "unclear refusal"):
            row[what] += o.wrong == what
        row["written outside"] += bool(o.wrote_outside)
        row["data lost"] += bool(o.data_lost)
    return table


def markdown(table: dict[str, dict[str, int]]) -> str:
    if not table:
        return "(no cases run)"
    columns = list(next(iter(table.values())))
    lines = ["| entry point | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for entry, row in table.items():
        lines.append(f"| {entry} | " + " | ".join(str(row[c]) for c in columns) + " |")
    total = {c: sum(row[c] for row in table.values()) for c in columns}
    lines.append("| **all** | " + " | ".join(f"**{total[c]}**" for c in columns) + " |")
    return "\n".join(lines)


# -- the world: a registry with a servable task, a snapshot of everything else --------------------------------

def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (not under ``skip``) with its size and mtime; links are not followed."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in files + dirnames:
            p = Path(dirpath, name)
            with suppress(FileNotFoundError):
                st = p.lstat()
                out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(k for k in after.keys() | before.keys() if before.get(k) != after.get(k))


class World:
    """A temporary root: ``home`` (the registry, a task 'walk' on the tiny backbone), ``work/deep`` (the
    commands' working directory, so that ../../x still lands inside the root), the corpora, and ``server-tmp``."""

    def __init__(self, root: Path) -> None:
        from stadapter.model.loading import load_backbone
        from stadapter.registry import open_registry
        from test_runtime_support import make_bundle

        self.root, self.home = root, root / "home"
        self.cwd = root / "work" / "deep"
        self.cwd.mkdir(parents=True)
        self.server_tmp = root / "server-tmp"
        self.server_tmp.mkdir()
        self.env = {**os.environ, "STADAPTER_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
                    "TMPDIR": str(root / "cli-tmp")}
        (root / "cli-tmp").mkdir()
        self.env.pop("STADAPTER_DB", None)
        self.backbone = load_backbone("tiny", "none")
        bundle, _, _ = make_bundle(root / "walk-bundle", self.backbone, "walk", num_classes=3, width=8)
        with open_registry(home=self.home) as reg:
            self.walk = reg.register(bundle)
        self.labels = list(self.walk.labels)
        self.logs = root / "logs"
        self.logs.mkdir()
        self.skip = {self.home, self.server_tmp, root / "cli-tmp", self.logs}
        self.versions = self.registered()

    def registered(self) -> dict[str, str]:
        """ref -> a digest of its files (from the database) for every registered version."""
        from stadapter.registry import open_registry

        with open_registry(home=self.home) as reg:
            return {v.ref: json.dumps(v.files, sort_keys=True)
                    for t in reg.list_tasks() for v in reg.list_versions(t.name)}

    def lost(self) -> list[str]:
        """Versions registered before that are gone or whose blobs no longer match their digest."""
        from stadapter.fsio import sha256_file
        from stadapter.registry import open_registry

        now = self.registered()
        lost = [ref for ref, files in self.versions.items() if now.get(ref) != files]
        with open_registry(home=self.home) as reg:
            for ref in self.versions:
                for name, meta in json.loads(self.versions[ref]).items():
                    blob = reg.blobs.path(meta["sha256"])
                    if not blob.is_file() or sha256_file(blob) != meta["sha256"]:
                        lost.append(f"{ref}/{name}")
        return lost

    def run(self, entry: str, case: str, args: list[str], expect: str = "refuse",
            judge: Callable[[Outcome, subprocess.CompletedProcess[str]], None] = judge_command,
            timeout: float = 300, may_write: str = "") -> Outcome:
        """``stadapter ARGS`` in a fresh process, judged, with the root snapshotted around it (``may_write``: a
        path relative to the root that the command may create, e.g. a run folder)."""
        outcome = Outcome(entry, case, expect)
        before = snapshot(self.root, self.skip)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "stadapter", *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        outcome.seconds = time.perf_counter() - t0
        judge(outcome, proc)
        outcome.wrote_outside = [p for p in changed(before, snapshot(self.root, self.skip))
                                 if not (may_write and (p.startswith(may_write) or may_write.startswith(p + "/")))]
        outcome.data_lost = self.lost()
        self.versions = self.registered()  # an accepted case is judged once, not again by the next one
        return outcome


# -- bundles: import and pull ---------------------------------------------------------------------------------

def bundle_cases(world: World) -> dict[str, Path]:
    good = good_bundle(world.root / "bundles" / "good")
    return {"good (control)": good, **craft_hostile_bundles(good, world.root / "bundles" / "cases")}


QUICK_BUNDLES = {*PULLED, "name-dotdot", "name-absolute", "symlink-listed", "symlink-extra", "header-2^40"}


def run_imports(world: World, bundles: dict[str, Path], quick: bool) -> list[Outcome]:
    outcomes = []
    for case, directory in bundles.items():
        if quick and case not in QUICK_BUNDLES and not case.startswith("good"):
            continue
        expect = "accept" if case.startswith("good") else "refuse"
        outcomes.append(world.run("stadapter import", case, ["import", str(directory)], expect))
    return outcomes


def publish(hub_url: str, repo: str, directory: Path) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub_url, token=HUB_TOKEN)
    api.create_repo(repo)
    files = [CommitOperationAdd(p.name, p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file()]
    api.create_commit(repo, files, commit_message="crafted")


def run_pulls(world: World, bundles: dict[str, Path], quick: bool) -> list[Outcome]:
    from hub_server import HubServer

    chosen = [c for c in bundles if c not in NOT_PULLABLE and (not quick or c in PULLED or c.startswith("good"))]
    outcomes = []
    with HubServer(world.root / "hub-data", token=HUB_TOKEN, lfs="auto") as hub:
        world.skip.add(world.root / "hub-data")
        for i, case in enumerate(chosen):
            repo = f"org/case-{i}"
            publish(hub.url, repo, bundles[case])
            expect = "accept" if case.startswith("good") else "refuse"
            args = ["pull", repo, "--endpoint", hub.url, "--token", HUB_TOKEN, "--task", f"pulled{i}"]
            outcome = world.run("stadapter pull", case, args, expect)
            cache = world.home / "hub" / "cache" / f"models--org--case-{i}"
            left = [p.name for p in cache.rglob("*") if p.is_file() and p.parent.name == "blobs"]
            if expect == "refuse" and left:
                outcome.detail += f" [refused content left in the Hub cache: {len(left)} file(s)]"
            outcomes.append(outcome)
    return outcomes


# -- clips: predict, eval, train lists --------------------------------------------------------------------------

def judge_list(clip_name: str) -> Callable[[Outcome, subprocess.CompletedProcess[str]], None]:
    """A train/eval list holding one crafted clip beside good ones: refused clearly when the run names the clip
    as skipped (and carries on) or stops with one clear error line; wrongly accepted when it never names it."""
    def judge(outcome: Outcome, proc: subprocess.CompletedProcess[str]) -> None:
        judge_command(outcome, proc, one_line=False)
        named = clip_name in proc.stdout + proc.stderr
        if proc.returncode == 0:
            outcome.accepted, outcome.refused_clearly = not named, named and not outcome.traceback
            lines = [line for line in (proc.stdout + proc.stderr).splitlines() if clip_name in line]
            outcome.detail = (lines or [""])[0].strip()[:200]
    return judge


def run_predicts(world: World, clips: dict[str, Path], quick: bool) -> list[Outcome]:
    """Each clip on its own (--quick: the good one only), then every clip in one call."""
    outcomes = []
    for case, clip in clips.items():
        if quick and case != "good":
            continue
        expect = "accept" if case == "good" else "refuse"
        outcomes.append(world.run("stadapter predict", case, ["predict", "--task", "walk", str(clip), "--json",
                                                               "--device", "cpu"], expect))
    bad = [c for c in clips if c != "good"]
    outcome = world.run("stadapter predict", "all crafted clips + a good one in one call",
                        ["predict", "--task", "walk", str(clips["good"]), *[str(clips[c]) for c in bad], "--json",
                         "--device", "cpu"], judge=judge_several(clips))
    outcomes.append(outcome)
    return outcomes


def judge_several(clips: dict[str, Path]) -> Callable[[Outcome, subprocess.CompletedProcess[str]], None]:
    """predict over several clips: the good one answered, each bad one reported on its own, exit 1."""
    def judge(outcome: Outcome, proc: subprocess.CompletedProcess[str]) -> None:
        judge_command(outcome, proc, one_line=False)
        try:
            results = json.loads(proc.stdout)["results"]
        except (ValueError, KeyError, TypeError):
            results = []
        answered = [r for r in results if "tasks" in r]
        errors = [r for r in results if "error" in r]
        outcome.detail = f"{len(answered)} answered, {len(errors)} reported as errors, exit {proc.returncode}"
        outcome.refused_clearly = (proc.returncode == 1 and len(answered) == 1 and len(errors) == len(clips) - 1
                                   and not outcome.traceback)
        outcome.accepted = len(answered) > 1
    return judge


def write_list(world: World, name: str, clips: list[Path]) -> Path:
    path = world.root / "lists" / f"{name}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(f"{clip} {world.labels[i % len(world.labels)]}\n" for i, clip in enumerate(clips)))
    return path


def run_lists(world: World, clips: dict[str, Path], quick: bool) -> list[Outcome]:
    """Each crafted clip in an eval list and a train list (one epoch of the tiny backbone) beside three good
    copies (--quick: one eval list and one train list hold every crafted clip at once)."""
    goods = [clips["good"]] * 3
    bad = [c for c in clips if c != "good"]
    outcomes: list[Outcome] = []
    for name, members in ({"all crafted clips in one eval list": bad} if quick else {c: [c] for c in bad}).items():
        val = write_list(world, f"val-{len(outcomes)}", [*goods, *[clips[c] for c in members]])
        outcomes.append(world.run("stadapter eval", name, ["eval", "--task", "walk", "--val", str(val), "--device",
                                                           "cpu"], judge=judge_all_named([clips[c].name
                                                                                          for c in members])))
    train = ["-b", "tiny", "--weights", "none", "--frames", "4", "--epochs", "1", "--batch-size", "2",
             "--num-workers", "0", "--no-register", "--device", "cpu"]  # one epoch: every clip is read
    groups = {"all crafted clips in one train list": bad} if quick else {c: [c] for c in bad}
    for name, members in groups.items():
        listing = write_list(world, f"train-{len(outcomes)}", [*goods, *[clips[c] for c in members]])
        out = world.cwd / "runs" / f"t{len(outcomes)}"
        outcome = world.run("stadapter train", name, ["train", "--task", f"t{len(outcomes)}", "--train",
                                                      str(listing), "--out", str(out), *train],
                            judge=judge_all_named([clips[c].name for c in members]),
                            may_write=str(out.relative_to(world.root)))
        outcomes.append(outcome)
    return outcomes


def judge_all_named(names: list[str]) -> Callable[[Outcome, subprocess.CompletedProcess[str]], None]:
    judges = [judge_list(n) for n in names]

    def judge(outcome: Outcome, proc: subprocess.CompletedProcess[str]) -> None:
        verdicts = []
        for one in judges:
            one(outcome, proc)
            verdicts.append((outcome.refused_clearly, outcome.accepted, outcome.detail))
        outcome.refused_clearly = all(v[0] for v in verdicts)
        outcome.accepted = any(v[1] for v in verdicts)
        outcome.detail = "; ".join(v[2] for v in verdicts if v[2])[:400] or outcome.detail
    return judge


# -- task names at the command line ----------------------------------------------------------------------------

def run_names(world: World, bundles: dict[str, Path], clips: dict[str, Path], quick: bool) -> list[Outcome]:
    listing = write_list(world, "names", [clips["good"]] * 4)
    commands = {
        "train --task": lambda n: ["train", "--task", n, "--train", str(listing), "-b", "tiny", "--weights", "none",
                                   "--max-steps", "1", "--device", "cpu"],
        "import --task": lambda n: ["import", str(bundles["good (control)"]), "--task", n],
        "pull --task": lambda n: ["pull", "org/any", "--task", n, "--endpoint", "http://127.0.0.1:9"],
        "predict --task": lambda n: ["predict", "--task", n, str(clips["good"]), "--device", "cpu"],
        "eval --task": lambda n: ["eval", "--task", n, "--val", str(listing), "--device", "cpu"],
        "export": lambda n: ["export", f"{n}:1", str(world.root / "exported")],
        "alias set": lambda n: ["alias", "set", "walk", n, "1"],
    }
    return [world.run("CLI task names", f"{command} {name[:24]!r}", make(name))
            for command, make in commands.items() for name in (BAD_NAMES[:2] if quick else BAD_NAMES)]


# -- a real `stadapter serve` ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of process ``pid`` in MB, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class ServerProcess:
    """``stadapter serve`` on 127.0.0.1 (tiny backbone, CPU) in a subprocess whose TMPDIR is ``tmp``."""

    def __init__(self, home: Path, tmp: Path, extra: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STADAPTER_HOME": str(home), "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
        env.pop("STADAPTER_DB", None)
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stadapter", "serve", "--port", str(self.port), "--backbone", "tiny",
             "--weights", "none", "--device", "cpu", *extra], cwd=tmp, env=env, stdout=self.log,
            stderr=subprocess.STDOUT)
        self.log_path = log_path

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stadapter serve exited: {self.log_path.read_text()[-2000:]}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError("stadapter serve did not become ready")

    def memory_mb(self) -> dict[str, float]:
        return proc_status_mb(self.proc.pid)

    def server_errors(self) -> float:
        """Requests the server counted as 5xx (from /metrics)."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("stadapter_requests_total") and re.search(r'code="5\d\d"', line))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def request_head(port: int, extra: str) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n{extra}\r\n").encode()


def upload_part_head(filename: str = "big.mp4") -> bytes:
    return (b"--%s\r\nContent-Disposition: form-data; name=\"tasks\"\r\n\r\nwalk\r\n--%s\r\n"
            b"Content-Disposition: form-data; name=\"clip\"; filename=\"%s\"\r\n\r\n"
            % (BOUNDARY, BOUNDARY, filename.encode()))


def send_chunked(port: int, chunks: Iterable[bytes], timeout: float = 60) -> tuple[int, int, bytes]:
    """POST /v1/predict in chunked transfer encoding from ``chunks`` (a generator: nothing is built in memory),
    stopping as soon as the server answers or closes; (status or 0, bytes sent, the response)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        sock.sendall(request_head(port, "Transfer-Encoding: chunked\r\n"))
        try:
            for chunk in chunks:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            else:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # answered and closed while we were still sending
        response = b""
        with suppress(OSError):
            while data := sock.recv(1 << 16):
                response += data
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
    return status, sent, response


def chunks_of(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    """``total`` bytes of one reused random ``size`` block, after the multipart head."""
    yield upload_part_head()
    block = os.urandom(size)
    for _ in range(total // size):
        yield block


# -- HTTP ---------------------------------------------------------------------------------------------------------

UPLOAD_LIMIT_MB = 8
HTTP_TIMEOUT_S = 2.0
SAFE_NAMES = {"name '..'": b"..", "name '../../../escaped.mp4'": b"../../../escaped.mp4",
              "name '/etc/passwd'": b"/etc/passwd", "name of 300 characters": b"x" * 300 + b".mp4",
              "name 'a/b\\\\c.mp4'": b"a/b\\c.mp4", "name with a NUL byte": b"nul\x00byte.mp4",
              "name ''": b""}


class HttpCases:
    """Every HTTP case against one ``stadapter serve``; each request is judged by its status: 2xx accepted,
    a 4xx (or a closed stalled connection) with a one-line ``detail`` refused clearly, 5xx a traceback."""

    def __init__(self, world: World, server: ServerProcess) -> None:
        self.world, self.server = world, server
        # paths only the server knows (a path the client sent may be echoed back to it)
        self.secrets = [str(p) for d in (world.home, world.server_tmp) for p in (d, d.resolve())]

    def judge(self, case: str, expect: str, send: Callable[[], tuple[int, str]]) -> Outcome:
        outcome = Outcome("HTTP (stadapter serve)", case, expect)
        before = snapshot(self.world.root, self.world.skip)
        t0 = time.perf_counter()
        status, text = send()
        outcome.seconds = time.perf_counter() - t0
        outcome.traceback = status >= 500 or TRACEBACK in text
        outcome.accepted = 200 <= status < 300
        leaked = [s for s in self.secrets if s in text]
        outcome.refused_clearly = 400 <= status < 500 or status == 0
        outcome.detail = f"{status or 'closed'} {text[:160]}" + (" [names a server path]" if leaked else "")
        if leaked:
            outcome.refused_clearly = False
        time.sleep(0.05)  # let the server finish removing the upload
        outcome.wrote_outside = changed(before, snapshot(self.world.root, self.world.skip))
        outcome.wrote_outside += [f"server-tmp/{p.name}" for p in self.world.server_tmp.iterdir()]
        outcome.data_lost = self.world.lost()
        return outcome

    def post(self, **kw: object) -> Callable[[], tuple[int, str]]:
        import httpx

        def send() -> tuple[int, str]:
            r = httpx.post(f"{self.server.url}/v1/predict", timeout=60, **kw)  # type: ignore[arg-type]
            return r.status_code, " ".join(r.text.split())
        return send

    def upload(self, name: bytes, data: bytes, tasks: str = "walk") -> Callable[[], tuple[int, str]]:
        body, headers = multipart(name, data, tasks)
        return self.post(content=body, headers=headers)

    def cases(self, clips: dict[str, Path]) -> list[Outcome]:
        good = clips["good"].read_bytes()
        out = [self.judge(f"upload {case}", "accept" if case == "good" else "refuse",
                          self.upload(clips[case].name.encode(), clips[case].read_bytes()))
               for case in clips]
        out += [self.judge(case, "accept", self.upload(name, good)) for case, name in SAFE_NAMES.items()]
        allowed = clips["good"].parent
        link = allowed / "link-out.mp4"
        secret = self.world.root / "secret.mp4"
        shutil.copy(clips["good"], secret)
        link.symlink_to(secret)
        paths = {"path '../secret.mp4'": str(allowed / ".." / "secret.mp4"), "path '/etc/passwd'": "/etc/passwd",
                 "path: a symlink out of the allowed root": str(link), "path relative '../../etc/passwd'":
                 "../../etc/passwd", "path: a folder": str(allowed)}
        out += [self.judge(case, "refuse", self.post(json={"path": p, "tasks": ["walk"]}))
                for case, p in paths.items()]
        out.append(self.judge("path: a good clip in the allowed root", "accept",
                              self.post(json={"path": str(clips["good"]), "tasks": ["walk"]})))
        out += [self.judge(f"task {t!r}", "refuse", self.upload(b"c.mp4", good, t))
                for t in ["nope", "../../walk", "walk:99", "x" * 300, ""]]
        out += self.size_and_time_cases(good)
        return out

    def size_and_time_cases(self, good: bytes) -> list[Outcome]:
        port, limit = self.server.port, UPLOAD_LIMIT_MB << 20
        body, headers = multipart(b"big.mp4", b"\0" * (limit + 1024))
        out = [self.judge("declared length over the limit", "refuse", self.post(content=body, headers=headers)),
               self.judge("chunked 64 MB over an 8 MB limit", "refuse", lambda: self.raw(chunks_of(64 << 20))),
               self.judge("JSON nested 100,000 deep", "refuse", self.post(
                   content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})),
               self.judge("headers that never end", "refuse", lambda: self.stalled(
                   b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")),
               self.judge("a body that stops half way", "refuse", lambda: self.stalled(
                   request_head(port, "Content-Length: 100000\r\n") + upload_part_head())),
               self.judge("client gone mid-upload", "refuse", self.vanish)]
        return out

    def raw(self, chunks: Iterable[bytes]) -> tuple[int, str]:
        status, _, response = send_chunked(self.server.port, chunks)
        return status, " ".join(response.decode(errors="replace").split("\r\n\r\n", 1)[-1].split())

    def stalled(self, data: bytes) -> tuple[int, str]:
        """Send ``data`` and stall: refused (0 or 408) when the server cuts us off within its timeout + 2 s."""
        with socket.create_connection(("127.0.0.1", self.server.port)) as sock:
            sock.settimeout(HTTP_TIMEOUT_S + 10)
            t0 = time.monotonic()
            sock.sendall(data)
            try:
                response = sock.recv(1000)
            except OSError:
                response = b"(still open)"
            waited = time.monotonic() - t0
        status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
        if waited > HTTP_TIMEOUT_S + 2 or response == b"(still open)":
            return 200, f"not cut off after {waited:.1f} s"  # counted as wrongly accepted
        return status, f"cut off after {waited:.2f} s (timeout {HTTP_TIMEOUT_S} s) {response[:60]!r}"

    def vanish(self) -> tuple[int, str]:
        """Start a chunked upload and close the socket half way: the server must not count a 5xx."""
        before = self.server.server_errors()
        with socket.create_connection(("127.0.0.1", self.server.port)) as sock:
            sock.sendall(request_head(self.server.port, "Transfer-Encoding: chunked\r\n"))
            for chunk in [upload_part_head(), os.urandom(256 << 10)]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        time.sleep(1.0)
        after = self.server.server_errors()
        return (500 if after > before else 0), f"5xx counted by the server: {after - before:g}"


def run_http(world: World, clips: dict[str, Path]) -> tuple[list[Outcome], dict[str, object]]:
    extra = ["--preload", "walk", "--allowed-root", str(clips["good"].parent), "--max-upload-mb",
             str(UPLOAD_LIMIT_MB), "--body-timeout", str(HTTP_TIMEOUT_S), "--header-timeout", str(HTTP_TIMEOUT_S)]
    with ServerProcess(world.home, world.server_tmp, extra, world.logs / "serve.log") as server:
        outcomes = HttpCases(world, server).cases(clips)
        errors = server.server_errors()
    log_text = (world.logs / "serve.log").read_text()
    return outcomes, {"server_5xx_total": errors, "tracebacks_in_server_log": log_text.count(TRACEBACK)}


# -- bounded memory -----------------------------------------------------------------------------------------------

def run_child_measured(args: list[str], world: World) -> dict[str, float | int | str]:
    """``stadapter ARGS`` with its wall time and peak RSS: the child's VmHWM, polled every 5 ms from /proc
    (wait4's ru_maxrss would not do: Linux carries the parent's high-water mark across the exec)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stadapter", *args], cwd=world.cwd, env=world.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def poll() -> None:
        while proc.poll() is None:
            with suppress(OSError, KeyError):  # gone, or a zombie without memory lines
                peak[0] = max(peak[0], proc_status_mb(proc.pid)["VmHWM"])
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, err = proc.communicate(timeout=600)
    poller.join()
    return {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak[0], 1),
            "exit": proc.returncode, "error": first_error_line(err)}


def huge_in_predict(world: World, huge: Path, small_bad: Path) -> dict[str, object]:
    """The huge clip through ``stadapter predict``, beside the same command on an empty file (refused at the
    same point, from the headers): the difference is what the huge clip itself costs."""
    args = ["predict", "--task", "walk", "--json", "--device", "cpu"]
    base = run_child_measured([*args, str(small_bad)], world)
    huge_run = run_child_measured([*args, str(huge)], world)
    from stadapter.errors import DecodeError
    from stadapter.video.decode import probe

    t0 = time.perf_counter()
    try:
        probe(huge)
        refused = ""
    except DecodeError as e:
        refused = str(e)
    return {"probe_in_process_seconds": round(time.perf_counter() - t0, 4), "probe_error": refused,
            "empty_file": base, "huge_clip": huge_run,
            "extra_seconds": round(float(huge_run["seconds"]) - float(base["seconds"]), 3),
            "rss_growth_mb": round(float(huge_run["peak_rss_mb"]) - float(base["peak_rss_mb"]), 1)}


def huge_over_http(world: World, huge: Path) -> dict[str, object]:
    """One, then two concurrent uploads of the huge clip: latency, status, and the server's RSS and peak."""
    import httpx

    body, headers = multipart(b"huge.mp4", huge.read_bytes())
    with ServerProcess(world.home, world.server_tmp, ["--preload", "walk"], world.logs / "serve-huge.log") as s:
        with httpx.Client(timeout=120) as c:  # warm the server up with one good request first
            c.post(f"{s.url}/v1/predict", content=multipart(b"g.mp4", (world.root / "clips" / "good.mp4")
                                                            .read_bytes())[0], headers=headers)
        before = s.memory_mb()

        def one(results: list[tuple[int, float, str]]) -> None:
            t0 = time.perf_counter()
            r = httpx.post(f"{s.url}/v1/predict", content=body, headers=headers, timeout=120)
            results.append((r.status_code, time.perf_counter() - t0, r.text[:200]))

        single: list[tuple[int, float, str]] = []
        one(single)
        after_one = s.memory_mb()
        pair: list[tuple[int, float, str]] = []
        threads = [threading.Thread(target=one, args=(pair,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after_two = s.memory_mb()
    return {"status": single[0][0], "seconds": round(single[0][1], 3), "detail": single[0][2],
            "two_at_once": [{"status": p[0], "seconds": round(p[1], 3)} for p in pair],
            "rss_before_mb": round(before["VmRSS"], 1), "hwm_before_mb": round(before["VmHWM"], 1),
            "rss_after_mb": round(after_two["VmRSS"], 1), "hwm_after_mb": round(after_two["VmHWM"], 1),
            "hwm_growth_one_mb": round(after_one["VmHWM"] - before["VmHWM"], 1),
            "hwm_growth_two_mb": round(after_two["VmHWM"] - before["VmHWM"], 1)}


def big_chunked_upload(world: World, total: int, limit_mb: int | None) -> dict[str, object]:
    """A chunked upload of ``total`` bytes to a server with a ``limit_mb`` upload limit (None: the server's
    default) and a fresh TMPDIR."""
    tmp = world.root / f"big-upload-tmp-{limit_mb or 'default'}"
    tmp.mkdir()
    extra = ["--preload", "walk"] + (["--max-upload-mb", str(limit_mb)] if limit_mb is not None else [])
    with ServerProcess(world.home, tmp, extra, world.logs / f"serve-big-{limit_mb or 'default'}.log") as server:
        before = server.memory_mb()
        with peak_bytes(tmp) as peak:
            t0 = time.perf_counter()
            status, sent, response = send_chunked(server.port, chunks_of(total), timeout=300)
            seconds = time.perf_counter() - t0
        after = server.memory_mb()
        left = tree_bytes(tmp)
    detail = response.decode(errors="replace").split("\r\n\r\n", 1)[-1][:200]
    return {"offered_mb": total >> 20, "limit_mb": limit_mb, "status": status, "seconds": round(seconds, 2),
            "sent_before_answer_mb": round(sent / 2**20, 1), "temp_peak_mb": round(peak[0] / 2**20, 1),
            "temp_left_bytes": left, "hwm_growth_mb": round(after["VmHWM"] - before["VmHWM"], 1), "detail": detail}


def run_memory(world: World, clips: dict[str, Path], quick: bool) -> dict[str, object]:
    huge = write_huge_clip(world.root / "clips" / "huge.mp4")
    log("huge clip written; predict")
    figures: dict[str, object] = {"huge_clip_bytes": huge.stat().st_size,
                                  "predict": huge_in_predict(world, huge, clips["empty"])}
    log("huge clip over HTTP")
    figures["http"] = huge_over_http(world, huge)
    log("big chunked upload")
    total = (256 << 20) if quick else (2 << 30)
    figures["chunked_upload"] = big_chunked_upload(world, total, 32)
    if not quick:  # the default limit: the temp dir holds at most the limit, spooled as it streams
        figures["chunked_upload_default_limit"] = big_chunked_upload(world, total, None)
    return figures


# -- main ---------------------------------------------------------------------------------------------------------

def goals(memory: dict[str, object]) -> dict[str, bool]:
    predict, http, upload = (memory[k] for k in ("predict", "http", "chunked_upload"))
    assert isinstance(predict, dict) and isinstance(http, dict) and isinstance(upload, dict)
    met = {"predict: huge clip refused < 1 s beyond startup": predict["extra_seconds"] < 1.0
            and predict["huge_clip"]["exit"] != 0,
            "predict: < 200 MB RSS growth": predict["rss_growth_mb"] < 200,
            "HTTP: huge clip refused (4xx) in < 1 s": 400 <= http["status"] < 500 and http["seconds"] < 1.0,
            "HTTP: < 200 MB RSS growth (two at once)": http["hwm_growth_two_mb"] < 200,
            "chunked upload (32 MB limit): 413 with < 64 MB temp growth": upload["status"] == 413
            and upload["temp_peak_mb"] < 64}
    default = memory.get("chunked_upload_default_limit")
    if isinstance(default, dict):
        met["chunked upload (default limit): 413 with < 64 MB temp growth"] = (
            default["status"] == 413 and default["temp_peak_mb"] < 64)
    return met


def report(outcomes: list[Outcome], memory: dict[str, object], extra: dict[str, object],
           args: argparse.Namespace, seconds: float) -> dict[str, object]:
    table = summarize(outcomes)
    print(f"\nHostile inputs, {time.strftime('%Y-%m-%d')}, {cpu_model()}, "
          f"{'quick' if args.quick else 'full'} run, {seconds:.0f} s\n")
    print(markdown(table))
    for o in outcomes:
        if o.wrong or o.wrote_outside or o.data_lost:
            print(f"- {o.entry} / {o.case}: {o.wrong or 'ok'}; outside: {o.wrote_outside[:3]}; "
                  f"lost: {o.data_lost[:3]}; {o.detail}")
    print(f"\nBounded memory ({cpu_model()}):\n{json.dumps(memory, indent=1)}")
    met = goals(memory) if memory else {}
    for goal, ok in met.items():
        print(f"  {'met   ' if ok else 'MISSED'} {goal}")
    result: dict[str, object] = {
        "benchmark": "hostile", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_model(),
        "quick": args.quick, "seconds": round(seconds, 1), "table": table, "goals": met, "memory": memory,
        **extra, "cases": [{**asdict(o), "wrong": o.wrong} for o in outcomes]}
    if args.markdown:
        Path(args.markdown).write_text(markdown(table) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-size run (< 2 min on 2 cores)")
    parser.add_argument("--only", default="import,pull,predict,lists,names,http,memory",
                        help="comma-separated parts to run")
    parser.add_argument("--json", help="also write the JSON result here")
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary root (printed)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="stadapter-hostile-")
    try:
        world = World(Path(tmp))
        clips = write_hostile_clips(world.root / "clips")
        bundles = bundle_cases(world)
        world.versions = world.registered()
        outcomes: list[Outcome] = []
        extra: dict[str, object] = {}
        steps: list[tuple[str, Callable[[], list[Outcome]]]] = [
            ("import", lambda: run_imports(world, bundles, args.quick)),
            ("pull", lambda: run_pulls(world, bundles, args.quick)),
            ("predict", lambda: run_predicts(world, clips, args.quick)),
            ("lists", lambda: run_lists(world, clips, args.quick)),
            ("names", lambda: run_names(world, bundles, clips, args.quick))]
        for name, step in steps:
            if name in parts:
                log(f"{name} ...")
                outcomes += step()
        if "http" in parts:
            log("http ...")
            http_outcomes, extra["http_server"] = run_http(world, clips)
            outcomes += http_outcomes
        memory = run_memory(world, clips, args.quick) if "memory" in parts else {}
        result = report(outcomes, memory, extra, args, time.perf_counter() - t0)
        print(json.dumps({k: result[k] for k in ("benchmark", "date", "cpu", "quick", "table", "goals")}))
        failed = [o for o in outcomes if o.wrong or o.wrote_outside or o.data_lost]
        if failed:  # a correctness failure (not a timing goal) fails the run, so CI can guard the boundary
            log(f"{len(failed)} case(s) went wrong: {', '.join(f'{o.entry} / {o.case}' for o in failed[:10])}")
            raise SystemExit(1)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
