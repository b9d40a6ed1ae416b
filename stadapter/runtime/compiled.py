"""An optional torch.compile / CUDA-graph path where serving another task never recompiles.

The compiled function takes the adapter weights as *inputs*, never as constants: every resident set of one
layout (frames, width, kernel (kT, 1, 1), adapter slots, activation) is copied once into a fixed *slot* of a
per-layout bank (one tensor per adapter tensor name, shape (S, ...)), and a batch passes a per-clip slot index.
Inside the graph each clip gathers its own weights (``bank[idx]``) and the adapters run through the model's
own :func:`~stadapter.model.adapter.adapter_delta` with those per-clip weights (batched matmuls, ``baddbmm``,
and broadcast taps for the temporal conv), so a batch may mix tasks, and switching tasks changes only the
index values: same shapes, same addresses, no recompilation, and a captured CUDA graph
(``mode="reduce-overhead"``) stays valid because the banks are static addresses written in place. Batches are
padded to power-of-two sizes, so the number of graphs is bounded by the number of layouts and batch buckets.

Heads (and pooling) stay eager: they are tiny and their shapes differ per task. Layouts the bank does not cover
(spatial conv kernels, backbone overrides) run on the eager path. The bank costs a second device copy of each
resident set of the layout (the pool's copy is kept for the eager path). Off by default; meant for CUDA
(``stadapter serve --compile reduce-overhead``); on the CPU it is exercised with ``mode="eager"`` in tests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stadapter.model.adapter import adapter_delta
from stadapter.model.backbone import Backbone
from stadapter.model.layout import BOTTLENECK_NAMES, TENSOR_NAMES
from stadapter.runtime.pool import ResidentSet
from stadapter.runtime.types import Segment, TaskHandle

BACKENDS = ("eager", "aot_eager", "inductor")  # mode names that pick a backend instead of an inductor mode


@dataclass(frozen=True)
class Layout:
    frames: int
    width: int
    kT: int
    slots: tuple[tuple[int, str], ...]
    activation: str
    conv: bool

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The names of each adapter's tensors, in the order the compiled function takes them."""
        return TENSOR_NAMES if self.conv else BOTTLENECK_NAMES


# The compiled function: (images (N*T, 3, H, W), per-clip slot index (N,), *bank tensors) -> tokens (N*T, L, C).
BankedForward = Callable[..., Tensor]


def layout_of(handle: TaskHandle, rs: ResidentSet) -> Layout | None:
    """The bank layout of a task's set, or None when the compiled path does not cover it."""
    cfg = handle.adapter
    if rs.overrides or not rs.slots:
        return None
    conv = cfg.method == "st-adapter"
    if conv and tuple(cfg.kernel[1:]) != (1, 1):
        return None
    return Layout(handle.num_frames, cfg.width, cfg.kernel[0] if conv else 1, tuple(sorted(rs.slots)),
                  cfg.act, conv)


class Bank:
    """Fixed slots for the sets of one layout: tensors of shape (S, ...), written in place."""

    def __init__(self, layout: Layout, example: dict[tuple[int, str], dict[str, Tensor]], size: int,
                 static: bool) -> None:
        self.layout, self.size = layout, size
        self.tensors: dict[tuple[int, str], dict[str, Tensor]] = {}
        for slot in layout.slots:
            self.tensors[slot] = {}
            for name in layout.tensor_names:
                t = example[slot][name]
                self.tensors[slot][name] = torch.zeros((size, *t.shape), dtype=t.dtype, device=t.device)
                if static:
                    torch._dynamo.mark_static_address(self.tensors[slot][name])
        self.where: OrderedDict[Hashable, int] = OrderedDict()  # set key -> slot, LRU order
        self.writes = 0

    def flat(self) -> list[Tensor]:
        """Every bank tensor, slot by slot in the layout's order, as the compiled function takes them."""
        return [self.tensors[s][n] for s in self.layout.slots for n in self.layout.tensor_names]

    def index(self, rs: ResidentSet, busy: set[int]) -> int:
        """The slot holding ``rs`` (written into the least recently used free slot on first use)."""
        i = self.where.get(rs.key)
        if i is not None:
            self.where.move_to_end(rs.key)
            return i
        if len(self.where) < self.size:
            i = len(self.where)
        else:
            victim = next(k for k, j in self.where.items() if j not in busy)
            i = self.where.pop(victim)
        with torch.no_grad():
            for slot, names in self.tensors.items():
                for name, bank in names.items():
                    bank[i].copy_(rs.slots[slot][name])
        self.where[rs.key] = i
        self.writes += 1
        return i


def _bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


class CompiledBackbone:
    """The backbone with gathered per-clip adapters, compiled once per layout and batch bucket."""

    def __init__(self, backbone: Backbone, mode: str = "reduce-overhead", slots: int = 64) -> None:
        self.backbone = backbone
        self.mode = mode
        self.slots = max(int(slots), 1)
        self.banks: dict[Layout, Bank] = {}
        self._fns: dict[Layout, BankedForward] = {}
        # one code object serves every (layout, batch bucket): let dynamo keep that many graphs
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        static = mode in ("reduce-overhead", "max-autotune")
        self._static = static and next(backbone.parameters()).is_cuda

    def supports(self, segments: Sequence[Segment]) -> Layout | None:
        """The one bank layout of every segment's set, or None when they differ, one is not covered, or there
        are more distinct sets than the bank has slots."""
        layouts = {layout_of(seg.handle, seg.resident) for seg in segments}
        if len(layouts) != 1:
            return None
        (layout,) = layouts
        if layout is None or len({seg.resident.key for seg in segments}) > self.slots:
            return None
        return layout

    def _compiled(self, layout: Layout) -> BankedForward:
        fn = self._fns.get(layout)
        if fn is None:
            raw = self._make(layout)
            if self.mode in BACKENDS:
                fn = torch.compile(raw, backend=self.mode, dynamic=False)
            else:
                fn = torch.compile(raw, mode=None if self.mode == "default" else self.mode, dynamic=False)
            self._fns[layout] = fn
        return fn

    def _make(self, layout: Layout) -> BankedForward:
        """The uncompiled forward of one layout: each clip's adapters gathered from the bank by its slot index."""
        bb = self.backbone
        grid, prefix, T = bb.grid, bb.num_prefix, layout.frames
        names = [(s, n) for s in layout.slots for n in layout.tensor_names]

        def run(images: Tensor, idx: Tensor, *flat: Tensor) -> Tensor:
            bank: dict[tuple[int, str], dict[str, Tensor]] = {}
            for (slot, name), t in zip(names, flat, strict=True):
                bank.setdefault(slot, {})[name] = t

            def hook(i: int, pos: str, x: Tensor) -> Tensor:  # x: (N*T, L, C)
                slot = bank.get((i, pos))
                if slot is None:
                    return x
                per_clip = {name: t[idx] for name, t in slot.items()}  # (N, ...) each
                return x + adapter_delta(x, per_clip, T, prefix, layout.activation, grid)

            return bb(images, hook)

        return run

    def run(self, images: Tensor, T: int, segments: Sequence[Segment]) -> Tensor:
        """Tokens after the last block (N*T, L, C) for clips whose sets are ``segments``' (one layout)."""
        layout = self.supports(segments)
        assert layout is not None and layout.frames == T
        bank = self.banks.get(layout)
        if bank is None:
            bank = self.banks[layout] = Bank(layout, segments[0].resident.slots, self.slots, self._static)
        busy: set[int] = set()
        per_clip: list[int] = []
        for seg in segments:
            i = bank.index(seg.resident, busy)
            busy.add(i)
            per_clip.extend([i] * (seg.stop - seg.start))
        n = len(per_clip)
        m = _bucket(n)
        idx = torch.tensor(per_clip + [per_clip[0]] * (m - n), device=images.device)
        if m != n:
            pad = images.new_zeros((m - n) * T, *images.shape[1:])
            images = torch.cat([images, pad])
        tokens = self._compiled(layout)(images, idx, *bank.flat())
        return tokens[: n * T].clone() if self._static else tokens[: n * T]


__all__ = ["CompiledBackbone", "Bank", "Layout", "layout_of"]
