"""Adapter sets under a memory budget: resident on the device, then pinned host memory, then the local store.

A *resident set* is one task version's adapter + head tensors on the compute device, ready to bind: the engine
reads them by reference, so binding a resident set copies no tensor. Sets live in three tiers:

    device  resident sets, LRU, bounded by a count (``max_sets``) and/or bytes (``max_bytes``)
    host    (CUDA only) pinned host copies of sets evicted from the device, LRU, bounded by ``host_max_bytes``;
            promoting one back is a single host-to-device copy
    store   the registry's verified files on local disk (``adapter.safetensors``)

Loading from the store reads the safetensors file once: its header is parsed by the bundle format
(``bundle.read_safetensors_header``, which checks every entry against the file's size) and every tensor is a view
into one buffer. Its values are not scanned again: the registry checked them (finite, ``bundle.check_bundle``)
when the bundle entered the store, whose blobs are named by their sha256. On the CPU that buffer is a
copy-on-write memory map of the (read-only, content-addressed) store file with its pages mapped up front, so a
resident set costs exactly its tensor bytes, loading copies nothing, and several processes serving the same set
share one copy in the page cache; ``mmap=False`` reads into private memory instead. On CUDA the file goes through a
pinned host buffer (kept as the set's host-tier copy) and one host-to-device copy on a side stream; adapter tensors
are then cast once to the compute dtype (the head stays float32, as the engine applies it to float32 features).

Thread safety: ``get`` and ``prefetch`` may be called from any thread. A set being loaded is loaded once; other
callers wait for it. Evicting a set only drops the pool's reference: a batch still holding it keeps it alive.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from stadapter.bundle import read_safetensors_header
from stadapter.errors import BundleError
from stadapter.model.video_vit import split_adapter_set

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
HEAD_PREFIX = "head."


# -- reading safetensors ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data region
    end: int


def read_header(path: Path) -> tuple[int, dict[str, TensorEntry]]:
    """(byte offset of the data region, {name: entry}) of a safetensors file, read by the bundle format's one
    header reader (which checks every entry against the file's size)."""
    header = read_safetensors_header(path)
    entries = {}
    for name, e in header.entries.items():
        dtype = SAFETENSORS_DTYPES.get(e.dtype)
        if dtype is None:
            raise BundleError(f"{path}: tensor {name!r} has dtype {e.dtype}, which the adapter pool does not load")
        entries[name] = TensorEntry(dtype, e.shape, e.begin, e.end)
    return header.data_offset, entries


def tensor_views(buffer: Tensor, entries: Mapping[str, TensorEntry]) -> dict[str, Tensor]:
    """Every entry as a view of ``buffer`` (uint8, the data region); an entry whose offset is not aligned to its
    element size (never written so by safetensors) is copied."""
    out = {}
    for name, e in entries.items():
        chunk = buffer[e.begin:e.end]
        size = torch.empty((), dtype=e.dtype).element_size()
        if e.begin % size:
            chunk = chunk.clone()
        out[name] = chunk.view(e.dtype).view(e.shape)
    return out


def map_file(path: Path, offset: int) -> Tensor:
    """The file from ``offset`` on as a uint8 tensor over a private (copy-on-write) memory map whose pages are
    mapped up front: no copy is made, the bytes are the page cache's, and a stray write would only touch a
    private copy of its page, never the store's file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size <= offset:
            return torch.empty(0, dtype=torch.uint8)
        mm = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    # Map the (page-cached) pages now rather than on first touch; kernels before 5.14 map them on first touch.
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(MADV_POPULATE_READ)
    return torch.frombuffer(mm, dtype=torch.uint8, offset=offset)  # keeps ``mm`` alive


def read_file(path: Path, offset: int, pin: bool = False) -> Tensor:
    """The file from ``offset`` on, read into one (optionally pinned) uint8 tensor."""
    size = path.stat().st_size - offset
    buf = torch.empty(max(size, 0), dtype=torch.uint8, pin_memory=pin)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]  # numpy's stubs lack the buffer protocol
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise BundleError(f"{path}: file ended early ({got} of {size} bytes)")
            got += n
    return buf


def storage_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes held by the tensors' storages, each counted once."""
    seen: dict[int, int] = {}
    for t in tensors.values():
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# -- the pool ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SetSource:
    """Where the pool finds a set: a key (unique per task version), a function giving the safetensors file
    (called in the loading thread, e.g. to materialize from the registry) and an optional check of the
    loaded tensors (names and shapes) that raises on a mismatch."""

    key: Hashable
    locate: Callable[[], Path]
    check: Callable[[Mapping[str, Tensor]], None] | None = None
    label: str = ""


@dataclass(eq=False)
class ResidentSet:
    key: Hashable
    tensors: dict[str, Tensor]  # on the device: adapters (and backbone overrides) in the compute dtype, head fp32
    nbytes: int  # device bytes
    slots: dict[tuple[int, str], dict[str, Tensor]] = field(default_factory=dict)
    overrides: dict[str, Tensor] = field(default_factory=dict)
    host: tuple[Tensor, dict[str, TensorEntry]] | None = None  # pinned raw copy (CUDA), for the host tier
    label: str = ""

    def __post_init__(self) -> None:
        self.slots, self.overrides = split_adapter_set(self.tensors)


@dataclass
class PoolStats:
    hits: int = 0  # resident on the device when asked for
    host_hits: int = 0  # promoted from pinned host memory
    misses: int = 0  # read from the store (or waited for a load under way)
    prefetches: int = 0  # loads started ahead of a request
    evictions: int = 0  # device -> host or dropped
    host_evictions: int = 0
    load_seconds: float = 0.0
    loads: int = 0

    def snapshot(self) -> dict[str, float]:
        return dict(self.__dict__)


class AdapterPool:
    """An LRU pool of resident adapter sets. See the module docstring."""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                 max_sets: int | None = 64, max_bytes: int | None = None, host_max_bytes: int | None = 8 << 30,
                 mmap: bool | None = None, workers: int = 1) -> None:
        if max_sets is not None and max_sets < 1:
            raise ValueError(f"max_sets must be >= 1 or None, got {max_sets}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sets = max_sets
        self.max_bytes = max_bytes
        self.cuda = self.device.type == "cuda"
        self.host_max_bytes = host_max_bytes if self.cuda else 0
        self.mmap = (not self.cuda) if mmap is None else mmap
        self.stats = PoolStats()
        self._device: OrderedDict[Hashable, ResidentSet] = OrderedDict()
        self._host: OrderedDict[Hashable, tuple[Tensor, dict[str, TensorEntry], str]] = OrderedDict()
        self._inflight: dict[Hashable, Future] = {}
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-pool")
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    # -- asking ------------------------------------------------------------------------------------------
    def get(self, source: SetSource) -> ResidentSet:
        """The resident set for ``source.key``, loading it (from the host tier or the store) when needed."""
        key = source.key
        with self._lock:
            rs = self._device.get(key)
            if rs is not None:
                self._device.move_to_end(key)
                self.stats.hits += 1
                return rs
            fut = self._inflight.get(key)
            if fut is None:
                if key in self._host:
                    self.stats.host_hits += 1
                else:
                    self.stats.misses += 1
                fut = self._start(source)
                run_here = True
            else:
                self.stats.misses += 1
                run_here = False
        if run_here:
            self._load(source, fut)
        return fut.result()

    def prefetch(self, source: SetSource) -> Future:
        """Start loading a set in the background (no-op when resident or under way)."""
        with self._lock:
            if source.key in self._device:
                fut: Future = Future()
                fut.set_result(self._device[source.key])
                return fut
            under_way = self._inflight.get(source.key)
            if under_way is not None:
                return under_way
            fut = self._start(source)
            self.stats.prefetches += 1
        self._executor.submit(self._load, source, fut)
        return fut

    def where(self, key: Hashable) -> str | None:
        """``device``, ``host``, ``loading`` or None."""
        with self._lock:
            if key in self._device:
                return "device"
            if key in self._inflight:
                return "loading"
            if key in self._host:
                return "host"
            return None

    def peek(self, key: Hashable) -> ResidentSet | None:
        """The resident set without touching the LRU order or the counters."""
        with self._lock:
            return self._device.get(key)

    def resident_keys(self) -> list[Hashable]:
        """Least recently used first."""
        with self._lock:
            return list(self._device)

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(rs.nbytes for rs in self._device.values())

    @property
    def host_bytes(self) -> int:
        with self._lock:
            return sum(int(buf.numel()) for buf, _, _ in self._host.values())

    def evict(self, key: Hashable) -> bool:
        with self._lock:
            rs = self._device.pop(key, None)
            self._host.pop(key, None)
            return rs is not None

    def clear(self) -> None:
        with self._lock:
            self._device.clear()
            self._host.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.clear()

    # -- loading -----------------------------------------------------------------------------------------
    def _start(self, source: SetSource) -> Future:
        fut: Future = Future()
        self._inflight[source.key] = fut
        return fut

    def _load(self, source: SetSource, fut: Future) -> None:
        t0 = time.perf_counter()
        try:
            with self._lock:
                host = self._host.pop(source.key, None)
            rs = self._from_host(source, host) if host is not None else self._from_store(source)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            with self._lock:
                self._inflight.pop(source.key, None)
            fut.set_exception(e)
            return
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - t0
            self._device[source.key] = rs
            self._device.move_to_end(source.key)
            self._inflight.pop(source.key, None)
            self._shrink(keep=source.key)
        fut.set_result(rs)

    def _from_store(self, source: SetSource) -> ResidentSet:
        path = Path(source.locate())
        offset, entries = read_header(path)
        if self.cuda:
            raw = read_file(path, offset, pin=True)
            return self._to_device(source, raw, entries)
        raw = map_file(path, offset) if self.mmap else read_file(path, offset)
        _check_size(path, raw, entries)
        tensors = tensor_views(raw, entries)
        if source.check is not None:
            source.check(tensors)
        tensors = self._cast(tensors)
        return ResidentSet(source.key, tensors, storage_bytes(tensors), label=source.label)

    def _from_host(self, source: SetSource, host: tuple[Tensor, dict[str, TensorEntry], str]) -> ResidentSet:
        raw, entries, _ = host
        return self._to_device(source, raw, entries)

    def _to_device(self, source: SetSource, raw: Tensor, entries: dict[str, TensorEntry]) -> ResidentSet:
        _check_size(source.label or str(source.key), raw, entries)
        if source.check is not None:
            source.check(tensor_views(raw, entries))  # shapes only: views of host memory, no copy
        assert self._stream is not None
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            dev = raw.to(self.device, non_blocking=True)
            tensors = self._cast(tensor_views(dev, entries))
            if any(t.untyped_storage().data_ptr() != dev.untyped_storage().data_ptr() for t in tensors.values()):
                # some tensors were cast into new memory: move the rest (the float32 head) out of the
                # float32 buffer too, so the buffer is freed and the set costs what it holds
                base = dev.untyped_storage().data_ptr()
                tensors = {k: t.clone() if t.untyped_storage().data_ptr() == base else t
                           for k, t in tensors.items()}
            del dev
        self._stream.synchronize()
        for t in {t.untyped_storage().data_ptr(): t for t in tensors.values()}.values():
            t.record_stream(compute)  # freed blocks wait for the compute stream, not only the side stream
        return ResidentSet(source.key, tensors, storage_bytes(tensors), host=(raw, entries), label=source.label)

    def _cast(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, t in tensors.items():
            want = torch.float32 if k.startswith(HEAD_PREFIX) else self.dtype
            out[k] = t if (t.dtype == want or not t.is_floating_point()) else t.to(want)
        return out

    def _shrink(self, keep: Hashable) -> None:
        """Evict least recently used sets until the device tier fits its budget (never ``keep``)."""
        def over() -> bool:
            n = len(self._device)
            if self.max_sets is not None and n > self.max_sets:
                return True
            if self.max_bytes is None or n <= 1:
                return False
            return sum(r.nbytes for r in self._device.values()) > self.max_bytes

        while over():
            key = next(k for k in self._device if k != keep)
            rs = self._device.pop(key)
            self.stats.evictions += 1
            if rs.host is not None and self.host_max_bytes:
                self._host[key] = (*rs.host, rs.label)
                while self._host and sum(int(b.numel()) for b, _, _ in self._host.values()) > self.host_max_bytes:
                    self._host.popitem(last=False)
                    self.stats.host_evictions += 1


def _check_size(where: object, raw: Tensor, entries: Mapping[str, TensorEntry]) -> None:
    need = max((e.end for e in entries.values()), default=0)
    if raw.numel() < need:
        raise BundleError(f"{where}: tensor data is truncated ({raw.numel()} of {need} bytes)")


__all__ = ["AdapterPool", "PoolStats", "ResidentSet", "SetSource", "TensorEntry", "read_header", "tensor_views",
           "map_file", "read_file", "storage_bytes"]
