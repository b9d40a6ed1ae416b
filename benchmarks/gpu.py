"""GPU run of issue 23: every CUDA check and benchmark in one command, each section time-boxed.

    python benchmarks/gpu.py              # CUDA: ViT-B/16 geometry (random init), 224 px, 8 frames, r=384, fp16
    python benchmarks/gpu.py --smoke      # CPU stand-in with the tiny backbone (< 2 min; CI runs it)
    python benchmarks/gpu.py --only train,loader    # some sections only

Sections, run in this order, each in a child process with its own time box (a crash, a CUDA error or a
timeout is recorded and the next section still runs; a section writes its figures as it goes, so a timeout
keeps what it had measured):

    serve     clips/s of the bare backbone vs the engine with ST-Adapters at batch 1, 8, 32
              (adapter_overhead_b*), the FLOP ratio, switch_ratio (alternating tasks over one task; a PEFT-style
              state-dict copy beside it), mixed_batch_ratio (32 clips over 8 tasks over 32 clips of one task)
    pool      cold_load_p99_ms store -> device for a 7.4M-parameter set, device memory per resident set over
              its file's bytes and over its device bytes (benchmarks/runtime.py's (d) and (f))
    train     one ST-Adapter step vs one full fine-tuning step of ViT-B/16, batch 8 x 8 frames, AMP (the
              training loop's own stepper): seconds and peak device memory
    loader    decode + augmentation throughput of the training DataLoader (real H.264 clips written first)
              with 8 and 16 workers, against the GPU's adapter step rate from `train`
    zipf      1,000 tasks, 64 resident, a Zipf(1.1) stream (benchmarks/runtime.py's (e))
    compiled  eager vs torch.compile (inductor) vs CUDA graphs (reduce-overhead) at batch 8; switching among
              8 tasks must compile nothing and record no CUDA graph (dynamo / inductor counters)
    tests     python -m pytest -m cuda tests/test_cuda.py

Writes gpu.json (every figure, goals, each section's status) and gpu.log (everything printed) into --out
(default: $OUT when set, else runs/gpu); prints nvidia-smi's GPU name, torch and CUDA versions first. Exits 1
when a section or the tests failed (a goal not met is reported, not a failure). Timings of the engine and
the backbone reuse benchmarks/runtime.py's helpers (Bench, BareBackbone, switch_streams).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("serve", "pool", "train", "loader", "zipf", "compiled", "tests")
# Seconds per section: (full CUDA run, smoke). The whole run is also bounded by --budget.
BOXES = {"serve": (60, 60), "pool": (35, 45), "train": (45, 45), "loader": (45, 45), "zipf": (75, 60),
         "compiled": (150, 60), "tests": (130, 45)}
GOALS = {
    "adapter_overhead_b1": ("<=", 1.10), "adapter_overhead_b8": ("<=", 1.10), "adapter_overhead_b32": ("<=", 1.10),
    "switch_ratio": (">=", 0.99), "mixed_batch_ratio": (">=", 0.90), "cold_load_p99_ms": ("<=", 10.0),
    "resident_ratio_device_bytes": ("<=", 1.1), "zipf_throughput_ratio": (">=", 0.9),
    "zipf_p99_ratio": ("<=", 1.5), "train_time_ratio": ("<=", 0.8), "train_memory_ratio": ("<=", 0.7),
    "loader_over_gpu_w16": (">=", 1.0), "compile_recompiled_on_switch": ("==", False),
}


# ===================================================================================================
# the parent: runs the sections as child processes, then the CUDA tests; merges, judges, writes
# ===================================================================================================

class Log:
    """Prints and appends to gpu.log (from any thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()

    def __call__(self, msg: str, raw: bool = False) -> None:
        line = msg if raw else f"[gpu {time.perf_counter() - self.t0:6.1f}s] {msg}"
        with self.lock:
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def run_logged(cmd: list[str], timeout: float, log: Log, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` (its own process group), streaming its output into the log; kill it after ``timeout``
    seconds. -> (exit code or None on timeout, its last 4,000 characters of output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    tail: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log("  | " + line.rstrip("\n"), raw=True)
            tail.append(line)
            del tail[:-60]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    reader.join(timeout=5)
    return rc, "".join(tail)[-4000:]


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "host": platform.node(), "cpus": os.cpu_count()}
    try:
        env["cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # noqa: BLE001 - a report field, never a failure
        env["cudnn"] = f"unknown ({e})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"not available ({e.__class__.__name__})"
    env["device"] = device
    return env


def judge(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, goal) in GOALS.items():
        if key not in results:
            continue
        v = results[key]
        met = v == goal if op == "==" else (v >= goal if op == ">=" else v <= goal)
        out[key] = {"value": v, "goal": f"{op} {goal}", "met": bool(met)}
    return out


def derive(results: dict[str, Any]) -> None:
    """Figures that combine two sections: the DataLoader's clips/s over the GPU's adapter-training clips/s."""
    gpu = results.get("train_adapter_clips_per_s")
    for w in (0, 2, 8, 16):
        got = results.get(f"loader_clips_per_s_w{w}")
        if gpu and got:
            results[f"loader_over_gpu_w{w}"] = round(got / gpu, 3)


def parent(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu.log")
    device = args.device or ("cpu" if args.smoke else "cuda")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: device {device!r} was asked for, but torch sees no CUDA device (use --smoke on a CPU)",
              file=sys.stderr)
        return 1
    env = environment(device)
    log(f"nvidia-smi: {env['nvidia_smi']}")
    log(f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}, "
        f"{env['cpus']} CPUs; device {device}; {'smoke' if args.smoke else 'full'} run, budget {args.budget:.0f} s")
    chosen = [s for s in SECTIONS if (not args.only or s in args.only) and s not in args.skip]
    report: dict[str, Any] = {"environment": env, "smoke": args.smoke, "sections": {}, "results": {}}
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="stadapter-gpu-"))

    def write() -> None:
        derive(report["results"])
        report["goals"] = judge(report["results"])
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / "gpu.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")

    for name in chosen:
        left = args.budget - (time.perf_counter() - t_start)
        if name != "tests" and "tests" in chosen:
            left -= BOXES["tests"][1 if args.smoke else 0]  # the tests, last, always keep their box
        timeout = min(BOXES[name][1 if args.smoke else 0], left)
        if timeout < 5:
            report["sections"][name] = {"status": "not run (budget spent)"}
            log(f"{name}: not run, the budget is spent")
            write()
            continue
        log(f"== {name} (time box {timeout:.0f} s)")
        t0 = time.perf_counter()
        if name == "tests":
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
                   "tests/test_cuda.py"]
            rc, tail = run_logged(cmd, timeout, log)
            summary = next((ln for ln in reversed(tail.splitlines()) if " in " in ln and "=" not in ln[:1]), "")
            status = "timeout" if rc is None else ("ok" if rc == 0 else f"failed (exit {rc})")
            report["tests"] = {"status": status, "summary": summary.strip(" ="), "command": " ".join(cmd[2:])}
            report["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
        else:
            result = tmp / f"{name}.json"
            cmd = [sys.executable, __file__, "--section", name, "--result", str(result), "--device", device]
            if args.smoke:
                cmd.append("--smoke")
            rc, tail = run_logged(cmd, timeout, log)
            figures = json.loads(result.read_text()) if result.exists() else {}
            error = figures.pop("_error", None)
            status = "timeout" if rc is None else ("ok" if rc == 0 and not error else f"failed (exit {rc})")
            entry: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
            if error or rc != 0:
                entry["error"] = error or tail[-2000:]
            report["sections"][name] = entry
            report["results"].update(figures)
        log(f"{name}: {report['sections'][name]['status']} in {report['sections'][name]['seconds']} s")
        write()

    write()
    shutil.rmtree(tmp, ignore_errors=True)
    log("== summary")
    for key, g in report["goals"].items():
        log(f"{key:34s} {g['value']!s:>10}  goal {g['goal']:8s} {'met' if g['met'] else 'NOT met'}")
    for name, s in report["sections"].items():
        log(f"section {name:9s} {s['status']}")
    if "tests" in report:
        log(f"tests: {report['tests']['status']}: {report['tests']['summary']}")
    log(f"wrote {out / 'gpu.json'} and {out / 'gpu.log'} in {report['seconds']} s")
    failed = [n for n, s in report["sections"].items() if s["status"] != "ok"]
    return 1 if failed else 0


# ===================================================================================================
# the children: one section each
# ===================================================================================================

class Ctx:
    """What a section gets: the device, smoke or full sizes, and a result file written after every figure."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from stadapter.runtime.engine import pick_device

        self.args, self.smoke = args, args.smoke
        self.device = pick_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.path = Path(args.result)
        self.results: dict[str, Any] = {}
        self.benches: list[Any] = []
        if not self.cuda:  # one thread: on a shared CPU, OpenMP threads waiting on a descheduled peer add noise
            torch.set_num_threads(1)

    def pick(self, smoke: Any, full: Any) -> Any:
        return smoke if self.smoke else full

    def bench(self, backbone: str | None = None, **over: Any) -> Any:
        """A benchmarks/runtime.py Bench on this device (its registry in a temporary folder)."""
        from runtime import Bench

        ns = argparse.Namespace(quick=self.smoke, device=str(self.device),
                                backbone=backbone or self.pick("tiny", "open_clip:ViT-B-16"),
                                frames=self.pick(4, 8), compile=None, zipf_tasks=1000, zipf_budget=64,
                                zipf_backbone=None, threads=None, skip="")
        for k, v in over.items():
            setattr(ns, k, v)
        b = Bench(ns)
        self.benches.append(b)
        return b

    def put(self, key: str, value: Any) -> None:
        self.results[key] = value
        self.save()

    def save(self, error: str | None = None) -> None:
        merged: dict[str, Any] = {}
        for b in self.benches:
            merged.update(b.results)
        merged.update(self.results)
        if error:
            merged["_error"] = error
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True, default=str))
        os.replace(tmp, self.path)

    def close(self) -> None:
        for b in self.benches:
            engine = getattr(b, "engine", None)
            if engine is not None:
                engine.close()
            b.reg.close()
            b.tmp.cleanup()


def log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


# -- serve -------------------------------------------------------------------------------------------

def section_serve(ctx: Ctx) -> None:
    from runtime import BareBackbone, switch_streams

    from stadapter.model.flops import count_gmacs
    from stadapter.model.video_vit import VideoViT
    from stadapter.runtime.engine import device_name

    b = ctx.bench()
    b.setup()
    ctx.put("device_name", device_name(b.device))
    e, hs = b.engine, b.handles
    bare = BareBackbone(b.backbone, hs[0], e)
    rounds = ctx.pick(2, 10)
    per_s: dict[str, dict[str, float]] = {}
    for n in ctx.pick((1, 2, 4), (1, 8, 32)):
        x = b.clips(n)
        t = b.interleaved({"bare": lambda x=x: bare(x), "engine": lambda x=x, n=n: e.forward(x, [hs[0]] * n)},
                          rounds)
        b.put(f"adapter_overhead_b{n}", t["engine"] / t["bare"], "c overhead",
              f"batch {n} x {b.frames} frames, best of {rounds}")
        per_s[str(n)] = {"bare": round(n / t["bare"], 2), "engine": round(n / t["engine"], 2)}
        ctx.put("serve_clips_per_s", per_s)
        log(f"batch {n}: bare {n / t['bare']:.1f} clips/s, engine {n / t['engine']:.1f} clips/s")
    one = b.clips(1)[0][None].to(b.device, b.dtype)
    vit = VideoViT(b.backbone, hs[0].adapter, b.frames)
    rs = e.acquire(hs[0])
    ctx.put("flop_ratio", round(count_gmacs(vit, one, rs.tensors) / count_gmacs(b.backbone, one.flatten(0, 1)), 4))

    # mixed: 32 clips over 8 tasks (4 each, interleaved) vs 32 clips of one task, plus each clip alone
    n = ctx.pick(8, 32)
    x = b.clips(n)
    mixed_handles = [hs[i % len(hs)] for i in range(n)]
    out_mixed = e.forward(x, mixed_handles)
    diff = max(float((out_mixed[i] - e.forward([x[i]], [mixed_handles[i]])[0]).abs().max()) for i in range(n))
    ctx.put("mixed_vs_alone_max_abs_diff", diff)
    t = b.interleaved({"single": lambda: e.forward(x, [hs[0]] * n), "mixed": lambda: e.forward(x, mixed_handles)},
                      rounds)
    b.put("mixed_batch_ratio", t["single"] / t["mixed"], "b mixed batch",
          f"{n} clips over {len(hs)} tasks, best of {rounds}; {n / t['mixed']:.1f} clips/s mixed")

    # switching: requests alternating between two tasks vs staying on one; a PEFT-style copy beside it
    per_req, n_req = ctx.pick((2, 4), (4, 12))
    reqs = [b.clips(per_req) for _ in range(n_req)]
    streams, pefts = switch_streams(e, b.backbone, hs, reqs, b.device, b.dtype)
    t = b.interleaved(streams, rounds)
    b.put("switch_ratio", t["one"] / t["alt"], "a switch", f"{n_req} requests x {per_req} clips, best of {rounds}")
    b.put("switch_ratio_peft_copy", t["peft_one"] / t["peft_alt"], "a switch",
          f"load_state_dict per switch ({pefts[True].nbytes / 1e6:.1f} MB)")
    ctx.put("switch_clips_per_s", {k: round(n_req * per_req / v, 2) for k, v in t.items()})
    ctx.put("serve_dtype", str(b.dtype).replace("torch.", ""))
    ctx.put("serve_backbone", b.backbone_spec)


# -- pool --------------------------------------------------------------------------------------------

def section_pool(ctx: Ctx) -> None:
    b = ctx.bench()
    b.quick = ctx.smoke  # 20 loads on a smoke run, 50 on the GPU
    b.vit_b_sets()
    r = b.results
    if r.get("resident_ratio_accounted"):
        # device (or RSS) bytes per set over the bytes the pool holds for it (fp16 adapters on CUDA)
        ctx.put("resident_ratio_device_bytes", round(r["resident_ratio"] / r["resident_ratio_accounted"], 4))
    ctx.save()


# -- train -------------------------------------------------------------------------------------------

def section_train(ctx: Ctx) -> None:
    import torch

    from stadapter.config import AdapterConfig, TrainConfig
    from stadapter.model.video_vit import VideoViT, count_parameters
    from stadapter.recipes import preset
    from stadapter.training import dist as D
    from stadapter.training.api import prepare_backbone
    from stadapter.training.loop import AdapterParams, _Stepper, autocast_dtype
    from stadapter.training.optim import make_optimizer
    from stadapter.video.datasets import SkipCounter

    dev = ctx.device
    spec = ctx.pick("tiny", "open_clip:ViT-B-16")
    B, T = ctx.pick((2, 4), (8, 8))
    steps, warm = ctx.pick((2, 1), (5, 2))
    cfg = TrainConfig(batch_size=B, amp=True)
    base = prepare_backbone(spec, "none", dev, amp=cfg.amp)  # fp16 on CUDA, as `stadapter train` does
    size = base.image_size[0]
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(B, T, 3, size, size, generator=g)  # on the host, as the DataLoader gives them
    if ctx.cuda:
        clips = clips.pin_memory()
    batch = (torch.arange(B), clips, torch.randint(0, 400, (B,), generator=g), [])
    amp = autocast_dtype(cfg, dev)
    ctx.put("train_setup", f"{spec}, batch {B} x {T} frames, {size} px, autocast {amp}, "
                           f"{'fp16' if ctx.cuda else 'fp32'} frozen backbone")
    k400 = preset("k400").adapter
    for name, adapter in (("adapter", k400), ("full", AdapterConfig(num_classes=400, method="full"))):
        model = VideoViT(base, adapter, T)  # full: every backbone tensor replaced by a trained fp32 copy
        module = AdapterParams(model, {k: v.to(dev) for k, v in model.init_adapter_set(g).items()}, cfg.seed)
        opt = make_optimizer(module.tensors(), cfg, 1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
        stepper = _Stepper(module, module, opt, scaler, D.DistInfo(), dev, amp, 1, B)
        model.train()
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        skips = SkipCounter()
        for _ in range(warm):
            stepper.step(iter([batch]), 0, 1e-4, skips)
        if ctx.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            stepper.step(iter([batch]), 0, 1e-4, skips)
        if ctx.cuda:
            torch.cuda.synchronize()
        secs = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() if ctx.cuda else 0
        ctx.put(f"train_{name}_step_s", round(secs, 4))
        ctx.put(f"train_{name}_clips_per_s", round(B / secs, 2))
        ctx.put(f"train_{name}_peak_bytes", int(peak))
        ctx.put(f"train_{name}_trainable_params", count_parameters(module.tensors()))
        log(f"{name}: {secs * 1000:.1f} ms/step, {B / secs:.1f} clips/s, peak {peak / 2**30:.2f} GiB")
        del model, module, opt, scaler, stepper
        if ctx.cuda:
            torch.cuda.empty_cache()
    r = ctx.results
    ctx.put("train_time_ratio", round(r["train_adapter_step_s"] / r["train_full_step_s"], 4))
    if r["train_full_peak_bytes"]:
        ctx.put("train_memory_ratio", round(r["train_adapter_peak_bytes"] / r["train_full_peak_bytes"], 4))


# -- loader ------------------------------------------------------------------------------------------

def _write_clip(job: tuple[str, int, int, int, int]) -> str:
    """A real inter-coded H.264 clip (libx264, keyframe every 50 frames) of a smooth texture panning."""
    import av
    import numpy as np

    path, frames, width, height, seed = job
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, (width + frames * 2) // 8 + 1, 3), dtype=np.uint8)
    base = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # blocks, then a little noise on top
    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 50
        for i in range(frames):
            img = base[:height, 2 * i:2 * i + width].copy()
            img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def section_loader(ctx: Ctx) -> None:
    files, frames, (w, h) = ctx.pick((4, 48, (96, 80)), (16, 200, (340, 256)))  # K400 clips: ~340 x 256
    n_samples, batch = ctx.pick((32, 4), (256, 8))
    workers_list = ctx.pick((0, 2), (8, 16))
    size = ctx.pick(32, 224)
    root = Path(tempfile.mkdtemp(prefix="stadapter-loader-"))
    try:
        _measure_loader(ctx, root, files, frames, w, h, n_samples, batch, workers_list, size)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure_loader(ctx: Ctx, root: Path, files: int, frames: int, w: int, h: int, n_samples: int, batch: int,
                    workers_list: tuple[int, ...], size: int) -> None:
    from multiprocessing import Pool

    from stadapter.model.loading import load_backbone
    from stadapter.recipes import preset
    from stadapter.training.data import ClipSource, make_loader
    from stadapter.video.datasets import Sample

    t0 = time.perf_counter()
    jobs = [(str(root / f"clip{i:03d}.mp4"), frames, w, h, i) for i in range(files)]
    with Pool(min(files, os.cpu_count() or 1)) as pool:
        paths = pool.map(_write_clip, jobs)
    ctx.put("loader_clips", f"{files} H.264 files, {w}x{h}, {frames} frames, GOP 50; {n_samples} samples in "
                            f"batches of {batch}; K400 recipe (dense, 8 x stride 16, random crop, flip), {size} px")
    log(f"wrote {files} clips in {time.perf_counter() - t0:.1f} s")
    bb = load_backbone("tiny", "none")  # for CLIP's mean and std only
    spec = preset("k400").task
    samples = [Sample(Path(paths[i % files]), i % 4) for i in range(n_samples)]
    source = ClipSource(samples, spec, (size, size), bb.mean, bb.std, seed=0)
    plan = [list(range(i, i + batch)) for i in range(0, n_samples, batch)]
    for workers in workers_list:
        loader = make_loader(source, plan, epoch=0, train=True, seed=0, workers=workers)
        t0 = time.perf_counter()
        first = None
        n = 0
        for _ids, clips, _labels, skipped in loader:
            assert not skipped, skipped
            n += len(clips)
            if first is None:
                first = time.perf_counter()
                assert tuple(clips.shape[1:]) == (spec.num_frames, 3, size, size), clips.shape
        end = time.perf_counter()
        assert first is not None
        rate = (n - batch) / max(end - first, 1e-9)
        ctx.put(f"loader_clips_per_s_w{workers}", round(rate, 2))
        ctx.put(f"loader_first_batch_s_w{workers}", round(first - t0, 2))
        log(f"{workers} workers: {rate:.1f} clips/s after the first batch ({first - t0:.1f} s)")


# -- zipf --------------------------------------------------------------------------------------------

def section_zipf(ctx: Ctx) -> None:
    from stadapter.model.loading import load_backbone

    spec = ctx.pick("tiny", "small")
    b = ctx.bench(backbone=spec, zipf_backbone=spec, zipf_tasks=ctx.pick(16, 1000), zipf_budget=ctx.pick(4, 64))
    b.quick = ctx.smoke
    b.backbone = load_backbone(spec, "none")  # what Bench.setup would load; its 8 tasks are not needed here
    b.zipf()
    ctx.save()


# -- compiled ----------------------------------------------------------------------------------------

def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_recorded_inputs": counters["inductor"]["cudagraph_recorded_non_static_inputs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def section_compiled(ctx: Ctx) -> None:
    import torch
    import torch._dynamo

    from stadapter.runtime.engine import Engine

    b = ctx.bench()
    b.setup()
    e, hs = b.engine, b.handles
    n = 8
    x = b.clips(n)
    ref = e.forward(x, [hs[0]] * n)
    rounds = ctx.pick(2, 10)
    modes = ctx.pick(("aot_eager",), ("reduce-overhead", "default"))  # CPU: a dynamo backend stands in
    per_s: dict[str, float] = {}
    for mode in modes:
        torch._dynamo.reset()
        c = Engine(b.backbone, b.reg, device=b.device, max_resident=64, compile=mode)
        ch = [c.resolve(t) for t in b.tasks]
        for h in ch:
            c.acquire(h)
        t0 = time.perf_counter()
        out = c.forward(x, [ch[0]] * n)
        ctx.put(f"compile_first_call_s_{mode}", round(time.perf_counter() - t0, 1))
        diff = max(float((a - r).abs().max()) for a, r in zip(out, ref, strict=True))
        ctx.put(f"compile_vs_eager_max_abs_diff_{mode}", diff)
        for _ in range(3):  # CUDA graph trees: warm-up, record, replay
            c.forward(x, [ch[0]] * n)
        before = dynamo_counts()
        torch.compiler.set_stance("fail_on_recompile")
        recompiled = False
        try:
            for k in range(len(ch)):
                c.forward(x, [ch[(k + j) % len(ch)] for j in range(n)])  # 8 tasks mixed in one batch
                c.forward(x, [ch[k]] * n)
        except RuntimeError as err:
            if "recompil" not in str(err).lower():
                raise
            recompiled = True
        finally:
            torch.compiler.set_stance("default")
        after = dynamo_counts()
        ctx.put(f"compile_counts_{mode}", {"before": before, "after": after})
        ctx.put(f"compile_recompiled_on_switch_{mode}", recompiled or after != before)
        ctx.put(f"compile_cudagraphs_skipped_{mode}", after["cudagraph_skips"] > 0)
        t = b.interleaved({"uncompiled": lambda: e.forward(x, [hs[0]] * n),
                           "compiled": lambda c=c, h=ch[0]: c.forward(x, [h] * n)}, rounds)
        per_s["eager"] = round(n / t["uncompiled"], 2)
        per_s[mode] = round(n / t["compiled"], 2)
        ctx.put(f"compile_clips_per_s_b{n}", per_s)
        ctx.put(f"compile_speedup_{mode}", round(t["uncompiled"] / t["compiled"], 4))
        log(f"{mode}: {n / t['compiled']:.1f} clips/s vs eager {n / t['uncompiled']:.1f}; recompiled on switch: "
            f"{recompiled or after != before}")
        c.close()
    ctx.put("compile_recompiled_on_switch",
            any(ctx.results.get(f"compile_recompiled_on_switch_{m}", False) for m in modes))


SECTION_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "serve": section_serve, "pool": section_pool, "train": section_train, "loader": section_loader,
    "zipf": section_zipf, "compiled": section_compiled}


def child(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/runtime.py
    ctx = Ctx(args)
    t0 = time.perf_counter()
    try:
        SECTION_FUNCS[args.section](ctx)
        ctx.put(f"{args.section}_seconds", round(time.perf_counter() - t0, 1))
        return 0
    except Exception:  # noqa: BLE001 - recorded in the result file and the log; the parent goes on
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        ctx.save(error=tb[-3000:])
        return 1
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny backbone on the CPU, small sizes (< 2 min)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--out", default=None, help="folder for gpu.json and gpu.log (default: $OUT, else runs/gpu)")
    ap.add_argument("--only", default="", help=f"comma-separated sections to run ({', '.join(SECTIONS)})")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all sections together (default 420; --smoke: 300, a cap: it takes 1-2.5 min)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # a child's own section
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section:
        return child(args)
    args.only = set(filter(None, args.only.split(",")))
    args.skip = set(filter(None, args.skip.split(",")))
    unknown = (args.only | args.skip) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.budget is None:
        args.budget = 300.0 if args.smoke else 420.0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
