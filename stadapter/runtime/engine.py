"""One frozen backbone, many tasks: resolve tasks through the registry and run mixed-task batches.

The engine loads the backbone once (half precision on CUDA, float32 on the CPU) and keeps every task's adapter
set in an :class:`~stadapter.runtime.pool.AdapterPool`. A batch may mix tasks: clips are grouped by task (and
by frame count), the backbone runs ONCE over all clips of a frame-count group, and its adapter hook applies
each task's adapters to that task's rows of the batch only; after the last block each task's clips are pooled,
normed and put through that task's head. The frozen matmuls (~92% of the FLOPs) are shared by every task in
the batch. Tasks may differ in classes, adapter width, kernel, positions, blocks and activation. A task that
replaces backbone tensors (bitfit / partial / full baselines) gets a backbone pass of its own.

    engine = Engine.open(open_registry(), tasks=["k400", "ssv2"])
    k400, ssv2 = engine.resolve("k400"), engine.resolve("ssv2")
    probs = engine.predict([(views_a, k400), (views_b, ssv2)])  # softmax averaged over each clip's views
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from stadapter.bundle import TENSORS, parse_config
from stadapter.errors import AdapterSetError, InputError
from stadapter.model.backbone import Backbone, swapped_parameters
from stadapter.model.head import clip_features, head_logits
from stadapter.model.video_vit import VideoViT, check_adapter_set
from stadapter.runtime.kernels import segment_hook
from stadapter.runtime.pool import AdapterPool, ResidentSet, SetSource
from stadapter.runtime.types import Registry, Segment, TaskHandle, segments_of
from stadapter.training.metrics import average_views
from stadapter.video.decode import DEFAULT_LIMITS, DecodeLimits

if TYPE_CHECKING:
    from stadapter.registry.api import VersionInfo
    from stadapter.runtime.compiled import CompiledBackbone


@dataclass
class _Resolved:
    handle: TaskHandle
    expires: float


def pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for, but torch sees no CUDA device")
    return dev


def device_name(device: str | torch.device) -> str:
    """A human name of the device, for reports: the GPU's name, or the CPU model and core count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


BACKBONE_SAMPLE = 256  # tasks `registered_backbone` looks at (one page: serve starts fast on a large registry)


def registered_backbone(registry: Registry) -> VersionInfo | None:
    """The latest version of a task trained on the backbone most registered tasks share (among the first
    BACKBONE_SAMPLE tasks by name; ties: the first task by name); None when no task has a version. What `serve`
    loads when no task or backbone is named."""
    served = [t for t in registry.list_page(limit=BACKBONE_SAMPLE).tasks if t.current_fingerprint is not None]
    if not served:
        return None
    counts = Counter(t.current_fingerprint for t in served)  # one listing query, no resolve per task
    return registry.resolve(next(t.name for t in served if counts[t.current_fingerprint] == max(counts.values())))


def tasks_on_other_backbones(registry: Registry, fingerprint: str) -> list[str]:
    """The tasks (among the first BACKBONE_SAMPLE by name) whose served version was trained on another backbone
    than ``fingerprint``: an engine on this backbone answers them 409. One listing query."""
    return [t.name for t in registry.list_page(limit=BACKBONE_SAMPLE).tasks
            if t.current_fingerprint is not None and t.current_fingerprint != fingerprint]


class Engine:
    """A frozen backbone on one device, a pool of adapter sets, and the mixed-task forward. See the module
    docstring. ``forward``/``predict`` are meant to be called from one thread (the one that owns the model);
    ``resolve`` and ``prefetch`` may be called from any thread."""

    def __init__(self, backbone: Backbone, registry: Registry, *, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype | None = None, max_resident: int | None = 64,
                 max_resident_bytes: int | None = None, host_max_bytes: int | None = 8 << 30,
                 alias_ttl: float | None = None, mmap: bool | None = None, compile: str | None = None,
                 prefetch_workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # the alias TTL's time source (seconds; monotonic)
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.fingerprint = backbone.fingerprint()  # computed in fp32 by load_backbone, before any cast
        self.backbone = backbone.freeze().to(self.device, self.dtype)
        self.registry = registry
        self.alias_ttl = alias_ttl
        self.pool = AdapterPool(self.device, self.dtype, max_sets=max_resident, max_bytes=max_resident_bytes,
                                host_max_bytes=host_max_bytes, mmap=mmap, workers=prefetch_workers)
        self.swaps = 0
        self.batches = 0
        self._last_key: Hashable | None = None
        self._resolved: dict[str, _Resolved] = {}
        self._handles: dict[tuple[str, int], TaskHandle] = {}
        self._paths: dict[int, tuple[Path, tuple[int, int, int, int]]] = {}
        self._shapes: dict[tuple[Any, int], Mapping[str, tuple[int, ...]]] = {}
        self._lock = threading.RLock()
        self._compiled: CompiledBackbone | None = None
        if compile:
            from stadapter.runtime.compiled import BACKENDS, CompiledBackbone

            if self.device.type != "cuda" and compile not in BACKENDS:
                raise InputError(f"torch.compile mode {compile!r} needs CUDA; on the CPU use one of {BACKENDS}")
            self._compiled = CompiledBackbone(self.backbone, mode=compile, slots=max_resident or 64)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, registry: Registry, backbone: str | None = None, weights: str | None = None,
             tasks: Sequence[str] = (), device: str | None = "auto", **kwargs: Any) -> Engine:
        """Load the backbone and build an engine. Without ``backbone``: the one the first of ``tasks`` was
        trained on, else the one most registered tasks were trained on (:func:`registered_backbone`), with
        the weights its bundle names. ``tasks`` are resolved at once, so an unknown task or a bundle of another
        backbone fails here."""
        from stadapter.model.loading import load_backbone

        infos = [registry.resolve(ref) for ref in tasks]  # a bad name or unknown task fails before the load
        fingerprint = None
        if backbone is None:
            info = infos[0] if infos else registered_backbone(registry)
            if info is None:
                from stadapter.config import DEFAULT_BACKBONE

                backbone = DEFAULT_BACKBONE
            else:
                backbone = info.backbone_spec
                if weights is None:  # the bundle's weights, found again by their fingerprint if the file moved
                    weights, fingerprint = info.backbone_weights or None, info.backbone_fingerprint
        engine = cls(load_backbone(backbone, weights, fingerprint), registry, device=device, **kwargs)
        for ref in tasks:
            engine.resolve(ref)
        return engine

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "device_name": device_name(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "backbone": str(self.backbone.spec),
                "backbone_weights": getattr(self.backbone, "weights", None), "fingerprint": self.fingerprint,
                "compiled": self._compiled.mode if self._compiled else None}

    def close(self) -> None:
        self.pool.close()

    # -- tasks -------------------------------------------------------------------------------------------
    def resolve(self, ref: str, refresh: bool = False) -> TaskHandle:
        """The task version ``ref`` names, refusing one trained on another backbone. Aliases and bare task
        names are re-resolved after ``alias_ttl`` seconds (None: never); ``task:N`` never changes."""
        from stadapter.registry import parse_ref

        now = self.clock()
        with self._lock:
            hit = self._resolved.get(ref)
            if hit is not None and not refresh and now < hit.expires:
                return hit.handle
        info = self.registry.resolve(ref, fingerprint=self.fingerprint)
        _, number, _ = parse_ref(ref)
        pinned = number is not None and number > 0
        expires = float("inf") if pinned or self.alias_ttl is None else now + self.alias_ttl
        with self._lock:
            handle = self._handles.get((ref, info.id))
            if handle is None:
                handle = self._handles[(ref, info.id)] = self._make_handle(ref, info)
            self._resolved[ref] = _Resolved(handle, expires)
            return handle

    def _make_handle(self, ref: str, info: VersionInfo) -> TaskHandle:
        parsed = parse_config(info.config, info.labels, info.ref)  # the checks registration made
        key = (parsed.adapter, parsed.spec.num_frames)  # thousands of tasks share a few layouts
        expected = self._shapes.get(key)
        if expected is None:
            shapes = VideoViT(self.backbone, parsed.adapter, parsed.spec.num_frames).expected_shapes()
            expected = self._shapes[key] = MappingProxyType(shapes)
        return TaskHandle(ref, info, parsed.adapter, parsed.spec, parsed.labels, expected)

    def _source(self, handle: TaskHandle) -> SetSource:
        def check(tensors: Mapping[str, Tensor]) -> None:
            try:
                check_adapter_set(handle.expected, tensors)
            except AdapterSetError as e:
                raise AdapterSetError(f"{handle.name}: {e}") from e

        return SetSource(handle.key, lambda: self._locate(handle), check, handle.name)

    def _locate(self, handle: TaskHandle) -> Path:
        """The adapter.safetensors of a version: materialized once per process (names and sizes checked; every
        file's sha256 too under the registry's verify "always"), then reused while the file's inode, size and
        times are unchanged."""
        cached = self._paths.get(handle.key)
        if cached is not None and _stat(cached[0]) == cached[1]:
            return cached[0]
        path = Path(self.registry.materialize(handle.info)) / TENSORS
        self._paths[handle.key] = (path, _stat(path))
        return path

    def prepare(self, ref: str) -> TaskHandle:
        """Resolve a task and materialize its files (once per process) without making it resident, so a
        later cold load only reads the file."""
        h = self.resolve(ref)
        self._locate(h)
        return h

    def prefetch(self, handle: TaskHandle | str) -> None:
        """Start making the task's set resident in the background (when a request arrives)."""
        h = self.resolve(handle) if isinstance(handle, str) else handle
        self.pool.prefetch(self._source(h))

    def acquire(self, handle: TaskHandle) -> ResidentSet:
        """The task's resident set (loaded on a miss). Binding it copies no tensor."""
        return self.pool.get(self._source(handle))

    # -- forward -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, clips: Sequence[Tensor] | Tensor, handles: Sequence[TaskHandle]) -> list[Tensor]:
        """clips[i] (T_i, 3, H, W), normalised, for task handles[i] -> logits[i] (C_i,), float32 on the CPU.

        One backbone pass per frame count over every clip of the batch (tasks that replace backbone tensors
        get their own pass); each task's adapters see only its own clips."""
        n = len(clips)
        if n != len(handles):
            raise InputError(f"{n} clips for {len(handles)} task handles")
        if n == 0:
            return []
        sets: dict[int, ResidentSet] = {}
        for h in handles:
            if h.key not in sets:
                sets[h.key] = self.acquire(h)
        H, W = self.backbone.image_size
        for i, (c, h) in enumerate(zip(clips, handles, strict=True)):
            if c.dim() != 4 or tuple(c.shape[1:]) != (3, H, W) or c.shape[0] != h.num_frames:
                raise InputError(f"clip {i} has shape {tuple(c.shape)}; task {h.name} expects "
                                 f"({h.num_frames}, 3, {H}, {W})")
        logits: dict[int, Tensor] = {}
        for group in self._groups(handles, sets):
            rows = self._run_group([clips[i] for i in group], [handles[i] for i in group], sets)
            logits.update(zip(group, rows, strict=True))
        self.batches += 1
        return [logits[i] for i in range(n)]

    def _groups(self, handles: Sequence[TaskHandle], sets: Mapping[int, ResidentSet]) -> list[list[int]]:
        """The batch's clip indices, one list per backbone pass: grouped by frame count, then tasks with
        backbone overrides alone (and, compiled, by bank layout); the clips of one task contiguous."""
        layouts: dict[int, str] = {}
        if self._compiled is not None:
            from stadapter.runtime.compiled import layout_of

            layouts = {h.key: repr(layout_of(h, sets[h.key])) for h in handles}

        def group_key(i: int) -> tuple[int, int, str]:
            h = handles[i]
            return (h.num_frames, h.key if sets[h.key].overrides else -1, layouts.get(h.key, ""))

        order = sorted(range(len(handles)), key=lambda i: (group_key(i), handles[i].key, i))
        return [list(group) for _, group in itertools.groupby(order, key=group_key)]

    def _run_group(self, clips: list[Tensor], handles: list[TaskHandle],
                   sets: Mapping[int, ResidentSet]) -> list[Tensor]:
        """One backbone pass over clips of one frame count (each task's clips contiguous) -> each clip's
        logits (C_i,), float32 on the CPU."""
        T = handles[0].num_frames
        x = torch.stack(clips)  # (N, T, 3, H, W)
        N = x.shape[0]
        images = x.reshape(N * T, *x.shape[2:]).to(self.device, self.dtype, non_blocking=True)
        segments = segments_of(handles, sets)
        for seg in segments:
            if seg.resident.key != self._last_key:
                self.swaps += 1
                self._last_key = seg.resident.key
        tokens = self._tokens(images, T, segments)  # (N*T, P + HW, C)
        tokens = tokens.reshape(N, T, *tokens.shape[1:])  # (N, T, L, C)
        out: list[Tensor] = []
        for seg in segments:
            rs = seg.resident
            feats = clip_features(self.backbone, tokens[seg.start:seg.stop], seg.handle.adapter.pool, rs.overrides)
            out.extend(head_logits(feats, rs.tensors).cpu().unbind(0))
        return out

    def _tokens(self, images: Tensor, T: int, segments: list[Segment]) -> Tensor:
        """Tokens after the last block (N*T, P + HW, C): through the compiled bank where it covers the
        segments, else eagerly, each task's adapters on its own rows."""
        bb = self.backbone
        overrides = segments[0].resident.overrides  # non-empty only for a group of one such task
        if self._compiled is not None and not overrides and self._compiled.supports(segments):
            return self._compiled.run(images, T, segments)
        ctx = swapped_parameters(bb, overrides) if overrides else contextlib.nullcontext()
        with ctx:
            return bb(images, segment_hook(segments, T, bb.grid, bb.num_prefix))

    def predict(self, requests: Sequence[tuple[Tensor, TaskHandle]]) -> list[Tensor]:
        """[(views (V, T, 3, H, W), task)] -> per request the class probabilities (C,): the softmax of each
        view's logits, averaged over the views (multi-view testing)."""
        clips: list[Tensor] = []
        handles: list[TaskHandle] = []
        counts = []
        for views, h in requests:
            if views.dim() != 5:
                raise InputError(f"views must be (V, T, 3, H, W), got {tuple(views.shape)}")
            clips.extend(views.unbind(0))
            handles.extend([h] * views.shape[0])
            counts.append(views.shape[0])
        logits = self.forward(clips, handles)
        out, k = [], 0
        for v in counts:
            out.append(average_views(torch.stack(logits[k:k + v])[None])[0])  # (C,)
            k += v
        return out

    def clip_views(self, path: str | Path, handles: Sequence[TaskHandle],
                   limits: DecodeLimits = DEFAULT_LIMITS) -> list[Tensor]:
        """Each task's test views of one clip, decoding the clip once (within ``limits``)."""
        from stadapter.runtime.inputs import task_views

        return task_views(self, path, handles, limits)


def _stat(path: Path) -> tuple[int, int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


__all__ = ["Engine", "TaskHandle", "pick_device", "device_name"]
