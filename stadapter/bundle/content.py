"""What a bundle file's bytes must hold: the one safetensors header reader, and content checks by file name.

A safetensors file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data region; offsets count from the data
region's start. The reader refuses a header longer than :data:`MAX_HEADER_BYTES` or than the file, and any
tensor whose bytes do not fit its dtype and shape or lie past the end of the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from stadapter.bundle.format import parse_json
from stadapter.errors import BundleError
from stadapter.fsio import open_regular

MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: dtype name (e.g. ``F32``), shape, byte range in the data region."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    data_offset: int  # where the data region starts in the file (8 + header length)
    entries: dict[str, HeaderEntry]
    metadata: dict[str, Any]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The checked header of the safetensors file at ``path``; BundleError naming the file otherwise."""
    try:
        with open_regular(path) as f:
            return _parse_header(f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror or e})") from e
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None


def _parse_header(f: BinaryIO, size: int) -> SafetensorsHeader:
    """Parse the header of the open file ``f`` of ``size`` bytes; BundleError(problem) when it is malformed."""
    raw = f.read(8)
    if len(raw) != 8:
        raise BundleError("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:
        raise BundleError(f"safetensors header of {n} bytes is implausible")
    if n > size - 8:
        raise BundleError(f"safetensors header of {n} bytes runs past the end of the file ({size} bytes)")
    try:
        header = json.loads(f.read(n))
    except RecursionError:
        raise BundleError("bad safetensors header (nested too deeply)") from None
    except ValueError as e:
        raise BundleError(f"bad safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise BundleError("bad safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    entries = {name: _entry(name, meta, data_size) for name, meta in header.items()}
    return SafetensorsHeader(8 + n, entries, metadata if isinstance(metadata, dict) else {})


def _entry(name: str, meta: Any, data_size: int) -> HeaderEntry:
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    offsets = _naturals(meta.get("data_offsets")) if isinstance(meta, dict) else None
    shape = _naturals(meta.get("shape")) if isinstance(meta, dict) else None
    if not isinstance(dtype, str) or offsets is None or len(offsets) != 2 or shape is None:
        raise BundleError(f"malformed entry {name!r} in the header")
    if dtype not in DTYPE_BYTES:
        raise BundleError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    begin, end = offsets
    if begin > end:
        raise BundleError(f"tensor {name!r} ends (byte {end}) before it begins (byte {begin})")
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise BundleError(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} of {dtype}")
    if end > data_size:
        raise BundleError(f"tensor data is truncated: {name!r} ends at byte {end} of a {data_size}-byte region")
    return HeaderEntry(dtype, shape, begin, end)


def _naturals(values: Any) -> tuple[int, ...] | None:
    """``values`` as a tuple when it is a JSON list of non-negative integers, else None."""
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        return None
    return tuple(values)


def is_png(head: bytes) -> bool:
    """Whether the first 16 bytes of a file are a PNG's: the signature, then the IHDR chunk (the PNG rule that
    IHDR comes first), so a renamed file of another kind is refused."""
    return head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"


def is_pickle(head: bytes) -> bool:
    """Whether the first bytes of a file are a pickle's (protocol 2-5) or a zip's (a torch checkpoint)."""
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"


def check_content(path: Path, name: str, where: str) -> None:
    """Refuse a file whose bytes do not fit its name: a safetensors file with a valid header, JSON that
    parses (size and depth bounded), UTF-8 text, a PNG; and no pickle (or torch zip) under any name. The file
    must be a regular file (never read through a symlink)."""
    try:
        _check_open_content(path, name, where)
    except OSError as e:
        raise BundleError(f"{where}: cannot read {name}: {e.strerror or e}") from None


def _check_open_content(path: Path, name: str, where: str) -> None:
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        f.seek(0)
        if name.endswith(".safetensors"):
            try:
                _parse_header(f, size)
            except BundleError as e:
                what = "a pickle" if is_pickle(head) else f"not a safetensors file ({e})"
                raise BundleError(f"{where}: refusing {name}: {what}") from None
            return
        if is_pickle(head):
            raise BundleError(f"{where}: refusing {name}: it is a pickle")
        if name.endswith(".json"):
            try:
                parse_json(f.read(size + 1).decode("utf-8"), f"{where}: refusing {name}", name)
            except UnicodeDecodeError:
                raise BundleError(f"{where}: refusing {name}: not UTF-8 text") from None
        elif name.endswith(".md"):
            try:
                f.read().decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError(f"{where}: refusing {name}: not UTF-8 text") from None
        elif name.endswith(".png") and not is_png(head):
            raise BundleError(f"{where}: refusing {name}: not a PNG image")
