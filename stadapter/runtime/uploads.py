"""Request bodies read as they stream, under a size limit and a deadline.

:func:`read_body` takes the body from the ASGI channel chunk by chunk: past ``limit`` bytes it stops reading
(413), past the deadline it stops waiting (408), and a client that goes away raises Starlette's
``ClientDisconnect``. :func:`read_upload` feeds that stream to python-multipart's streaming parser, so a 2 GB
chunked upload costs at most the limit plus one chunk of disk, never a spooled copy of the whole body. The clip
is written under a fixed name in a private temporary directory; the client's file name is never used as a path,
only shown (:func:`display_name`).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from stadapter.errors import DecodeError
from stadapter.runtime.httpguard import CLOSE, HTTPProblem

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELD = "clip"
MAX_PARTS = 16  # form parts per request
MAX_FIELD_BYTES = 64 << 10  # the value of one text field
MAX_SHOWN_NAME = 120  # characters of the client's file name kept for display
FLUSH_BYTES = 1 << 20  # file bytes gathered before one write to disk (off the event loop)
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")


async def read_body(request: Request, limit: int, deadline: float) -> AsyncIterator[bytes]:
    """The request body chunk by chunk as it arrives: HTTPProblem 413 once more than ``limit`` bytes came, 408
    when it is not all in by ``deadline`` (``time.monotonic()``), ClientDisconnect when the client goes away."""
    received = 0
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(request.receive(), left)
        except asyncio.TimeoutError:
            raise HTTPProblem(408, "the request body did not arrive in time; send it faster or in smaller "
                              "pieces", CLOSE) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise HTTPProblem(413, f"request body larger than {limit} bytes", CLOSE)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def display_name(raw: str | None) -> str:
    """The client's file name fit to show (it is never used as a path): its last path component without
    control characters, at most MAX_SHOWN_NAME characters; "upload" when nothing is left."""
    name = "".join(ch for ch in re.split(r"[/\\]", raw or "")[-1] if ch.isprintable()).strip()
    if name in ("", ".", ".."):
        return "upload"
    return name if len(name) <= MAX_SHOWN_NAME else name[: MAX_SHOWN_NAME - 3] + "..."


def parse_tasks(value: Any, limit: int) -> list[str]:
    """The task refs a request names (a comma-separated string or a list of them; stripped, deduplicated, in
    order); HTTPProblem 400 when there are none, too many, or the value has another type."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [part for v in value for part in v.split(",")]
    else:
        raise HTTPProblem(400, "tasks must be a string (comma-separated) or a list of strings")
    refs = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not refs:
        raise HTTPProblem(400, "no task given")
    if len(refs) > limit:
        raise HTTPProblem(400, f"at most {limit} tasks per request, got {len(refs)}")
    return refs


@dataclass
class Upload:
    """A multipart predict request: the clip saved on disk and the text fields."""

    path: Path  # the clip, under a fixed name in ``directory``
    directory: Path  # private temporary directory; the caller removes it
    shown: str  # the client's file name, for display
    fields: dict[str, list[str]]


@dataclass
class _Form:
    """python-multipart callbacks gathering a predict form: the file part ``clip`` into ``pending`` (the caller
    writes it out), the values of the ``wanted`` text fields (others are skipped)."""

    wanted: Collection[str]
    fields: dict[str, list[str]] = field(default_factory=dict)
    filename: str | None = None
    pending: bytearray = field(default_factory=bytearray)
    file_bytes: int = 0
    parts: int = 0
    complete: bool = False
    _header: bytes = b""
    _value: bytes = b""
    _disposition: bytes = b""
    _name: str = ""
    _in_file: bool = False
    _text: bytearray = field(default_factory=bytearray)

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def take(self) -> bytes:
        data = bytes(self.pending)
        self.pending.clear()
        return data

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise HTTPProblem(400, f"at most {MAX_PARTS} form fields per request")
        self._disposition, self._name, self._in_file = b"", "", False
        self._text.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise HTTPProblem(400, "each form field needs a Content-Disposition header with a name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            return
        if self._name != FILE_FIELD:
            raise HTTPProblem(400, f"only the field '{FILE_FIELD}' may hold a file")
        if self.filename is not None:
            raise HTTPProblem(400, "send one clip per request")
        self.filename, self._in_file = options[b"filename"].decode("utf-8", "replace"), True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending += data[start:end]
            self.file_bytes += end - start
        elif self._name in self.wanted:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise HTTPProblem(400, f"form field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if not self._in_file and self._name in self.wanted:
            self.fields.setdefault(self._name, []).append(self._text.decode("utf-8", "replace"))

    def _end(self) -> None:
        self.complete = True


def _boundary(content_type: str) -> bytes:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 200:
        raise HTTPProblem(400, "multipart/form-data needs a boundary of 1 to 200 characters")
    return boundary


def form_fields(content_type: str, body: bytes, wanted: Collection[str]) -> dict[str, list[str]]:
    """The ``wanted`` text fields of a multipart body already in memory (the file part read and dropped);
    HTTPProblem 400 for a malformed form, as :func:`read_upload`."""
    form = _Form(wanted)
    parser = MultipartParser(_boundary(content_type), form.callbacks())
    try:
        for start in range(0, len(body), FLUSH_BYTES):
            parser.write(body[start:start + FLUSH_BYTES])
            form.pending.clear()  # the clip's bytes are not wanted here
        parser.finalize()
    except MultipartParseError:
        raise HTTPProblem(400, "the multipart/form-data body is malformed") from None
    return form.fields


async def read_upload(request: Request, limit: int, deadline: float, wanted: Collection[str]) -> Upload:
    """The clip (field ``clip``) and the ``wanted`` text fields of a multipart body, read as it streams under
    :func:`read_body`'s ``limit`` and ``deadline``. HTTPProblem 400 for a malformed form, DecodeError for an
    empty clip."""
    boundary = _boundary(request.headers.get("content-type", ""))
    directory = Path(tempfile.mkdtemp(prefix="stadapter-upload-"))
    try:
        form = _Form(wanted)
        parser = MultipartParser(boundary, form.callbacks())
        received = directory / "clip"
        with open(received, "wb") as out:
            try:
                async for chunk in read_body(request, limit, deadline):
                    parser.write(chunk)
                    if len(form.pending) >= FLUSH_BYTES:
                        await run_in_threadpool(out.write, form.take())
                parser.finalize()
            except MultipartParseError:
                raise HTTPProblem(400, "the multipart/form-data body is malformed") from None
            await run_in_threadpool(out.write, form.take())
        if not form.complete:
            raise HTTPProblem(400, "the multipart/form-data body ended before its closing boundary")
        if form.filename is None:
            raise HTTPProblem(400, f"multipart requests need the clip file in field '{FILE_FIELD}'")
        if form.file_bytes == 0:
            raise DecodeError("the uploaded clip is empty (0 bytes)")
        shown = display_name(form.filename)
        suffix = Path(shown).suffix
        path = directory / ("clip" + (suffix if _SAFE_SUFFIX.fullmatch(suffix) else ""))
        os.replace(received, path)
        return Upload(path, directory, shown, form.fields)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


__all__ = ["Upload", "read_body", "read_upload", "display_name", "parse_tasks", "form_fields", "FILE_FIELD"]
