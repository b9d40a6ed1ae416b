"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, plus PyYAML for validate-yaml).

It serves what huggingface_hub's upload and download code calls, so the real client runs against it:

    POST   /api/repos/create                              create a repo (409 with the url when it exists)
    GET    /api/models/{repo}[/revision/{rev}]            repo info (sha, siblings; ?blobs=1 for sizes and LFS)
    GET    /api/models/{repo}/refs                        branches and tags
    GET    /api/models/{repo}/tree/{rev}[/{path}]         files and folders (?recursive=1)
    GET    /api/models/{repo}/commits/{rev}               commit history, newest first
    POST   /api/models/{repo}/preupload/{rev}             "regular" or "lfs" per file, with the remote oid
    POST   /api/models/{repo}/commit/{rev}                NDJSON: header, file (base64), lfsFile, deletedFile,
                                                          deletedFolder
    POST   /api/models/{repo}/tag/{rev}                   create a tag (409 when it exists)
    DELETE /api/models/{repo}/tag/{tag}
    POST   /api/models/{repo}/branch/{branch}             create a branch (409 when it exists)
    DELETE /api/models/{repo}/branch/{branch}
    POST   /api/validate-yaml                             the README front matter must parse
    GET    /api/whoami-v2
    POST   /{repo}.git/info/lfs/objects/batch             LFS batch API (basic transfer)
    PUT    /lfs/upload/{oid}?size=..&sig=..               pre-signed upload (no auth header, as S3)
    POST   /lfs/verify/{oid}                              LFS verify
    HEAD/GET /{repo}/resolve/{rev}/{path}                 X-Repo-Commit, ETag, Content-Length; X-Linked-Etag and
                                                          X-Linked-Size for LFS files; Range requests

Errors are JSON bodies with the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) and
X-Error-Message headers; a wrong token gets 401 everywhere, a missing token gets 401 on writes.

Storage on disk, under ``--data``: every commit is a JSON file (sha, parent, message, date, file tree), refs
are a JSON file per repo (branches and tags), file contents live once in a content-addressed object store
(sha256). :meth:`HubStore.tamper` overwrites a stored object in place, to simulate a file changed on the
server after a push.

LFS mode (``--lfs``): ``regular`` (every file is a regular git file), ``lfs`` (every non-empty file goes
through the LFS batch API) or ``auto`` (as the Hub's default .gitattributes: by extension, or over 10 MB).
Clients must run with HF_HUB_DISABLE_XET=1 for LFS files: this server does not speak Xet.

Run it:  python tests/hub_server.py --port 8123 --data /tmp/hub --token secret [--lfs auto]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_MODES = ("regular", "lfs", "auto")
LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz",
                  ".png", ".jpg", ".jpeg", ".gif", ".mp4", ".zip", ".tar", ".gz", ".pkl", ".pickle")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS)
USER = "stadapter-test"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    """An HTTP error response: status, message and the Hub's X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.extra = extra or {}


class HubStore:
    """Repos as real commits on disk. Thread-safe (one lock; tests are small)."""

    def __init__(self, root: str | Path, lfs_mode: str = "auto") -> None:
        if lfs_mode not in LFS_MODES:
            raise ValueError(f"lfs_mode must be one of {LFS_MODES}, got {lfs_mode!r}")
        self.root = Path(root)
        self.lfs_mode = lfs_mode
        self.lock = threading.RLock()
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)

    # -- objects -------------------------------------------------------------------------------------
    def put_object(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        path = self.root / "objects" / oid
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return oid

    def has_object(self, oid: str, size: int | None = None) -> bool:
        path = self.root / "objects" / oid
        return path.is_file() and (size is None or path.stat().st_size == size)

    def read_object(self, oid: str) -> bytes:
        return (self.root / "objects" / oid).read_bytes()

    # -- repos ---------------------------------------------------------------------------------------
    def repo_dir(self, repo: str) -> Path:
        return self.root / "repos" / repo

    def exists(self, repo: str) -> bool:
        return (self.repo_dir(repo) / "repo.json").is_file()

    def meta(self, repo: str) -> dict[str, Any]:
        if not self.exists(repo):
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads((self.repo_dir(repo) / "repo.json").read_text())

    def refs(self, repo: str) -> dict[str, dict[str, str]]:
        self.meta(repo)
        return json.loads((self.repo_dir(repo) / "refs.json").read_text())

    def _write_refs(self, repo: str, refs: dict[str, dict[str, str]]) -> None:
        path = self.repo_dir(repo) / "refs.json"
        path.with_suffix(".tmp").write_text(json.dumps(refs, indent=1, sort_keys=True))
        os.replace(path.with_suffix(".tmp"), path)

    def create_repo(self, repo: str, private: bool = False) -> bool:
        """Create ``repo`` with an initial commit holding .gitattributes (as the Hub does). False if it exists."""
        with self.lock:
            if self.exists(repo):
                return False
            d = self.repo_dir(repo)
            (d / "commits").mkdir(parents=True, exist_ok=True)
            (d / "repo.json").write_text(json.dumps({"id": repo, "private": private, "createdAt": now_iso()}))
            self._write_refs(repo, {"branches": {}, "tags": {}})
            oid = self.put_object(GITATTRIBUTES.encode())
            sha = self._write_commit(repo, None, {".gitattributes": {"oid": oid, "lfs": False}},
                                     "initial commit", "")
            self._write_refs(repo, {"branches": {"main": sha}, "tags": {}})
            return True

    def _write_commit(self, repo: str, parent: str | None, tree: dict[str, Any], title: str, message: str) -> str:
        date = now_iso()
        body = json.dumps({"parent": parent, "tree": tree, "title": title, "message": message, "date": date,
                           "nonce": secrets.token_hex(8)}, sort_keys=True)
        sha = hashlib.sha1(body.encode()).hexdigest()
        commit = {"sha": sha, "parent": parent, "title": title, "message": message, "date": date, "tree": tree}
        (self.repo_dir(repo) / "commits" / f"{sha}.json").write_text(json.dumps(commit, indent=1, sort_keys=True))
        return sha

    def commit_obj(self, repo: str, sha: str) -> dict[str, Any]:
        return json.loads((self.repo_dir(repo) / "commits" / f"{sha}.json").read_text())

    def resolve(self, repo: str, revision: str) -> str:
        """A branch, tag or (full or >= 7 char) commit sha -> the commit sha. RevisionNotFound otherwise."""
        refs = self.refs(repo)
        for kind in ("branches", "tags"):
            if revision in refs[kind]:
                return refs[kind][revision]
        for prefix in ("refs/heads/", "refs/tags/"):
            if revision.startswith(prefix):
                name = revision[len(prefix):]
                kind = "branches" if prefix == "refs/heads/" else "tags"
                if name in refs[kind]:
                    return refs[kind][name]
        if len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision):
            matches = [p.stem for p in (self.repo_dir(repo) / "commits").glob(f"{revision}*.json")]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def tree(self, repo: str, sha: str) -> dict[str, dict[str, Any]]:
        return self.commit_obj(repo, sha)["tree"]

    def history(self, repo: str, sha: str) -> list[dict[str, Any]]:
        out = []
        while sha:
            c = self.commit_obj(repo, sha)
            out.append(c)
            sha = c["parent"]
        return out

    def upload_mode(self, path: str, size: int) -> str:
        if size == 0 or self.lfs_mode == "regular":
            return "regular"
        if self.lfs_mode == "lfs":
            return "lfs"
        return "lfs" if path.lower().endswith(LFS_EXTENSIONS) or size >= LFS_MIN_SIZE else "regular"

    def file_info(self, repo: str, sha: str, path: str) -> dict[str, Any]:
        """Size, etag and oids of a file at a commit, from the bytes actually stored (tampering included)."""
        entry = self.tree(repo, sha).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = self.read_object(entry["oid"])
        info = {"path": path, "size": len(data), "data": data, "lfs": entry["lfs"], "sha256": entry["oid"]}
        if entry["lfs"]:
            pointer = lfs_pointer(entry["oid"], len(data))
            info |= {"git_oid": git_blob_sha1(pointer), "etag": entry["oid"], "pointer_size": len(pointer)}
        else:
            info |= {"git_oid": git_blob_sha1(data), "etag": git_blob_sha1(data)}
        return info

    def commit(self, repo: str, branch: str, ops: list[dict[str, Any]], title: str, message: str,
               parent: str | None = None) -> str:
        with self.lock:
            refs = self.refs(repo)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = refs["branches"][branch]
            if parent is not None and parent != head:
                raise HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
            tree = dict(self.tree(repo, head))
            for op in ops:
                key, value = op["key"], op["value"]
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else value["content"].encode()
                    tree[path] = {"oid": self.put_object(data), "lfs": False}
                elif key == "lfsFile":
                    if value.get("algo", "sha256") != "sha256":
                        raise HubError(400, f"unsupported LFS algo {value.get('algo')}")
                    if not self.has_object(value["oid"], value.get("size")):
                        raise HubError(422, f"LFS object {value['oid']} for {path} was not uploaded")
                    tree[path] = {"oid": value["oid"], "lfs": True}
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            sha = self._write_commit(repo, head, tree, title, message)
            refs["branches"][branch] = sha
            self._write_refs(repo, refs)
            return sha

    def set_ref(self, repo: str, kind: str, name: str, sha: str | None, exist_ok: bool = False) -> None:
        with self.lock:
            refs = self.refs(repo)
            if sha is None:
                if name not in refs[kind]:
                    raise HubError(404, f"{kind[:-1]} {name} not found", "RevisionNotFound")
                del refs[kind][name]
            else:
                if name in refs[kind] and not exist_ok:
                    raise HubError(409, f"{'Tag' if kind == 'tags' else 'Branch'} reference {name} exists already")
                refs[kind][name] = sha
            self._write_refs(repo, refs)

    # -- test helpers --------------------------------------------------------------------------------
    def tamper(self, repo: str, path: str, data: bytes, revision: str = "main") -> None:
        """Overwrite the stored bytes of ``path`` at ``revision`` in place (the commit and its oids stay)."""
        with self.lock:
            entry = self.tree(repo, self.resolve(repo, revision))[path]
            (self.root / "objects" / entry["oid"]).write_bytes(data)

    def commit_count(self, repo: str, revision: str = "main") -> int:
        return len(self.history(repo, self.resolve(repo, revision)))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing ------------------------------------------------------------------------------------
    @property
    def store(self) -> HubStore:
        return self.server.store

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._send(status, json.dumps(payload).encode(), headers, content_type)

    def _error(self, e: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send(e.status, json.dumps({"error": e.message, **e.extra}).encode(), headers, head=head)

    # -- auth ----------------------------------------------------------------------------------------
    def _auth(self, write: bool, repo: str | None = None) -> None:
        token = self.server.token
        given = self.headers.get("Authorization", "")
        bearer = given[7:] if given.lower().startswith("bearer ") else None
        if token is None:
            return
        if given and not (bearer and hmac.compare_digest(bearer, token)):
            raise HubError(401, "Invalid credentials in Authorization header")
        if bearer:
            return
        if write:
            raise HubError(401, "Invalid username or password.")
        if repo is not None and self.store.exists(repo) and self.store.meta(repo).get("private"):
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")

    def _sign(self, oid: str, size: int) -> str:
        return hmac.new(self.server.secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    # -- dispatch ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.split("/") if p]
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        try:
            failure = self.server.take_failure(method, url.path)
            if failure is not None:
                raise HubError(failure, "injected transient failure")
            self._route(method, parts, body)
        except HubError as e:
            self._error(e, head=method == "HEAD")
        except Exception as e:  # noqa: BLE001 - a test server reports its bugs as 500
            self._error(HubError(500, f"{type(e).__name__}: {e}"), head=method == "HEAD")
            if self.server.verbose:
                raise

    def _route(self, method: str, p: list[str], body: bytes) -> None:
        if p[:1] == ["api"]:
            if p[1:] == ["repos", "create"] and method == "POST":
                return self.create_repo(json.loads(body or b"{}"))
            if p[1:] == ["validate-yaml"] and method == "POST":
                return self.validate_yaml(json.loads(body or b"{}"))
            if p[1:] == ["whoami-v2"] and method == "GET":
                self._auth(write=True)
                return self._json(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})
            if len(p) >= 4 and p[1] == "models":
                repo, rest = f"{p[2]}/{p[3]}", p[4:]
                return self.repo_api(method, repo, rest, body)
            raise HubError(404, f"unknown route {self.path}")
        if p[:2] == ["lfs", "upload"] and method == "PUT" and len(p) == 3:
            return self.lfs_upload(p[2], body)
        if p[:2] == ["lfs", "verify"] and method == "POST" and len(p) == 3:
            self._auth(write=True)
            info = json.loads(body or b"{}")
            if not self.store.has_object(p[2], info.get("size")):
                raise HubError(404, f"LFS object {p[2]} not found")
            return self._json(200, {"success": True})
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve_file(method, f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(f"{p[0]}/{p[1][:-4]}", json.loads(body or b"{}"))
        raise HubError(404, f"unknown route {self.path}")

    # -- endpoints -----------------------------------------------------------------------------------
    def create_repo(self, payload: dict[str, Any]) -> None:
        self._auth(write=True)
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "this test server stores model repos only")
        name, org = payload.get("name"), payload.get("organization") or USER
        if not name or "/" in name:
            raise HubError(400, f"invalid repo name {name!r}")
        repo = f"{org}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.base}/{repo}"
        if not self.store.create_repo(repo, private):
            raise HubError(409, "You already created this model repo", extra={"url": url})
        self._json(200, {"url": url, "name": repo, "id": repo})

    def validate_yaml(self, payload: dict[str, Any]) -> None:
        self._auth(write=True)
        import yaml

        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "unterminated YAML front matter"})
            else:
                try:
                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "YAML front matter must be a mapping"})
                except yaml.YAMLError as e:
                    errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def repo_api(self, method: str, repo: str, rest: list[str], body: bytes) -> None:
        write = method != "GET"
        self._auth(write=write, repo=repo)
        store = self.store
        store.meta(repo)  # RepoNotFound
        if not rest and method == "GET":
            return self.repo_info(repo, "main")
        action, args = rest[0], rest[1:]
        if action == "revision" and method == "GET" and args:
            return self.repo_info(repo, "/".join(args))
        if action == "refs" and method == "GET":
            refs = store.refs(repo)

            def items(kind: str, prefix: str) -> list[dict[str, str]]:
                return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": s} for n, s in sorted(refs[kind].items())]

            out: dict[str, Any] = {"branches": items("branches", "refs/heads/"), "tags": items("tags", "refs/tags/"),
                                   "converts": []}
            if self.query.get("include_prs"):
                out["pullRequests"] = []
            return self._json(200, out)
        if action == "tree" and method == "GET" and args:
            return self.list_tree(repo, args[0], "/".join(args[1:]))
        if action == "commits" and method == "GET" and args:
            sha = store.resolve(repo, "/".join(args))
            return self._json(200, [{"id": c["sha"], "title": c["title"], "message": c["message"], "date": c["date"],
                                     "authors": [{"user": USER}]} for c in store.history(repo, sha)])
        if action == "preupload" and method == "POST" and args:
            return self.preupload(repo, "/".join(args), json.loads(body or b"{}"))
        if action == "commit" and method == "POST" and args:
            return self.commit(repo, "/".join(args), body)
        if action == "tag" and args:
            if method == "POST":
                payload = json.loads(body or b"{}")
                sha = store.resolve(repo, "/".join(args))
                store.set_ref(repo, "tags", payload["tag"], sha)
                return self._json(200, {})
            if method == "DELETE":
                store.set_ref(repo, "tags", "/".join(args), None)
                return self._json(200, {})
        if action == "branch" and args:
            branch = "/".join(args)
            if method == "POST":
                payload = json.loads(body or b"{}")
                sha = store.resolve(repo, payload.get("startingPoint") or "main")
                store.set_ref(repo, "branches", branch, sha, exist_ok=bool(self.query.get("overwrite")))
                return self._json(200, {})
            if method == "DELETE":
                store.set_ref(repo, "branches", branch, None)
                return self._json(200, {})
        raise HubError(404, f"unknown route {self.path}")

    def repo_info(self, repo: str, revision: str) -> None:
        store = self.store
        sha = store.resolve(repo, revision)
        meta = store.meta(repo)
        blobs = self.query.get("blobs") in ("1", "true", "True")
        siblings = []
        for path in sorted(store.tree(repo, sha)):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                f = store.file_info(repo, sha, path)
                s |= {"size": f["size"], "blobId": f["git_oid"]}
                if f["lfs"]:
                    s["lfs"] = {"size": f["size"], "sha256": f["sha256"], "pointerSize": f["pointer_size"]}
            siblings.append(s)
        commit = store.commit_obj(repo, sha)
        self._json(200, {"_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                         "private": meta["private"], "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                         "tags": [], "siblings": siblings, "createdAt": meta["createdAt"],
                         "lastModified": commit["date"]})

    def list_tree(self, repo: str, revision: str, path: str) -> None:
        store = self.store
        sha = store.resolve(repo, revision)
        recursive = self.query.get("recursive") in ("1", "true", "True")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        tree = store.tree(repo, sha)
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        files, folders = [], set()
        for p in sorted(tree):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")
            for i in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:i]))
            f = store.file_info(repo, sha, p)
            item: dict[str, Any] = {"type": "file", "path": p, "size": f["size"], "oid": f["git_oid"]}
            if f["lfs"]:
                item["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": f["pointer_size"]}
            files.append(item)
        out = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)]
        self._json(200, out + files)

    def preupload(self, repo: str, revision: str, payload: dict[str, Any]) -> None:
        store = self.store
        sha = store.resolve(repo, revision)
        tree = store.tree(repo, sha)
        files = []
        for f in payload.get("files", []):
            mode = store.upload_mode(f["path"], int(f.get("size", 0)))
            oid = None
            if f["path"] in tree:
                info = store.file_info(repo, sha, f["path"])
                oid = info["sha256"] if mode == "lfs" else info["git_oid"]
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": sha})

    def commit(self, repo: str, revision: str, body: bytes) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by this test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        sha = self.store.commit(repo, revision, lines[1:], header.get("summary") or "commit",
                                header.get("description") or "", header.get("parentCommit"))
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.base}/{repo}/commit/{sha}",
                         "hookOutput": "", "pullRequestUrl": None})

    def lfs_batch(self, repo: str, payload: dict[str, Any]) -> None:
        lfs_json = "application/vnd.git-lfs+json"
        self._auth(write=payload.get("operation") == "upload", repo=repo)
        self.store.meta(repo)
        if payload.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_object(oid, size):
                sig = self._sign(oid, size)
                item["actions"] = {
                    "upload": {"href": f"{self.base}/lfs/upload/{oid}?size={size}&sig={sig}", "expires_in": 3600},
                    "verify": {"href": f"{self.base}/lfs/verify/{oid}", "expires_in": 3600},
                }
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects}, content_type=lfs_json)

    def lfs_upload(self, oid: str, body: bytes) -> None:
        size = int(self.query.get("size", -1))
        if not hmac.compare_digest(self.query.get("sig", ""), self._sign(oid, size)):
            raise HubError(403, "bad or missing upload signature")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match oid {oid} and size {size}")
        self.store.put_object(body)
        self._send(200, b"", headers={"ETag": f'"{oid}"'})

    def resolve_file(self, method: str, repo: str, revision: str, path: str) -> None:
        self._auth(write=False, repo=repo)
        store = self.store
        sha = store.resolve(repo, revision)
        f = store.file_info(repo, sha, path)
        data: bytes = f["data"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f["etag"]}"', "Accept-Ranges": "bytes"}
        if f["lfs"]:
            headers |= {"X-Linked-Etag": f'"{f["etag"]}"', "X-Linked-Size": str(f["size"])}
        status, body = 200, data
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and method == "GET":
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            body = data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream", head=method == "HEAD")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: HubStore, token: str | None, verbose: bool = False) -> None:
        super().__init__(address, Handler)
        self.store, self.token, self.verbose = store, token, verbose
        self.secret = secrets.token_bytes(16)
        self._failures: list[tuple[str | None, str | None, int]] = []
        self._fail_lock = threading.Lock()

    def take_failure(self, method: str, path: str) -> int | None:
        with self._fail_lock:
            for i, (m, contains, status) in enumerate(self._failures):
                if (m is None or m == method) and (contains is None or contains in path):
                    del self._failures[i]
                    return status
        return None


class HubServer:
    """The server in a background thread: ``with HubServer(tmp_path, token="t") as hub: hub.url ...``."""

    def __init__(self, data: str | Path, *, token: str | None = None, lfs: str = "auto", host: str = "127.0.0.1",
                 port: int = 0, verbose: bool = False) -> None:
        self.store = HubStore(data, lfs)
        self.token = token
        self._server = _Server((host, port), self.store, token, verbose)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, count: int = 1, status: int = 503, *, method: str | None = None,
                  path_contains: str | None = None) -> None:
        """Answer the next ``count`` matching requests with ``status`` (to test retries)."""
        with self._server._fail_lock:
            self._server._failures.extend([(method, path_contains, status)] * count)

    def tamper(self, repo: str, path: str, data: bytes, revision: str = "main") -> None:
        self.store.tamper(repo, path, data, revision)

    def commit_count(self, repo: str, revision: str = "main") -> int:
        return self.store.commit_count(repo, revision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--data", required=True, help="storage directory (created)")
    parser.add_argument("--token", default=os.environ.get("HUB_SERVER_TOKEN"),
                        help="the one accepted token (default: $HUB_SERVER_TOKEN; none: no auth)")
    parser.add_argument("--lfs", choices=LFS_MODES, default="auto", help="which files preupload marks 'lfs'")
    parser.add_argument("--reset", action="store_true", help="empty the storage directory first")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.reset and Path(args.data).exists():
        shutil.rmtree(args.data)
    hub = HubServer(args.data, token=args.token, lfs=args.lfs, host=args.host, port=args.port,
                    verbose=args.verbose)
    print(f"hub server on {hub.url} (data {args.data}, lfs mode {args.lfs}, "
          f"{'token required' if args.token else 'no auth'})", flush=True)
    try:
        hub._server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        hub._server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
