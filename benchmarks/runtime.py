"""Runtime benchmark: task switches, mixed-task batches, adapter overhead, resident bytes, many tasks under a
Zipf stream, and cold loads -- side by side in one run, against the goals of issue 6.

    python benchmarks/runtime.py                  # CPU: the 'small' backbone; < 10 min on 2 cores
    python benchmarks/runtime.py --quick          # CI-size (a few minutes)
    python benchmarks/runtime.py --device cuda    # GPU: ViT-B/16 in fp16 (add --compile reduce-overhead)

Everything runs in a temporary STADAPTER_HOME (a real registry; never the user's). Clips are random tensors
(decoding is not part of these figures). Timed variants of (a)-(c) are interleaved round by round and each is
taken at its fastest round (the one least disturbed by other load on a shared machine); (e) sums interleaved
chunks of its two streams. CPU runs use 1 torch thread unless --threads says otherwise. Prints a table, then
as its LAST line one JSON object.

(a) switch_ratio: throughput of requests alternating between two tasks over requests staying on one, through
    the engine; beside it a PEFT-style swap (load_state_dict copying the next task's state dict, already in
    device memory, into the model's parameters) and loading a full model (backbone + adapters) per switch.
(b) mixed_batch_ratio: 16 clips over 8 tasks in one batch over 16 clips of one task; beside it grouping by
    task and running each group as its own batch.
(c) adapter_overhead: the engine's single-task forward over the bare frozen backbone's (same pooling, norm and
    head), with the FLOP ratio of the two.
(d) resident_ratio: device/host memory per extra resident task over the bundle's tensor bytes (ViT-B/16-size
    sets, 7.4M parameters), measured (CUDA: allocated bytes; CPU: process RSS) and as the pool accounts it.
(e) zipf: 1,000 registered tasks, a pool of 64 resident sets, a Zipf(1.1) request stream in batches through
    the real engine (resolve + prefetch as requests arrive, as the server does), against the same stream on one
    task: throughput ratio and p99 latency ratio (latency: the batch's acquire + forward time).
(f) cold_load: registry -> resident for a ViT-B/16-size set (not in any tier; its files verified once by this
    process, as the engine does), p50/p99 over many loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from stadapter.bundle import Bundle  # noqa: E402
from stadapter.config import AdapterConfig, TaskSpec  # noqa: E402
from stadapter.model.backbone import build_architecture  # noqa: E402
from stadapter.model.flops import count_gmacs  # noqa: E402
from stadapter.model.loading import load_backbone  # noqa: E402
from stadapter.model.video_vit import VideoViT  # noqa: E402
from stadapter.registry import open_registry  # noqa: E402
from stadapter.runtime.engine import Engine, device_name, pick_device  # noqa: E402
from stadapter.runtime.pool import AdapterPool, SetSource  # noqa: E402

GOALS = {"switch_ratio": (">=", 0.99), "mixed_batch_ratio": (">=", 0.9), "adapter_overhead": ("<=", 1.10),
         "adapter_overhead_vit_b16": ("<=", 1.10),
         "resident_ratio": ("<=", 1.1), "zipf_throughput_ratio": (">=", 0.9), "zipf_p99_ratio": ("<=", 1.5),
         "cold_load_p99_ms": ("<=", 10.0)}
VIT_B16_K400_PARAMS = 7_417_744


def switch_streams(e: Engine, backbone: Any, hs: list[Any], reqs: list[list[torch.Tensor]], device: Any,
                   dtype: torch.dtype) -> tuple[dict[str, Callable[[], None]], dict[bool, PeftStyle]]:
    """The four request streams of the switch measurement: the engine staying on one task ("one") or
    alternating between two ("alt"), and a PEFT-style copy of the adapters into module parameters per switch
    ("peft_one", "peft_alt"). Also returns the PEFT-style models (for their byte counts)."""
    n_req, per_req = len(reqs), len(reqs[0])

    def stream(order: Callable[[int], int]) -> Callable[[], None]:
        def run() -> None:
            for i in range(n_req):
                e.forward(reqs[i], [hs[order(i)]] * per_req)
        return run

    pefts = {alt: PeftStyle(backbone, hs[:2], e, device, dtype) for alt in (False, True)}

    def peft_stream(alternate: bool) -> Callable[[], None]:
        peft = pefts[alternate]

        def run() -> None:
            for i in range(n_req):
                peft.swap(i % 2 if alternate else 0)
                peft.forward(torch.stack(reqs[i]))
        return run

    return ({"one": stream(lambda i: 0), "alt": stream(lambda i: i % 2),
             "peft_one": peft_stream(False), "peft_alt": peft_stream(True)}, pefts)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.device = pick_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.tmp = tempfile.TemporaryDirectory(prefix="stadapter-bench-")
        self.root = Path(self.tmp.name)
        self.reg = open_registry(home=self.root / "home")
        self.results: dict = {}
        self.rows: list[tuple[str, str, str, str]] = []
        self.gen = torch.Generator().manual_seed(0)
        self.t_start = time.perf_counter()
        default = "open_clip:ViT-B-16" if self.cuda else "small"
        self.backbone_spec = args.backbone or default
        self.frames = args.frames or (8 if (self.cuda or not self.quick) else 4)
        self.log(f"device: {device_name(self.device)}; backbone {self.backbone_spec}; {self.frames} frames; "
                 f"{'quick' if self.quick else 'full'} run")

    # -- helpers -----------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def interleaved(self, fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
        """The fastest round's seconds per variant (the least disturbed by other load on the machine), the
        variants' order rotating each round."""
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        best = dict.fromkeys(fns, float("inf"))
        names = list(fns)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                best[name] = min(best[name], self.timed(fns[name]))
        return best

    def row(self, section: str, name: str, value: str, note: str = "") -> None:
        self.rows.append((section, name, value, note))

    def put(self, key: str, value: float, section: str, note: str = "", fmt: str = "{:.3f}") -> None:
        self.results[key] = round(float(value), 4)
        goal = GOALS.get(key)
        verdict = ""
        if goal is not None:
            ok = value >= goal[1] if goal[0] == ">=" else value <= goal[1]
            verdict = f"goal {goal[0]} {goal[1]}: {'met' if ok else 'NOT met'}"
        self.row(section, key, fmt.format(value), "; ".join(x for x in (verdict, note) if x))

    def clips(self, n: int, frames: int | None = None, size: int | None = None) -> list[torch.Tensor]:
        T = frames or self.frames
        S = size or self.backbone.image_size[0]
        x = torch.randn(n, T, 3, S, S, generator=self.gen).to(self.device)
        return list(x.unbind(0))

    def make_tasks(self, backbone, names: list[str], width: int, frames: int, classes: Callable[[int], int],
                   scale: float = 0.02) -> list[str]:
        desc = {**backbone.describe(), "weights": getattr(backbone, "weights", "none"),
                "fingerprint": backbone.fingerprint()}
        for i, name in enumerate(names):
            cfg = AdapterConfig(num_classes=classes(i), width=width)
            model = VideoViT(backbone, cfg, frames)
            tensors = {k: torch.randn(v.shape, generator=self.gen) * scale
                       for k, v in model.init_adapter_set().items()}
            d = Bundle(task=name, adapter=cfg, spec=TaskSpec(num_frames=frames), backbone=desc,
                       labels=[f"c{j}" for j in range(cfg.num_classes)], tensors=tensors).save(self.root / "b" / name)
            self.reg.register(d)
            for f in d.iterdir():  # the registry holds its own copy
                f.unlink()
            d.rmdir()
        return names

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.backbone = load_backbone(self.backbone_spec, "none")
        self.width = max(8, self.backbone.dim // 2)  # r / D = 384 / 768 as the ViT-B/16 K400 preset
        self.log(f"backbone dim {self.backbone.dim}, depth {self.backbone.depth}, adapter width {self.width}")
        self.tasks = self.make_tasks(self.backbone, [f"task{i}" for i in range(8)], self.width, self.frames,
                                     lambda i: 10 if i < 2 else 10 + 7 * i)  # a, PEFT-style: one head shape
        self.engine = Engine(self.backbone, self.reg, device=self.device, max_resident=64,
                             compile=self.args.compile)
        self.handles = [self.engine.resolve(t) for t in self.tasks]
        for h in self.handles:
            self.engine.acquire(h)

    # -- (a) ---------------------------------------------------------------------------------------------
    def switch(self) -> None:
        e, hs = self.engine, self.handles
        per_req = 2 if self.quick else 4
        n_req = 6 if self.quick else 12
        rounds = 8 if self.quick else 30
        reqs = [self.clips(per_req) for _ in range(n_req)]

        streams, pefts = switch_streams(e, self.backbone, hs, reqs, self.device, self.dtype)

        # a full model (backbone + adapters) loaded from disk per switch (one instance per stream)
        fulls = {alt: FullModelPerTask(self, hs[:2]) for alt in (False, True)}

        def full_stream(alternate: bool) -> Callable[[], None]:
            full = fulls[alternate]

            def run() -> None:
                for i in range(n_req):
                    full.forward(i % 2 if alternate else 0, torch.stack(reqs[i]))
            return run

        self.log("(a) switching: engine, PEFT-style copy, full model per task")
        t = self.interleaved(streams, rounds)
        full_rounds = 3 if self.quick else 4
        tf = self.interleaved({"full_one": full_stream(False), "full_alt": full_stream(True)}, full_rounds)
        thr = lambda secs, r: n_req * per_req / secs  # noqa: E731
        note = f"{n_req} requests x {per_req} clips per stream, best of {rounds}"
        self.put("switch_ratio", t["one"] / t["alt"], "a switch", note)
        self.put("switch_ratio_peft_copy", t["peft_one"] / t["peft_alt"], "a switch",
                 f"load_state_dict per switch ({pefts[True].nbytes / 1e6:.1f} MB copied)")
        self.put("switch_ratio_full_model", tf["full_one"] / tf["full_alt"], "a switch",
                 f"backbone + adapters rebuilt and loaded per switch ({fulls[True].nbytes / 1e6:.0f} MB file)")
        self.results["switch_clips_per_s"] = {
            "engine_one": round(thr(t["one"], rounds), 2), "engine_alternating": round(thr(t["alt"], rounds), 2),
            "peft_one": round(thr(t["peft_one"], rounds), 2), "peft_alternating": round(thr(t["peft_alt"], rounds), 2),
            "full_one": round(thr(tf["full_one"], full_rounds), 2),
            "full_alternating": round(thr(tf["full_alt"], full_rounds), 2)}

    # -- (b) and (c) -------------------------------------------------------------------------------------
    def mixed(self) -> None:
        e, hs = self.engine, self.handles
        rounds = 5 if self.quick else 8
        x = self.clips(16)
        mixed_handles = [hs[i // 2] for i in range(16)]  # 16 clips over 8 tasks
        single = lambda: e.forward(x, [hs[0]] * 16)  # noqa: E731
        mixed = lambda: e.forward(x, mixed_handles)  # noqa: E731
        grouped = lambda: [e.forward(x[2 * k:2 * k + 2], [hs[k]] * 2) for k in range(8)]  # noqa: E731
        bare = BareBackbone(self.backbone, hs[0], e)
        out_mixed = e.forward(x, mixed_handles)
        alone = [e.forward(x[2 * k:2 * k + 2], [hs[k]] * 2) for k in range(8)]
        diff = max(float((a - b).abs().max()) for a, b in zip(out_mixed, [o for g in alone for o in g]))
        self.results["mixed_vs_alone_max_abs_diff"] = diff  # logits; fp16 on CUDA
        self.log("(b, c) one task / 8 tasks mixed / grouped by task / bare backbone, 16 clips")
        t = self.interleaved({"single": single, "mixed": mixed, "grouped": grouped, "bare": lambda: bare(x)}, rounds)
        self.put("mixed_batch_ratio", t["single"] / t["mixed"], "b mixed batch",
                 f"16 clips x {self.frames} frames, best of {rounds}; {16 / t['mixed']:.1f} clips/s mixed")
        self.put("grouped_ratio", t["single"] / t["grouped"], "b mixed batch", "8 separate batches of 2 clips")
        self.put("adapter_overhead", t["single"] / t["bare"], "c overhead",
                 f"ST-Adapter r={self.width} in every block, {self.backbone_spec}")
        vit = VideoViT(self.backbone, hs[0].adapter, self.frames)
        rs = e.acquire(hs[0])
        one = x[0][None].to(self.device, self.dtype)
        flops_model = count_gmacs(vit, one, rs.tensors)
        flops_bb = count_gmacs(self.backbone, one.flatten(0, 1))
        self.put("flop_ratio", flops_model / flops_bb, "c overhead", f"{flops_model:.2f} vs {flops_bb:.2f} GMACs/view")

    def overhead_vit_b16(self) -> None:
        """(c) again on the real ViT-B/16 at 224 px with the K400 preset (CPU full runs; on CUDA the main
        backbone is ViT-B/16 already): the engine's forward over the bare backbone's, and the training
        module's (VideoViT with st_adapter) beside it."""
        from stadapter.recipes import preset

        self.log("(c) ViT-B/16 224 px, 8 frames, K400 adapters, 1 clip")
        bb = load_backbone("open_clip:ViT-B-16", "none")
        cfg = preset("k400").adapter
        (task,) = self.make_tasks(bb, ["vitb16-k400"], cfg.width, 8, lambda i: 400)
        engine = Engine(bb, self.reg, device=self.device, max_resident=2)
        h = engine.resolve(task)
        bare = BareBackbone(engine.backbone, h, engine)
        model = VideoViT(engine.backbone, h.adapter, 8).eval()
        tensors = engine.acquire(h).tensors
        x = torch.randn(1, 8, 3, 224, 224, generator=self.gen).to(self.device, self.dtype)
        clips = list(x.unbind(0))

        def module() -> None:
            with torch.inference_mode():
                model(x, tensors)

        rounds = 2 if self.quick else 5
        t = self.interleaved({"bare": lambda: bare(clips), "engine": lambda: engine.forward(clips, [h]),
                              "module": module}, rounds)
        self.put("adapter_overhead_vit_b16", t["engine"] / t["bare"], "c overhead",
                 f"open_clip:ViT-B-16 224 px, r={cfg.width}, 1 adapter per block, engine (FLOP ratio 1.079), "
                 f"best of {rounds}")
        self.put("adapter_overhead_vit_b16_module", t["module"] / t["bare"], "c overhead",
                 "the same through the training module (VideoViT, st_adapter)")
        engine.close()
        del bb, model, engine

    # -- (d) and (f) -------------------------------------------------------------------------------------
    def vit_b_sets(self) -> None:
        n_sets = 8
        loads = 20 if self.quick else 50
        self.log(f"(d, f) {n_sets} ViT-B/16-size sets (7.4M params): register, then load")
        refs, expected = self.register_vit_b_sets(n_sets)
        infos = [self.reg.resolve(r) for r in refs]
        paths: dict[int, Path] = {}

        def locate(info) -> Path:
            if info.id not in paths:
                paths[info.id] = Path(self.reg.materialize(info)) / "adapter.safetensors"
            return paths[info.id]

        def check(tensors) -> None:
            from stadapter.model.video_vit import check_adapter_set

            check_adapter_set(expected, tensors)

        def source(info) -> SetSource:
            return SetSource(info.id, lambda: locate(info), check, info.ref)

        pool = AdapterPool(self.device, self.dtype, max_sets=n_sets + 1, host_max_bytes=0)
        t0 = time.perf_counter()
        pool.get(source(infos[0]))
        first = (time.perf_counter() - t0) * 1000
        tensor_bytes = (locate(infos[0]).stat().st_size - _data_offset(locate(infos[0])))
        pool.clear()
        # (d) memory per extra resident set
        before_acc, before_mem = pool.resident_bytes, self.memory()
        kept = [pool.get(source(i)) for i in infos]
        after_acc, after_mem = pool.resident_bytes, self.memory()
        per_acc = (after_acc - before_acc) / n_sets
        per_mem = (after_mem - before_mem) / n_sets
        self.put("resident_ratio", per_mem / tensor_bytes, "d resident",
                 f"{'CUDA allocated bytes' if self.cuda else 'process RSS'} per extra set / "
                 f"{tensor_bytes / 1e6:.1f} MB of tensors"
                 + ("; adapters held in fp16" if self.cuda else "; a shared map of the store file"))
        self.put("resident_ratio_accounted", per_acc / tensor_bytes, "d resident", "as the pool accounts it")
        del kept
        # (f) cold loads: not in any tier; files verified once (materialize) as the engine does
        times, with_resolve = [], []
        for k in range(loads):
            info = infos[k % n_sets]
            pool.clear()
            self.sync()
            t0 = time.perf_counter()
            pool.get(source(info))
            self.sync()
            times.append((time.perf_counter() - t0) * 1000)
            pool.clear()
            t0 = time.perf_counter()
            pool.get(source(self.reg.resolve(info.ref)))
            self.sync()
            with_resolve.append((time.perf_counter() - t0) * 1000)
        p = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
        self.put("cold_load_p99_ms", p(times, 99), "f cold load", f"p50 {p(times, 50):.2f} ms over {loads} loads; "
                 f"{'mmap of the page-cached store file' if not self.cuda else 'file -> pinned -> device, fp16'}",
                 fmt="{:.2f}")
        self.results["cold_load_p50_ms"] = round(p(times, 50), 3)
        self.put("cold_load_with_resolve_p99_ms", p(with_resolve, 99), "f cold load",
                 "plus a registry resolve (database query)", fmt="{:.2f}")
        self.put("first_load_ms", first, "f cold load", "first load in a process: materialize + sha256 of "
                 "every file, then load", fmt="{:.1f}")
        pool.close()

    def register_vit_b_sets(self, n: int) -> tuple[list[str], dict]:
        D, r, depth, classes = 768, 384, 12, 400
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(depth):
            shapes |= {f"adapters.{i}.attn.fc1.weight": (r, D), f"adapters.{i}.attn.fc1.bias": (r,),
                       f"adapters.{i}.attn.conv.weight": (r, 1, 3, 1, 1), f"adapters.{i}.attn.conv.bias": (r,),
                       f"adapters.{i}.attn.fc2.weight": (D, r), f"adapters.{i}.attn.fc2.bias": (D,)}
        shapes |= {"head.weight": (classes, D), "head.bias": (classes,)}
        assert sum(int(np.prod(s)) for s in shapes.values()) == VIT_B16_K400_PARAMS
        cfg = AdapterConfig(num_classes=classes, width=r)
        desc = {"spec": "open_clip:ViT-B-16", "weights": "openai", "fingerprint": "sha256:benchmark-vit-b16",
                "dim": D, "depth": depth}
        refs = []
        for k in range(n):
            tensors = {name: torch.randn(s, generator=self.gen) * 0.02 for name, s in shapes.items()}
            d = Bundle(task=f"vitb{k}", adapter=cfg, spec=TaskSpec(num_frames=8), backbone=desc,
                       labels=[f"c{j}" for j in range(classes)], tensors=tensors).save(self.root / "vb" / f"vitb{k}")
            refs.append(self.reg.register(d).ref)
        return refs, shapes

    def memory(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # -- (e) ---------------------------------------------------------------------------------------------
    def zipf(self, names: list[str] | None = None, bb=None, registry=None) -> dict:
        """(e); with ``names`` (their backbone ``bb``, in ``registry``), the stream runs over those tasks, already
        registered (by the --tasks scale runs, in their own registry)."""
        register = registry is None
        a = self.args
        n_tasks, budget = (len(names) if names else a.zipf_tasks), a.zipf_budget
        spec = a.zipf_backbone or "small"
        frames = 4
        batch = 8
        n_req = 400 if self.quick else 1200
        warm = 200 if self.quick else 400
        if bb is None:
            bb = self.backbone if spec == self.backbone_spec else load_backbone(spec, "none")
        width = max(8, bb.dim // 2)
        reg_s = 0.0
        if registry is None:
            registry = self.reg
            self.log(f"(e) registering {n_tasks} tasks on {spec} (adapter width {width})")
            t0 = time.perf_counter()
            names = self.make_tasks(bb, [f"z{i:04d}" for i in range(n_tasks)], width, frames,
                                    lambda i: 5 + i % 20)
            reg_s = time.perf_counter() - t0
        assert names is not None
        engine = Engine(bb, registry, device=self.device, max_resident=budget)
        rng = np.random.default_rng(1)
        ranks = np.arange(1, n_tasks + 1)
        p = ranks ** -1.1
        p /= p.sum()
        perm = rng.permutation(n_tasks)  # popularity is not registration order
        stream = [names[perm[k]] for k in rng.choice(n_tasks, size=warm + n_req, p=p)]
        x = torch.randn(batch, frames, 3, bb.image_size[0], bb.image_size[0], generator=self.gen).to(self.device)
        clips = list(x.unbind(0))
        from concurrent.futures import ThreadPoolExecutor

        arrivals = ThreadPoolExecutor(1, thread_name_prefix="arrivals")

        def arrive(refs: list[str]):  # what the server's request threads do: resolve, prefetch
            hs = [engine.resolve(r) for r in refs]
            for h in hs:
                engine.prefetch(h)
            return hs

        def run(refs_batches: list[list[str]], lat: list[float]) -> float:
            total = 0.0
            nxt = arrivals.submit(arrive, refs_batches[0])
            for k in range(len(refs_batches)):
                hs = nxt.result()
                if k + 1 < len(refs_batches):
                    nxt = arrivals.submit(arrive, refs_batches[k + 1])
                dt = self.timed(lambda: engine.forward(clips[:len(hs)], hs))
                total += dt
                lat.extend([dt] * len(hs))
            return total

        batches = [stream[i:i + batch] for i in range(0, len(stream), batch)]
        warm_b, timed_b = batches[:warm // batch], batches[warm // batch:]
        one = [[names[perm[0]]] * len(b) for b in timed_b]
        t0 = time.perf_counter()
        for name in names:  # a server that has run a while: every task resolved and its files verified once
            engine.prepare(name)
        prep_s = time.perf_counter() - t0
        self.log(f"(e) warm-up {warm} requests, then {n_req} Zipf vs one-task requests, interleaved")
        run(warm_b, [])
        run(one[:2], [])
        s0 = engine.pool.stats.snapshot()
        lat_z: list[float] = []
        lat_1: list[float] = []
        tz = t1 = 0.0
        chunk = 5
        for i in range(0, len(timed_b), chunk):
            tz += run(timed_b[i:i + chunk], lat_z)
            t1 += run(one[i:i + chunk], lat_1)
        arrivals.shutdown()
        s1 = engine.pool.stats.snapshot()
        hits = s1["hits"] - s0["hits"]
        asked = hits + (s1["misses"] - s0["misses"]) + (s1["host_hits"] - s0["host_hits"])
        p99z, p991 = float(np.percentile(lat_z, 99)), float(np.percentile(lat_1, 99))
        figures = {"zipf_throughput_ratio": round(t1 / tz, 4), "zipf_p99_ratio": round(p99z / p991, 4),
                   "zipf_prepare_s": round(prep_s, 1), "zipf_hit_rate": round(hits / max(asked, 1), 4)}
        if not register:
            engine.close()
            return figures
        self.put("zipf_throughput_ratio", t1 / tz, "e zipf", f"{n_tasks} tasks, {budget} resident, Zipf(1.1), "
                 f"batches of {batch}, {spec} x {frames} frames; {len(lat_z) / tz:.1f} vs {len(lat_1) / t1:.1f} req/s")
        self.put("zipf_p99_ratio", p99z / p991, "e zipf", f"p99 {p99z * 1000:.1f} vs {p991 * 1000:.1f} ms per batch")
        self.put("zipf_pool_hit_rate", hits / max(asked, 1), "e zipf",
                 f"{s1['prefetches'] - s0['prefetches']} prefetches, {s1['evictions'] - s0['evictions']} evictions")
        self.results["zipf_backbone"] = spec
        self.results["zipf_tasks"] = n_tasks
        self.results["zipf_registration_s"] = round(reg_s, 1)
        self.row("e zipf", "registration", f"{reg_s:.1f} s", f"{n_tasks} bundles saved + registered")
        self.row("e zipf", "first sight", f"{prep_s:.1f} s", f"{n_tasks} tasks resolved + bundle directories built "
                 "once, before the stream (steady state of a long-running server)")
        self.results["zipf_prepare_s"] = round(prep_s, 1)
        engine.close()
        return figures

    def compile_report(self) -> None:
        e0, hs0 = self.engine, self.handles
        xs = self.clips(8)
        mixed = [hs0[j % len(hs0)] for j in range(8)]
        compiled_out = e0.forward(xs, mixed)
        saved, e0._compiled = e0._compiled, None
        eager_out = e0.forward(xs, mixed)
        e0._compiled = saved
        self.results["compile_vs_eager_max_abs_diff"] = max(float((a - b).abs().max())
                                                            for a, b in zip(compiled_out, eager_out))
        """With --compile: check that serving other tasks of the same layout reuses the compiled graphs."""
        e, hs = self.engine, self.handles
        x = self.clips(8)
        for k in range(len(hs)):  # every bucket and set seen once
            e.forward(x, [hs[k]] * 8)
            e.forward(x[:2], [hs[k]] * 2)
        torch.compiler.set_stance("fail_on_recompile")
        recompiled = 0
        try:
            for k in range(len(hs)):
                e.forward(x, [hs[(k + j) % len(hs)] for j in range(8)])
                e.forward(x[:2], [hs[(k + 3) % len(hs)]] * 2)
        except RuntimeError as err:
            if "recompile" not in str(err):
                raise
            recompiled = 1
        finally:
            torch.compiler.set_stance("default")
        self.results["compile_recompiled_on_switch"] = bool(recompiled)
        self.row("compile", "recompiled on task switch", "yes" if recompiled else "no", f"mode {self.args.compile}")

    # -- report ------------------------------------------------------------------------------------------
    def report(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"stadapter runtime benchmark on {device_name(self.device)}", title_justify="left")
        for col in ("part", "figure", "value", "goal / note"):
            table.add_column(col)
        for r in self.rows:
            table.add_row(*r)
        Console(width=160).print(table)
        self.results.update({
            "device": str(self.device), "device_name": device_name(self.device), "backbone": self.backbone_spec,
            "dtype": str(self.dtype).replace("torch.", ""), "frames": self.frames, "quick": self.quick,
            "compile": self.args.compile, "seconds": round(time.perf_counter() - self.t_start, 1),
            "goals_met": {k: (self.results[k] >= g if op == ">=" else self.results[k] <= g)
                          for k, (op, g) in GOALS.items() if k in self.results}})
        print(json.dumps(self.results, sort_keys=True), flush=True)

    def close(self) -> None:
        self.engine.close()
        self.reg.close()
        self.tmp.cleanup()


class PeftStyle:
    """Adapters as parameters of modules (as PEFT holds LoRA weights); a switch is load_state_dict, copying the
    next task's state dict (already in device memory) into those parameters."""

    def __init__(self, backbone, handles, engine: Engine, device, dtype) -> None:
        self.states = []
        for h in handles:
            rs = engine.acquire(h)
            self.states.append({k.replace(".", "__"): v.detach().clone() for k, v in rs.tensors.items()})
        self.params = nn.ParameterDict({k: nn.Parameter(v.clone(), requires_grad=False)
                                        for k, v in self.states[0].items()})
        self.model = VideoViT(backbone, handles[0].adapter, handles[0].num_frames).eval()
        self.model.bind({k.replace("__", "."): p for k, p in self.params.items()})
        self.nbytes = sum(v.numel() * v.element_size() for v in self.states[0].values())
        self.current = 0

    def swap(self, i: int) -> None:
        if i != self.current:
            self.params.load_state_dict(self.states[i], strict=True)
            self.current = i

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FullModelPerTask:
    """One full model (backbone + adapters + head) per task in a safetensors file; a switch builds the
    architecture and loads the file."""

    def __init__(self, bench: Bench, handles) -> None:
        from safetensors.torch import save_file

        self.bench, self.handles, self.paths = bench, handles, []
        state = {f"backbone.{k}": v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in bench.backbone.state_dict().items()}
        for i, h in enumerate(handles):
            rs = bench.engine.acquire(h)
            full = {**state, **{f"set.{k}": v.detach().to("cpu", torch.float32).contiguous()
                                for k, v in rs.tensors.items()}}
            path = bench.root / f"full{i}-{id(self)}.safetensors"
            save_file(full, str(path))
            self.paths.append(path)
        self.nbytes = self.paths[0].stat().st_size
        self.loaded: int | None = None
        self.model = self.tensors = None

    def load(self, i: int) -> None:
        from safetensors.torch import load_file

        b = self.bench
        state = load_file(str(self.paths[i]), device=str(b.device))
        bb = build_architecture(b.backbone.spec)
        bb.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
        bb = bb.freeze().to(b.device, b.dtype)
        h = self.handles[i]
        self.model = VideoViT(bb, h.adapter, h.num_frames).eval()
        self.tensors = {k[len("set."):]: v.to(b.dtype) if not k.startswith("set.head") else v
                        for k, v in state.items() if k.startswith("set.")}
        self.loaded = i

    @torch.inference_mode()
    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.loaded != i:
            self.load(i)
        return self.model(x, self.tensors)


class BareBackbone:
    """The frozen backbone alone with the same input handling, pooling, norm and head as the engine."""

    def __init__(self, backbone, handle, engine: Engine) -> None:
        self.bb, self.engine = backbone, engine
        rs = engine.acquire(handle)
        self.w, self.b = rs.tensors["head.weight"].float(), rs.tensors["head.bias"].float()

    @torch.inference_mode()
    def __call__(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        e = self.engine
        x = torch.stack(clips)
        N, T = x.shape[:2]
        images = x.reshape(N * T, *x.shape[2:]).to(e.device, e.dtype)
        tok = self.bb(images)  # (N*T, L, C)
        feats = self.bb.final_norm(tok[:, 0].reshape(N, T, -1).mean(dim=1)).float()
        return list(F.linear(feats, self.w, self.b).cpu().unbind(0))


def _data_offset(path: Path) -> int:
    from stadapter.runtime.pool import read_header

    return read_header(path)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--backbone", default=None, help="backbone spec (default: small on CPU, ViT-B/16 on CUDA)")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (default 8; 4 for --quick on CPU)")
    ap.add_argument("--quick", action="store_true", help="CI-size run")
    ap.add_argument("--compile", default=None, help="torch.compile mode for the engine (CUDA): default, "
                    "reduce-overhead, max-autotune")
    ap.add_argument("--zipf-tasks", type=int, default=1000)
    ap.add_argument("--zipf-budget", type=int, default=64)
    ap.add_argument("--zipf-backbone", default=None, help="backbone of the many-task stream (default: small; "
                    "1,000 ViT-B/16-size sets would take 30 GB)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: on a shared, busy "
                    "machine OpenMP threads that wait for a descheduled peer make every timing noisy)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d,e,vitb")
    ap.add_argument("--tasks", default=None, help="registry scale instead of (a)-(f): comma-separated task "
                    "counts, e.g. 1000,10000 (registration, ls, /v1/tasks, resolve, cold and first loads, Zipf; "
                    "see benchmarks/scale.py)")
    ap.add_argument("--databases", default="sqlite,postgresql", help="with --tasks: sqlite and/or postgresql")
    ap.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                    help="with --tasks: a PostgreSQL server (a fresh database is created on it, then dropped)")
    ap.add_argument("--scale-contents", type=int, default=50, help="with --tasks: distinct bundle contents; "
                    "the other tasks reuse them under their own names")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or 1)
    bench = Bench(args)
    if args.tasks:
        from scale import run_scale

        try:
            sizes = [int(x) for x in args.tasks.split(",")]
            kinds = [k for k in args.databases.split(",") if k]
            bench.results["scale"] = run_scale(bench, sizes, kinds, args.postgres, args.scale_contents)
            bench.report()
        finally:
            bench.reg.close()
            bench.tmp.cleanup()
        return
    try:
        bench.setup()
        if "a" not in skip:
            bench.switch()
        if "b" not in skip:
            bench.mixed()
        if not bench.cuda and not args.quick and "vitb" not in skip:
            bench.overhead_vit_b16()
        if "d" not in skip:
            bench.vit_b_sets()
        if "e" not in skip:
            bench.zipf()
        if bench.args.compile:
            bench.compile_report()
        bench.report()
    finally:
        bench.close()



if __name__ == "__main__":
    main()
