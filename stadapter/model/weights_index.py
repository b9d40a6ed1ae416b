"""Where this machine last loaded each local backbone weights file: ``$STADAPTER_HOME/weights.json``.

A bundle names a local weights file only as ``file:NAME`` (the file name, never its directory: bundles are
published) beside the backbone's fingerprint. This index maps a fingerprint to the absolute path its weights
were last loaded from, so `predict`, `serve` and `eval` find the file again without ``--weights``; after the
file moves, one ``--weights NEWPATH`` updates it. Best effort: an unreadable, oversized or malformed index is
ignored (and rewritten), a failed write is ignored, and a path found here is only a candidate: the caller
checks the fingerprint of what it loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOCAL_PREFIX = "file:"  # weights loaded from a local file, as bundles name them: file:NAME (no directory)

INDEX_FILE = "weights.json"
MAX_BYTES = 1 << 20
MAX_ENTRIES = 256


def index_path() -> Path:
    from stadapter.registry.db import default_home  # the one definition of $STADAPTER_HOME

    return default_home() / INDEX_FILE


def _read(path: Path) -> dict[str, dict[str, str]]:
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return {}
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return {}
    if not isinstance(data, dict):
        return {}
    return {fp: e for fp, e in data.items() if isinstance(e, dict) and isinstance(e.get("path"), str)
            and isinstance(e.get("name"), str)}


def remember(fingerprint: str, path: Path) -> None:
    """Record that weights with ``fingerprint`` were loaded from ``path`` (the most recent entry last). Nothing is
    written when that is already the latest entry: every process that loads the weights calls this, and a
    rewrite each time would cost a write and fsync per process and widen the window in which two processes
    recording different files lose one entry (the last writer wins)."""
    from stadapter.fsio import publish_file

    where = index_path()
    entries = _read(where)
    entry = {"path": str(path.resolve()), "name": path.name}
    if entries and list(entries)[-1] == fingerprint and entries[fingerprint] == entry:
        return
    entries.pop(fingerprint, None)
    entries[fingerprint] = entry
    text = json.dumps(dict(list(entries.items())[-MAX_ENTRIES:]), indent=1).encode()
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        publish_file(where, lambda f: f.write(text))
    except OSError:
        pass  # a read-only home: the user passes --weights each time


def lookup(fingerprint: str | None, name: str | None = None) -> Path | None:
    """The existing file last loaded with ``fingerprint``; without one, the latest existing file called
    ``name``. None when nothing fits."""
    entries = _read(index_path())
    if fingerprint is not None:
        entry = entries.get(fingerprint)
        candidates = [entry] if entry else []
    else:
        candidates = [e for e in reversed(entries.values()) if name is not None and e["name"] == name]
    for entry in candidates:
        path = Path(entry["path"])
        if os.path.isfile(path):
            return path
    return None
