"""The HTTP trust boundary tried as an attacker would, over real sockets to uvicorn on 127.0.0.1: chunked uploads
far over the limit, hostile file names, stalled headers and bodies, clients that vanish mid-upload, error bodies
that must not name server paths, and the bearer token."""

from __future__ import annotations

import logging
import os
import select
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from hostile_corpus import BOUNDARY, multipart, peak_bytes, tree_bytes
from stadapter.cli.main import app as cli
from stadapter.config import TaskSpec
from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from stadapter.runtime.server import ServerConfig, create_app
from stadapter.runtime.uploads import MAX_SHOWN_NAME
from test_runtime_support import register, write_clip
from test_server import ServerThread

TOKEN = "s3cret-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 1 << 20  # bytes of an upload
BODY_TIMEOUT = HEADER_TIMEOUT = 1.5  # seconds


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backbone) -> Iterator[dict]:
    """A server with a 1 MB upload limit, 1.5 s timeouts and a token; every temp file it makes lands in
    ``server_tmp`` (tempfile's directory is redirected there), so its growth can be measured."""
    tmp = tmp_path_factory.mktemp("hostile")
    server_tmp = tmp / "server-tmp"
    server_tmp.mkdir()
    reg = open_registry(home=tmp / "home")
    register(reg, tmp, tiny_backbone, "walk", seed=3, num_classes=4, width=8, spec=TaskSpec(num_frames=4))
    broken, _, _ = register(reg, tmp, tiny_backbone, "broken", seed=4, num_classes=4, width=8,
                            spec=TaskSpec(num_frames=4))
    for name, meta in broken.files.items():  # 'broken' gets corrupted weights: an error naming blob paths
        if name.endswith(".safetensors"):
            blob = reg.blobs.path(meta["sha256"])
            blob.chmod(0o644)
            blob.write_bytes(b"corrupted")
    clips = tmp / "clips"
    clips.mkdir()
    clip = write_clip(clips / "c0.mp4", frames=12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(server_tmp))
        engine = Engine(tiny_backbone, reg, device="cpu")
        config = ServerConfig(allowed_roots=[clips], max_upload_bytes=LIMIT, body_timeout_s=BODY_TIMEOUT,
                              header_timeout_s=HEADER_TIMEOUT, token=TOKEN)
        with ServerThread(create_app(engine, config)) as server:
            port = int(server.url.rsplit(":", 1)[1])
            yield {"url": server.url, "port": port, "tmp": tmp, "server_tmp": server_tmp, "clip": clip,
                   "clips": clips, "home": tmp / "home", "reg": reg}
    reg.close()


def client(served: dict, **kw) -> httpx.Client:
    return httpx.Client(base_url=served["url"], timeout=30, headers=AUTH, **kw)


def head(port: int, extra: str) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n{extra}\r\n").encode()


def send_raw(port: int, request_head: bytes, chunks: Iterable[bytes], timeout: float = 20) -> tuple[int, bytes]:
    """Send ``request_head`` then ``chunks`` in chunked transfer encoding, stopping as soon as the server
    answers or closes; (status or 0 when no answer came, the whole response)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        sock.sendall(request_head)
        try:
            for chunk in chunks:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (or closed): stop sending
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending
        response = b""
        try:
            while data := sock.recv(1 << 16):
                response += data
        except OSError:
            pass
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
    return status, response


def metric(served: dict, prefix: str) -> float:
    with client(served) as c:
        lines = [line for line in c.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return sum(float(line.split()[-1]) for line in lines)


def test_a_chunked_upload_far_over_the_limit_is_cut_off_at_the_limit(served):
    part = (b"--%s\r\nContent-Disposition: form-data; name=\"clip\"; filename=\"big.mp4\"\r\n\r\n" % BOUNDARY)
    chunks = [part] + [os.urandom(64 << 10)] * 800  # 50 MB
    with peak_bytes(served["server_tmp"]) as peak:
        t0 = time.monotonic()
        status, response = send_raw(served["port"], head(served["port"], "Transfer-Encoding: chunked\r\n"), chunks)
    assert status == 413, response[:300]
    assert b"larger than 1048576 bytes" in response
    assert time.monotonic() - t0 < 10
    assert peak[0] <= LIMIT + (1 << 20), f"temp grew to {peak[0]} bytes for a {LIMIT}-byte limit"
    assert tree_bytes(served["server_tmp"]) == 0 and not any(served["server_tmp"].iterdir()), "upload left behind"
    with client(served) as c:  # the server goes on serving
        assert c.get("/readyz").status_code == 200


def test_a_declared_length_over_the_limit_and_a_large_json_body_get_413(served):
    with client(served) as c:
        body, headers = multipart(b"x.mp4", b"\0" * (LIMIT + 10))
        r = c.post("/v1/predict", content=body, headers=headers)
        assert r.status_code == 413 and "larger than" in r.json()["detail"]
        r = c.post("/v1/predict", content=b"[" + b" " * (2 << 20) + b"]", headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/predict", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["detail"] == "the body is not valid JSON"


def outside_uploads(served: dict) -> set[Path]:
    """The files around the server's temp directory (the registry's own cache excepted)."""
    return {p for p in served["tmp"].rglob("*") if not {"server-tmp", "home"} & set(p.parts)}


@pytest.mark.parametrize("filename, shown", [
    (b"..", "upload"),
    (b".", "upload"),
    (b"", "upload"),
    (b"x" * 300 + b".mp4", "x" * (MAX_SHOWN_NAME - 3) + "..."),
    (b"../../../escaped.mp4", "escaped.mp4"),
    (b"/etc/passwd", "passwd"),
    (b"a/b\\c.mp4", "c.mp4"),
    (b"nul\x00byte.mp4", "nulbyte.mp4"),
    (b"new\r\nline.mp4", None),  # may be refused as a malformed header, never a 500
    ("\u00e9t\u00e9 \u2603.mp4".encode(), "\u00e9t\u00e9 \u2603.mp4"),
])
def test_hostile_file_names_are_never_used_as_paths(served, filename, shown):
    before = outside_uploads(served)
    body, headers = multipart(filename, served["clip"].read_bytes())
    with client(served) as c:
        r = c.post("/v1/predict", content=body, headers=headers)
    if shown is None:
        assert r.status_code in (200, 400), r.text
    else:
        assert r.status_code == 200, r.text
        assert r.json()["clip"] == shown
    after = outside_uploads(served)
    assert after == before, f"written outside the upload directory: {after - before}"
    assert not any(served["server_tmp"].iterdir()), "upload left behind"


def test_malformed_forms_are_400_not_500(served):
    good = served["clip"].read_bytes()
    body, headers = multipart(b"c.mp4", good)
    cases = {
        "truncated": (body[: len(body) // 2], headers),
        "no boundary": (body, {"content-type": "multipart/form-data"}),
        "two clips": (body.replace(b"--%s--" % BOUNDARY, b"") + multipart(b"d.mp4", good)[0], headers),
        "no clip": (body.replace(b'name="clip"; filename="c.mp4"', b'name="other"'), headers),
        "garbage": (b"\r\n".join([os.urandom(200)] * 20), headers),
    }
    with client(served) as c:
        for name, (content, hdrs) in cases.items():
            r = c.post("/v1/predict", content=content, headers=hdrs)
            assert r.status_code == 400, (name, r.status_code, r.text)
    assert metric(served, 'stadapter_requests_total{code="500"') == 0


def test_stalled_headers_and_bodies_are_cut_off_within_their_timeouts(served):
    port = served["port"]
    with socket.create_connection(("127.0.0.1", port)) as sock:  # headers that never end
        sock.settimeout(10)
        t0 = time.monotonic()
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(100) == b"", "the connection was closed without an answer"
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 2
    with socket.create_connection(("127.0.0.1", port)) as sock:  # a body that stops half way
        sock.settimeout(10)
        t0 = time.monotonic()
        sock.sendall(head(port, "Content-Length: 100000\r\n") + b"--%s\r\n" % BOUNDARY)
        response = sock.recv(1000)
        elapsed = time.monotonic() - t0
    assert response.startswith(b"HTTP/1.1 408"), response
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 2
    assert not any(served["server_tmp"].iterdir()), "upload left behind"


def test_a_client_that_disconnects_mid_upload_is_no_error(served, caplog):
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    before = metric(served, "stadapter_client_disconnects_total")
    try:
        with caplog.at_level(logging.INFO):
            with socket.create_connection(("127.0.0.1", served["port"])) as sock:
                sock.sendall(head(served["port"], "Transfer-Encoding: chunked\r\n"))
                part = b"--%s\r\nContent-Disposition: form-data; name=\"clip\"; filename=\"c.mp4\"\r\n\r\n" % BOUNDARY
                for chunk in [part] + [os.urandom(32 << 10)] * 8:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                time.sleep(0.2)
            deadline = time.monotonic() + 10
            while metric(served, "stadapter_client_disconnects_total") == before:
                assert time.monotonic() < deadline, "the disconnect was not counted"
                time.sleep(0.05)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert any("went away" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert metric(served, 'stadapter_requests_total{code="500"') == 0
    assert not any(served["server_tmp"].iterdir()), "upload left behind"


def test_error_bodies_do_not_name_server_paths(served):
    secrets = [str(served["home"]), str(served["server_tmp"]), str(served["clips"]), os.path.realpath(served["tmp"])]
    with client(served) as c:
        answers = {
            "unknown task": c.post("/v1/predict", json={"path": str(served["clip"]), "tasks": ["nope"]}),
            "undecodable upload": c.post("/v1/predict", content=multipart(b"x.mp4", b"not a video" * 50)[0],
                                         headers=multipart(b"", b"")[1]),
            "broken bundle": c.post("/v1/predict", json={"path": str(served["clip"]), "tasks": ["broken"]}),
            "missing clip": c.post("/v1/predict", json={"path": "missing.mp4", "tasks": ["walk"]}),
            "task list": c.get("/v1/tasks"),
        }
    codes = {name: r.status_code for name, r in answers.items()}
    assert codes["unknown task"] == 404 and codes["undecodable upload"] == 422 and codes["missing clip"] == 404
    assert codes["broken bundle"] >= 500, answers["broken bundle"].text
    for name, r in answers.items():
        for secret in secrets:
            assert secret not in r.text, (name, r.text)
    assert "x.mp4" in answers["undecodable upload"].json()["detail"], "the client's own name is kept"
    assert "<registry home>/" in answers["broken bundle"].json()["detail"], "the placeholder keeps what helps"


def test_the_bearer_token_guards_every_route_but_health(served):
    before = metric(served, 'stadapter_rejected_total{reason="unauthorized"}')
    with httpx.Client(base_url=served["url"], timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        for path in ["/readyz", "/v1/tasks", "/metrics", "/docs", "/openapi.json"]:
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
            r = c.get(path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        r = c.post("/v1/predict", json={"path": str(served["clip"]), "tasks": ["walk"]})
        assert r.status_code == 401
        assert c.get("/v1/tasks", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.get("/v1/tasks", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
        assert c.get("/v1/tasks", headers=AUTH).status_code == 200
        r = c.post("/v1/predict", json={"path": str(served["clip"]), "tasks": ["walk"]}, headers=AUTH)
        assert r.status_code == 200, r.text
    assert metric(served, 'stadapter_rejected_total{reason="unauthorized"}') == before + 13


def test_serve_warns_when_binding_a_public_address_without_a_token(home):
    runner = CliRunner()
    args = ["serve", "--port", "0", "--backbone", "no-such-backbone", "--device", "cpu"]
    r = runner.invoke(cli, [*args, "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "without a token" in r.output, r.output
    r = runner.invoke(cli, [*args, "--host", "0.0.0.0"], env={"STADAPTER_TOKEN": TOKEN})
    assert r.exit_code == 1 and "without a token" not in r.output, r.output
    r = runner.invoke(cli, [*args, "--host", "127.0.0.1"])
    assert r.exit_code == 1 and "without a token" not in r.output, r.output
    r = runner.invoke(cli, [*args, "--token", "has space"])
    assert r.exit_code == 1 and "token" in r.output and "Traceback" not in r.output, r.output


def test_stalled_connections_cannot_pile_up(served, tiny_backbone):
    """With max_connections=3, three clients stalled in their headers make a fourth request get 503 until the
    header deadline closes them; then the server answers again."""
    engine = Engine(tiny_backbone, served["reg"], device="cpu")
    config = ServerConfig(max_connections=3, header_timeout_s=HEADER_TIMEOUT)
    with ServerThread(create_app(engine, config)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for sock in stalled:
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(0.2)
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 503
            time.sleep(HEADER_TIMEOUT + 0.5)
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
            for sock in stalled:
                sock.settimeout(5)
                assert sock.recv(100) == b"", "a stalled connection was left open"
        finally:
            for sock in stalled:
                sock.close()


def test_redactor_and_display_name():
    from stadapter.runtime.httpguard import SERVER_PATH, Redactor
    from stadapter.runtime.uploads import display_name

    redact = Redactor([("/srv/home", "<registry home>"), ("sqlite:////srv/home/registry.db", "<registry database>")])
    message = ("no task 'x' in sqlite:////srv/home/registry.db; blob /srv/home/blobs/ab/cd; "
               "/tmp/stadapter-upload-1/clip.mp4: broken; see /etc/passwd; org/task hf://org/repo")
    assert redact(message, more=[("/tmp/stadapter-upload-1/clip.mp4", "holiday.mp4")]) == (
        "no task 'x' in <registry database>; blob <registry home>/blobs/ab/cd; holiday.mp4: broken; "
        f"see {SERVER_PATH}; org/task hf://org/repo")
    assert redact("/data/clip.mp4: bad", more=[("/real/clip.mp4", "/data/clip.mp4")]) == f"{SERVER_PATH}: bad"
    assert redact("/real/clip.mp4: bad", more=[("/real/clip.mp4", "/data/clip.mp4")]) == "/data/clip.mp4: bad"
    assert [display_name(n) for n in ["..", "a/../b.mp4", "C:\\x\\y.avi", "\x00\x1b[31m.mp4", None]] == [
        "upload", "b.mp4", "y.avi", "[31m.mp4", "upload"]
