"""What ``adapter.safetensors`` must hold for a bundle's config, checked from its header and a memory map (no torch).

The names and shapes are the model's adapter-set layout (``stadapter/model/layout.py``).

Without the backbone, the depth and the backbone tensors' shapes are unknown: the blocks must be consecutive
(starting at block 0 unless ``last_k`` limits them), every adapter slot complete, one embedding width D shared
by every tensor, and every tensor a finite floating-point one. The full per-backbone check stays at serve time
(``check_adapter_set``).
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stadapter.bundle.content import HeaderEntry, read_safetensors_header
from stadapter.config import AdapterConfig
from stadapter.errors import BundleError
from stadapter.fsio import open_regular
from stadapter.model.layout import BACKBONE_PREFIX, OVERRIDE_METHODS, set_shapes

SLOT_RE = re.compile(r"^adapters\.(\d{1,6})\.(attn|mlp)\.(fc1|conv|fc2)\.(weight|bias)$")
# Floating-point dtypes, as (little-endian unsigned view, exponent mask): a value is NaN or inf exactly when
# every exponent bit is set.
FLOAT_BITS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
              "F64": ("<u8", 0x7FF0000000000000)}
CHUNK_VALUES = 1 << 20  # values checked at once (bounded memory)


def expected_shapes(entries: Mapping[str, HeaderEntry], adapter: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes the config asks for, given the embedding width D of ``head.weight`` and the
    adapter blocks the file holds; BundleError when even those cannot be read from it."""
    head = entries.get("head.weight")
    if head is None or len(head.shape) != 2:
        raise BundleError("head.weight is missing or not a matrix")
    dim = head.shape[1]
    if not adapter.has_adapters:
        return set_shapes(adapter, dim, ())
    blocks = _adapter_blocks(entries, adapter)
    return set_shapes(adapter, dim, [(block, pos) for block in blocks for pos in adapter.positions])


def _adapter_blocks(entries: Mapping[str, HeaderEntry], adapter: AdapterConfig) -> range:
    """The consecutive block indices the file's adapter tensors use, checked against ``last_k``."""
    blocks = sorted({int(m.group(1)) for m in map(SLOT_RE.match, entries) if m})
    if not blocks:
        raise BundleError(f"no adapter tensors for method {adapter.method}")
    first, last = blocks[0], blocks[-1]
    if len(blocks) != last - first + 1:
        raise BundleError(f"adapter blocks are not consecutive ({', '.join(map(str, blocks[:8]))})")
    if adapter.last_k is None and first != 0:
        raise BundleError(f"adapters start at block {first}, but the config puts one in every block")
    if adapter.last_k is not None and (len(blocks) > adapter.last_k or (len(blocks) < adapter.last_k and first)):
        raise BundleError(f"adapters in blocks {first}-{last} do not fit last_k={adapter.last_k}")
    return range(first, last + 1)


def tensor_problems(entries: Mapping[str, HeaderEntry], adapter: AdapterConfig) -> list[str]:
    """Every missing, unexpected, mis-shaped or non-float tensor, in words (empty when the set fits)."""
    try:
        expected = expected_shapes(entries, adapter)
    except BundleError as e:
        return [str(e)]
    overrides = {n for n in entries if n.startswith(BACKBONE_PREFIX) and adapter.method in OVERRIDE_METHODS
                 and (adapter.method != "bitfit" or n.endswith("bias"))}
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected) - overrides)
    problems = [f"{len(names)} {what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    for name in sorted(set(expected) & set(entries)):
        if entries[name].shape != expected[name]:
            problems.append(f"{name} has shape {list(entries[name].shape)}, expected {list(expected[name])}")
    problems += [f"{name} is {e.dtype}, not floating point" for name, e in sorted(entries.items())
                 if e.dtype not in FLOAT_BITS]
    return problems


def nonfinite_tensors(path: Path, data_offset: int, entries: Mapping[str, HeaderEntry]) -> list[str]:
    """The floating-point tensors of the safetensors file at ``path`` holding a NaN or an infinity, read
    tensor by tensor, a chunk at a time, from a read-only memory map."""
    bad = []
    with open_regular(path) as f:
        size = f.seek(0, 2)
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, e in sorted(entries.items()):
                if e.dtype in FLOAT_BITS and not _finite(mm, data_offset + e.begin, e.end - e.begin, e.dtype):
                    bad.append(name)
    return bad


def _finite(mm: mmap.mmap, offset: int, nbytes: int, dtype: str) -> bool:
    view, mask = FLOAT_BITS[dtype]
    width = np.dtype(view).itemsize
    count, step = nbytes // width, CHUNK_VALUES
    for start in range(0, count, step):
        values = np.frombuffer(mm, dtype=view, count=min(step, count - start), offset=offset + start * width)
        if np.any((values & mask) == mask):
            return False
    return True


def check_tensors(path: Path, adapter: AdapterConfig, where: str) -> None:
    """Refuse an ``adapter.safetensors`` whose header is malformed, whose tensors are not exactly the ones
    ``adapter`` asks for (names, shapes, floating-point dtypes), or that holds a NaN or an infinity."""
    header = read_safetensors_header(path)
    problems = tensor_problems(header.entries, adapter)
    if problems:
        raise BundleError(f"{where}: adapter.safetensors does not fit config.json: {'; '.join(problems)}")
    try:
        bad = nonfinite_tensors(path, header.data_offset, header.entries)
    except OSError as e:
        raise BundleError(f"{where}: cannot read adapter.safetensors: {e.strerror or e}") from None
    if bad:
        raise BundleError(f"{where}: adapter.safetensors holds NaN or infinite values in "
                          f"{', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}")


__all__ = ["check_tensors", "expected_shapes", "nonfinite_tensors", "tensor_problems"]
