"""The HTTP trust boundary around the app: what a client may do before any of its bytes reach the model.

    HTTPProblem              an answer with a status code that the endpoints raise (413, 408, 403, ...)
    BearerAuth               ASGI middleware: ``Authorization: Bearer <token>`` on every path but the open ones
    header_deadline_protocol uvicorn's h11 protocol with a deadline on the request line and headers
    Redactor                 server paths out of error details (the full message goes to the log)

Reading request bodies (size limit while streaming, body timeout) lives in :mod:`stadapter.runtime.uploads`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import Callable, Collection, Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

CLOSE = {"Connection": "close"}  # sent with answers given before the body was read (413, 408, 401)


class HTTPProblem(Exception):
    """A request answered with ``status`` and the one-line ``detail`` (only values the client sent, never
    server paths)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


# -- bearer token -------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")  # visible ASCII: what an Authorization header can carry


def check_token(token: str) -> str:
    """``token`` if it can be sent in an Authorization header, else ValueError."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("the token must be 1 to 4096 visible ASCII characters (no spaces)")
    return token


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()  # equal lengths: compare_digest then reveals nothing, not even length


class BearerAuth:
    """ASGI middleware: an HTTP request to any path but ``open_paths`` needs ``Authorization: Bearer <token>``,
    compared in constant time; otherwise 401 with ``WWW-Authenticate: Bearer`` (``refused`` is called first, for
    a metric)."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Collection[str] = (),
                 refused: Callable[[], None] | None = None) -> None:
        self.app, self.open_paths, self.refused = app, frozenset(open_paths), refused
        self._expected = _digest(check_token(token).encode("ascii"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        sent = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        scheme, _, credentials = (sent or b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(_digest(credentials.strip()), self._expected):
            await self.app(scope, receive, send)
            return
        if self.refused is not None:
            self.refused()
        challenge = 'Bearer realm="stadapter"' + (', error="invalid_token"' if sent else "")
        detail = "wrong bearer token" if sent else "this server needs 'Authorization: Bearer <token>'"
        response = JSONResponse({"detail": detail}, status_code=401,
                                headers={"WWW-Authenticate": challenge, **CLOSE})
        await response(scope, receive, send)


# -- header deadline ----------------------------------------------------------------------------------------

def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request line and headers have not all arrived
    within ``seconds`` of the connection opening or of its previous answer. (uvicorn has no such timeout: its
    keep-alive timer stops at the first byte, so a client sending headers a byte at a time holds a connection
    for ever.) Pass the class as ``uvicorn.Config(http=...)``."""

    class HeaderDeadlineH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are all in: its body has its own timeout
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            self._arm_header_timer()  # before the parent starts a pipelined request (which disarms it)
            super().on_response_complete()

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(seconds, self._headers_overdue)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.logger.info("closed a connection: no complete request headers within %g s", seconds)
                self.transport.close()

    return HeaderDeadlineH11


# -- redaction ----------------------------------------------------------------------------------------------

SERVER_PATH = "<server path>"
# an absolute POSIX path not inside a URL or a relative path: "/tmp/x/clip.mp4", not "org/task" or "sqlite:///x";
# nor the rest of a path whose known prefix was replaced ("<registry home>/blobs/ab/..."); a final ':' or '.'
# is the message's own punctuation
_ABSOLUTE_PATH = re.compile(r"(?<![\w./:~\\\x00-])/[^\s\x00'\"()\[\]{},;]*[^\s\x00'\"()\[\]{},;:.]")
_SENTINEL = re.compile("\x00([0-9]+)\x00")


class Redactor:
    """Rewrites an error detail for the client: each known server string (registry URL, home, temp and root
    directories) becomes its placeholder, and any other absolute path becomes ``<server path>``."""

    def __init__(self, known: Iterable[tuple[str, str]] = ()) -> None:
        self.known = [(server, shown) for server, shown in known if server]

    def __call__(self, detail: str, more: Iterable[tuple[str, str]] = ()) -> str:
        """``detail`` without server paths; ``more`` adds request-specific pairs (an upload's temp path -> its
        file name, the real path of a clip -> the path the client sent), which may themselves be absolute."""
        pairs = sorted([*((s, v) for s, v in more if s), *self.known], key=lambda pair: -len(pair[0]))
        detail = detail.replace("\x00", "\\x00")
        shown: list[str] = []
        for server, placeholder in pairs:  # longest first: a clip's path before the directory holding it
            if server in detail:
                detail = detail.replace(server, f"\x00{len(shown)}\x00")
                shown.append(placeholder)
        detail = _ABSOLUTE_PATH.sub(SERVER_PATH, detail)
        return _SENTINEL.sub(lambda m: shown[int(m[1])], detail)


__all__ = ["HTTPProblem", "BearerAuth", "check_token", "header_deadline_protocol", "Redactor", "CLOSE"]
