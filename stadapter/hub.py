"""Push and pull adapter bundles through the Hugging Face Hub. The only module that imports huggingface_hub.

    push(bundle_dir, "org/name", tag="v3")       -> PushResult(commit, tag, url, created)
    pull("org/name", "v3", dest=path)             -> PullResult(commit, path)   (a verified bundle directory)

What this module guarantees:

* Endpoint and token come from the arguments, else ``HF_ENDPOINT`` / ``HF_TOKEN`` read at call time, and are
  passed explicitly to huggingface_hub (it reads its environment once, at import). A token stored by
  ``hf auth login`` is used only for the default endpoint, so it never travels to a mirror or a test server.
  The token never appears in a message or a log line. An endpoint without Xet storage (a mirror, a private
  Hub, tests/hub_server.py) is detected by its xet token route failing: the push warns and goes through Git
  LFS instead (huggingface_hub's HF_HUB_DISABLE_XET, for the rest of the process).
* Every request has a timeout (huggingface_hub leaves some calls without one: a request hook fills in ours),
  transient failures (5xx, 429, connection reset, timeouts) are retried with exponential backoff within the
  timeout, and failures become one-line :class:`~stadapter.errors.HubError` messages: token refused (401),
  no permission (403), repository or revision not found, Hub unreachable.
* A push uploads the bundle's files (adapter.safetensors, config.json, labels.json, README.md, metrics.json,
  manifest.json), deletes files the bundle no longer has, and tags the commit. An unchanged bundle (every
  remote file's sha256 / git oid equal to the local one) makes no new commit. Tags are never moved.
* A pull resolves the revision (tag, branch or sha) to one commit and downloads exactly that commit. Before
  anything is written to ``dest`` it refuses pickles and files the manifest does not list (naming them),
  checks the bundle format version, and checks every file's size and sha256 against the manifest. Files go
  through a cache under ``$STADAPTER_HOME/hub/cache`` (huggingface_hub's layout); with ``HF_HUB_OFFLINE=1``
  a revision already pulled once is served from that cache, verified the same way.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stadapter import __version__
from stadapter.bundle import (
    MANIFEST,
    PICKLE_SUFFIXES,
    check_bundle,
    check_content,
    check_file_names,
    load_manifest,
    sha256_file,
    verify_bundle,
)
from stadapter.errors import BundleError, HubError
from stadapter.fsio import publish_dir, publish_file

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT = 30.0
MAX_ATTEMPTS = 4
BACKOFF_S = 0.5
IGNORED_REMOTE = frozenset({".gitattributes"})  # git metadata every Hub repo has; never part of a bundle
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
SHA_RE = re.compile(r"^[0-9a-f]{40}\Z")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRUE = ("1", "true", "yes", "on")

T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """repo, commit (the commit holding the bundle), tag (or None), url (the commit's tree on the Hub),
    created (a new commit was made; False when the bundle was already there), repo_created (the repo is new)."""

    repo: str
    commit: str
    tag: str | None
    url: str
    created: bool
    repo_created: bool = False
    branch: str = "main"


@dataclass(frozen=True)
class PullResult:
    """repo, revision (as asked), commit (what it resolved to), path (the verified bundle directory), files
    (the manifest's {name: {sha256, size}}), from_cache (served offline from the local cache)."""

    repo: str
    revision: str
    commit: str
    path: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    from_cache: bool = False


# -- settings ------------------------------------------------------------------------------------------

def parse_repo_ref(text: str) -> tuple[str, str | None]:
    """``org/name`` or ``org/name@revision`` -> (repo, revision or None). Raises HubError if malformed."""
    repo, sep, revision = text.strip().partition("@")
    check_repo_id(repo)
    if sep and not revision:
        raise HubError(f"{text!r}: empty revision after '@'; use ORG/NAME@REVISION (a tag, branch or commit)")
    return repo, (revision or None)


def check_repo_id(repo: str) -> str:
    if not isinstance(repo, str) or not REPO_RE.match(repo) or "--" in repo or ".." in repo:
        raise HubError(f"not a Hub repository id: {repo!r}; use ORG/NAME (letters, digits, '.', '_', '-')")
    return repo


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The argument, else ``$HF_ENDPOINT``, else https://huggingface.co (no trailing slash)."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if not re.match(r"^https?://[^/\s]+", value):
        raise HubError(f"not a Hub endpoint URL: {value!r}; use http(s)://host[:port]")
    return value.rstrip("/")


def resolve_token(token: str | None, endpoint: str) -> str | bool | None:
    """The argument, else ``$HF_TOKEN``; else the login token for the default endpoint only (None lets
    huggingface_hub use it), and no token at all (False) for any other endpoint."""
    token = token or os.environ.get("HF_TOKEN") or None
    if token:
        return token
    return None if endpoint == DEFAULT_ENDPOINT else False


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as the environment says now, or as huggingface_hub read it at import."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def default_cache_dir() -> Path:
    """``$STADAPTER_HOME/hub/cache``: downloaded files in huggingface_hub's cache layout."""
    from stadapter.registry.db import default_home

    return default_home() / "hub" / "cache"


def _sync_env() -> None:
    """huggingface_hub reads HF_HUB_DISABLE_XET at import; honour it when it was set afterwards (one way)."""
    if os.environ.get("HF_HUB_DISABLE_XET", "").strip().lower() in _TRUE:
        from huggingface_hub import constants

        constants.HF_HUB_DISABLE_XET = True


def _fall_back_to_lfs() -> bool:
    """Turn Xet off for this process (uploads then use Git LFS); False when it already was off."""
    from huggingface_hub import constants

    if constants.HF_HUB_DISABLE_XET:
        return False
    constants.HF_HUB_DISABLE_XET = True
    return True


# -- timeouts on every request -------------------------------------------------------------------------

_FILL_TIMEOUT: float | None = None
_HOOK_INSTALLED = False


def _fill_timeout(request: Any) -> None:
    """Request hook: give every request without one our timeout (connect, read, write, pool)."""
    t = _FILL_TIMEOUT
    if t is None:
        return
    current = request.extensions.get("timeout") or {}
    filled = {k: (t if current.get(k) is None else current[k]) for k in ("connect", "read", "write", "pool")}
    request.extensions = {**request.extensions, "timeout": filled}


def _install_timeouts(timeout: float) -> None:
    """Wrap huggingface_hub's HTTP client factory once, adding :func:`_fill_timeout` as a request hook.
    Several HfApi calls (create_repo, create_commit, create_tag, list_repo_refs, list_repo_tree...) send no
    timeout of their own; they get the timeout of the latest stadapter Hub operation in this process."""
    global _FILL_TIMEOUT, _HOOK_INSTALLED
    _FILL_TIMEOUT = float(timeout)
    if _HOOK_INSTALLED:
        return
    try:  # huggingface_hub >= 1.0 (httpx clients); older releases keep the per-call timeouts only
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import _http
    except ImportError:
        _HOOK_INSTALLED = True
        return
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or getattr(_http, "default_client_factory", None)
    if previous is None:  # an unknown layout: keep per-call timeouts only
        _HOOK_INSTALLED = True
        return

    def factory() -> Any:
        client = previous()
        hooks = client.event_hooks
        if _fill_timeout not in hooks.get("request", []):
            client.event_hooks = {"request": [*hooks.get("request", []), _fill_timeout],
                                  "response": list(hooks.get("response", []))}
        return client

    set_client_factory(factory)
    _HOOK_INSTALLED = True


# -- errors ----------------------------------------------------------------------------------------------

def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        out.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return out


def _status(e: BaseException) -> int | None:
    for c in _chain(e):
        status = getattr(getattr(c, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _kinds(e: BaseException) -> set[str]:
    """Class names along the exception's MRO and cause chain (httpx and httpx2 share the names)."""
    return {cls.__name__ for c in _chain(e) for cls in type(c).__mro__}


def _xet_refused(e: BaseException) -> bool:
    """Whether the endpoint answered, but without Xet storage (its xet token route is missing or refused):
    huggingface_hub uploads large files through Xet when hf_xet is installed, a mirror or a private Hub may
    speak only Git LFS."""
    return any(re.search(r"/xet-(write|read)-token/", str(c)) for c in _chain(e))


def _transient(e: BaseException) -> bool:
    if isinstance(e, (HubError, BundleError)) or _xet_refused(e):
        return False
    kinds = _kinds(e)
    if kinds & {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "GatedRepoError",
                "OfflineModeIsEnabled"}:
        return False
    status = _status(e)
    if status is not None:
        return status in TRANSIENT_STATUS
    return bool(kinds & {"TimeoutException", "NetworkError", "RemoteProtocolError", "ConnectionError",
                         "ConnectionResetError", "TimeoutError"})


class _Hub:
    """One operation's connection settings: an HfApi with explicit endpoint and token, retries, messages."""

    def __init__(self, endpoint: str | None, token: str | None, timeout: float) -> None:
        if not timeout or timeout <= 0:
            raise HubError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.endpoint = resolve_endpoint(endpoint)
        self.token = resolve_token(token, self.endpoint)
        self.timeout = float(timeout)
        _sync_env()
        _install_timeouts(self.timeout)
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=self.endpoint, token=self.token, library_name="stadapter",
                         library_version=__version__)

    # -- messages ----------------------------------------------------------------------------------------
    def clean(self, text: str, limit: int = 300) -> str:
        text = " ".join(str(text).split())
        if isinstance(self.token, str) and self.token:
            text = text.replace(self.token, "***")
        return text if len(text) <= limit else text[:limit] + "..."

    def error(self, e: BaseException, what: str, repo: str | None = None, revision: str | None = None) -> HubError:
        """A one-line HubError for a failed Hub call (never containing the token)."""
        if isinstance(e, HubError):
            return e
        kinds, status = _kinds(e), _status(e)
        at = f"the Hub at {self.endpoint}"
        no_token = not isinstance(self.token, str)
        if _xet_refused(e):
            return HubError(f"{what}: {at} was reached but does not offer Xet storage (its xet token route "
                            f"answered {_status(e) or 'an error'}), which huggingface_hub uses for large files when "
                            f"hf_xet is installed; set HF_HUB_DISABLE_XET=1 to upload through Git LFS")
        if "OfflineModeIsEnabled" in kinds:
            return HubError(f"{what}: HF_HUB_OFFLINE is set, so {at} is not contacted; unset it, or pull a "
                            f"revision that is already in the local cache")
        if "RevisionNotFoundError" in kinds:
            known = self._known_refs(repo) if repo else ""
            return HubError(f"{what}: revision {revision!r} not found in {repo} on {at}{known}")
        if "GatedRepoError" in kinds:
            return HubError(f"{what}: {repo} on {at} is gated: accept its conditions on the Hub with the token's "
                            f"account")
        if "RepositoryNotFoundError" in kinds:
            hint = " (pass --token or set HF_TOKEN if it is private)" if no_token else \
                " (or it is private and the token cannot read it)"
            return HubError(f"{what}: repository {repo} not found on {at}{hint}")
        if status == 401:
            if no_token:
                return HubError(f"{what}: {at} needs a token (401 Unauthorized); pass --token or set HF_TOKEN")
            return HubError(f"{what}: {at} refused the token (401 Unauthorized); check --token / HF_TOKEN")
        if status == 403:
            return HubError(f"{what}: the token may not do this with {repo or 'this repository'} on {at} "
                            f"(403 Forbidden); use a token with the needed (read or write) access")
        if "EntryNotFoundError" in kinds:
            return HubError(f"{what}: file not found in {repo}@{revision} on {at}")
        if "TimeoutException" in kinds or "TimeoutError" in kinds:
            return HubError(f"{what}: {at} did not answer within {self.timeout:g}s (timed out); check the network "
                            f"or raise --timeout")
        if kinds & {"NetworkError", "ConnectError", "ConnectionError", "RemoteProtocolError"} and status is None:
            reason = self.clean(str(e), 120) or type(e).__name__
            return HubError(f"{what}: cannot reach {at} ({reason}); check --endpoint / HF_ENDPOINT and the network")
        if status == 404:
            return HubError(f"{what}: {at} answered 404 Not Found without a Hub error code; is {self.endpoint} "
                            f"a Hugging Face Hub endpoint? (check --endpoint / HF_ENDPOINT)")
        if status is not None:
            server = self.clean(getattr(getattr(e, "response", None), "headers", {}).get("X-Error-Message", "")
                                or str(e), 200)
            return HubError(f"{what}: {at} answered {status}: {server}")
        return HubError(f"{what}: {type(e).__name__}: {self.clean(str(e))}")

    def _known_refs(self, repo: str) -> str:
        try:
            refs = self.api.list_repo_refs(repo)
        except Exception:  # noqa: BLE001 - only decorates a message
            return ""
        tags = ", ".join(sorted(t.name for t in refs.tags)[:20]) or "none"
        branches = ", ".join(sorted(b.name for b in refs.branches)[:20]) or "none"
        return f" (tags: {tags}; branches: {branches})"

    # -- calls -------------------------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], T], *, repo: str | None = None, revision: str | None = None) -> T:
        """Run ``fn``, retrying transient failures with exponential backoff while the timeout allows;
        anything else (or the last failure) becomes a HubError."""
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except (HubError, BundleError):
                raise
            except Exception as e:  # noqa: BLE001 - translated below
                if _xet_refused(e) and _fall_back_to_lfs():
                    log.warning("%s: %s does not offer Xet storage; uploading through Git LFS instead "
                                "(set HF_HUB_DISABLE_XET=1 to skip the attempt)", what, self.endpoint)
                    continue
                wait = BACKOFF_S * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
                elapsed = time.monotonic() - start
                if not _transient(e) or attempt >= MAX_ATTEMPTS or elapsed + wait > self.timeout:
                    err = self.error(e, what, repo, revision)
                    if _transient(e) and attempt > 1:
                        err = HubError(f"{err} [{attempt} attempts in {elapsed:.1f}s]")
                    raise err from None
                log.warning("%s: transient failure (%s), retrying in %.1fs [%d/%d]", what,
                            self.clean(type(e).__name__ + ": " + str(e), 160), wait, attempt, MAX_ATTEMPTS - 1)
                time.sleep(wait)

    def commit_of(self, repo: str, revision: str) -> str:
        return self.snapshot(repo, revision)[0]

    def snapshot(self, repo: str, revision: str, files_metadata: bool = False) -> tuple[str, dict[str, Any]]:
        """(commit sha, {path: RepoSibling}) of ``revision``, from one repo-info request (so the file list
        belongs to exactly that commit). With ``files_metadata``: sizes, blob ids and LFS sha256s."""
        info = self.call(f"resolve {repo}@{revision}",
                         lambda: self.api.model_info(repo, revision=revision, files_metadata=files_metadata,
                                                     timeout=self.timeout),
                         repo=repo, revision=revision)
        if not isinstance(info.sha, str) or not SHA_RE.match(info.sha):
            raise HubError(f"resolve {repo}@{revision}: the Hub at {self.endpoint} returned no commit sha")
        return info.sha, {s.rfilename: s for s in (info.siblings or [])}

    def download(self, repo: str, name: str, commit: str, cache: Path, local_only: bool) -> Path:
        from huggingface_hub import hf_hub_download

        def run() -> Path:
            return Path(hf_hub_download(repo, name, revision=commit, cache_dir=cache, endpoint=self.endpoint,
                                        token=self.token, etag_timeout=self.timeout,
                                        local_files_only=local_only, library_name="stadapter",
                                        library_version=__version__))

        what = f"download {name} from {repo}@{commit[:12]}"
        try:
            return self.call(what, run, repo=repo, revision=commit)
        except HubError:
            if local_only:
                raise HubError(f"{what}: not in the local cache {cache}, and HF_HUB_OFFLINE is set") from None
            raise


# -- push ------------------------------------------------------------------------------------------------

def _git_blob_sha1(path: Path) -> str:
    import hashlib

    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _same_file(local: Path, remote: Any) -> bool:
    """Whether a remote sibling (with files metadata) holds exactly the local file's bytes."""
    if remote is None or remote.size is None or remote.size != local.stat().st_size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None and lfs.get("sha256"):
        return lfs["sha256"] == sha256_file(local)
    return bool(remote.blob_id) and remote.blob_id == _git_blob_sha1(local)


def push(bundle_dir: str | Path, repo: str, *, endpoint: str | None = None, token: str | None = None,
         private: bool = False, branch: str | None = None, tag: str | None = None, message: str | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> PushResult:
    """Upload a verified bundle directory to ``repo`` (created if absent, ``private`` then), on ``branch``
    (default main; created from main if absent), and tag the commit with ``tag``.

    No new commit when every bundle file is already there with the same content and nothing else is (besides
    .gitattributes); files the bundle no longer has are deleted in the new commit. Tags are never moved: when
    ``tag`` exists, its commit must hold exactly this bundle (then the push is a no-op returning that commit),
    else HubError before anything is committed."""
    bundle_dir = Path(bundle_dir)
    check_repo_id(repo)
    manifest = verify_bundle(bundle_dir)
    names = sorted(manifest["files"]) + [MANIFEST]
    if is_offline():
        raise HubError(f"push to {repo}: HF_HUB_OFFLINE is set; pushing needs the network")
    hub = _Hub(endpoint, token, timeout)
    rev = branch or "main"
    repo_created = _prepare_repo(hub, repo, private, branch)
    if tag:
        # An existing tag must already hold exactly this bundle (re-pushing an old version is a no-op, even
        # after newer versions moved the branch on); checked before anything is committed.
        tagged = _tag_target(hub, repo, tag)
        if tagged is not None:
            if not _holds_bundle(bundle_dir, names, hub.snapshot(repo, tagged, files_metadata=True)[1]):
                raise HubError(f"tag {tag} on {repo} already points at commit {tagged[:12]}, which holds a different "
                               f"bundle. Tags are never moved; push to another repo, or delete the tag on the Hub "
                               f"first")
            return PushResult(repo=repo, commit=tagged, tag=tag, url=f"{hub.endpoint}/{repo}/tree/{tagged}",
                              created=False, repo_created=repo_created, branch=rev)

    title = message or f"stadapter: upload bundle{f' {tag}' if tag else ''}"
    def commit_step() -> tuple[str, bool]:
        return _commit_bundle(hub, repo, rev, bundle_dir, names, title)

    commit, created = hub.call(f"push to {repo}@{rev}", commit_step, repo=repo, revision=rev)
    if tag:
        _ensure_tag(hub, repo, tag, commit)
    return PushResult(repo=repo, commit=commit, tag=tag or None, url=f"{hub.endpoint}/{repo}/tree/{commit}",
                      created=created, repo_created=repo_created, branch=rev)


def _prepare_repo(hub: _Hub, repo: str, private: bool, branch: str | None) -> bool:
    """Create ``repo`` when absent (True if this call created it) and ``branch`` (from main) when absent."""
    api = hub.api

    def create() -> bool:
        try:
            api.create_repo(repo, private=private, exist_ok=False)
            return True
        except Exception as e:
            if _status(e) == 409:
                return False
            raise

    repo_created = hub.call(f"create {repo}", create, repo=repo)
    if branch and branch != "main":
        def make_branch() -> None:
            refs = api.list_repo_refs(repo)
            if branch not in {b.name for b in refs.branches}:
                api.create_branch(repo, branch=branch, exist_ok=True)

        hub.call(f"create branch {branch} in {repo}", make_branch, repo=repo, revision=branch)
    return repo_created


def _holds_bundle(bundle_dir: Path, names: list[str], remote: dict[str, Any]) -> bool:
    """Whether a remote tree holds exactly the bundle's files (besides .gitattributes), byte for byte."""
    stale = set(remote) - set(names) - IGNORED_REMOTE
    return not stale and all(_same_file(bundle_dir / n, remote.get(n)) for n in names)


def _commit_bundle(hub: _Hub, repo: str, rev: str, bundle_dir: Path, names: list[str], title: str) -> tuple[str, bool]:
    """One commit on ``rev`` that makes its tree the bundle: (commit, whether a new commit was made). Reads the
    remote state first, so a retry after an attempt that did commit sees it and makes no second commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    head, remote = hub.snapshot(repo, rev, files_metadata=True)
    if _holds_bundle(bundle_dir, names, remote):
        return head, False
    stale = sorted(set(remote) - set(names) - IGNORED_REMOTE)
    ops: list[Any] = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(bundle_dir / n)) for n in names]
    ops += [CommitOperationDelete(path_in_repo=n) for n in stale]
    info = hub.api.create_commit(repo, ops, commit_message=title, revision=rev, parent_commit=head,
                                 commit_description=f"Pushed by stadapter {__version__}.")
    return info.oid, info.oid != head


def _tag_target(hub: _Hub, repo: str, tag: str) -> str | None:
    refs = hub.call(f"read the tags of {repo}", lambda: hub.api.list_repo_refs(repo), repo=repo)
    return {t.name: t.target_commit for t in refs.tags}.get(tag)


def _ensure_tag(hub: _Hub, repo: str, tag: str, commit: str) -> None:
    def run() -> None:
        tags = {t.name: t.target_commit for t in hub.api.list_repo_refs(repo).tags}
        if tag in tags:
            if tags[tag] != commit:
                raise HubError(f"tag {tag} on {repo} was just created by someone else at commit {tags[tag][:12]}, "
                               f"not at the pushed commit {commit[:12]}. Tags are never moved")
            return
        try:
            hub.api.create_tag(repo, tag=tag, revision=commit, tag_message=f"stadapter {tag}")
        except Exception as e:  # a 409 is checked below; anything else goes to hub.call
            if _status(e) != 409:
                raise
            run()  # created concurrently (or by an earlier attempt): check where it points

    hub.call(f"tag {repo}@{commit[:12]} as {tag}", run, repo=repo, revision=commit)


# -- pull ------------------------------------------------------------------------------------------------

def _storage(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def _cached_commit(cache: Path, repo: str, revision: str) -> str:
    if SHA_RE.match(revision):
        return revision
    ref = _storage(cache, repo) / "refs" / revision
    if ref.is_file():
        sha = ref.read_text().strip()
        if SHA_RE.match(sha):
            return sha
    raise HubError(f"pull {repo}@{revision}: HF_HUB_OFFLINE is set and this revision was never pulled into the "
                   f"local cache {cache}; pull it once online, or unset HF_HUB_OFFLINE")


def _remember_ref(cache: Path, repo: str, revision: str, commit: str) -> None:
    """Record revision -> commit in the cache's refs (huggingface_hub's layout), for offline pulls."""
    if revision == commit or "/" in revision or revision.startswith("."):
        return
    ref = _storage(cache, repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    publish_file(ref, lambda out: out.write(commit.encode()))


def resolve_revision(repo: str, revision: str | None = None, *, endpoint: str | None = None,
                     token: str | None = None, cache_dir: str | Path | None = None,
                     timeout: float = DEFAULT_TIMEOUT) -> str:
    """The commit sha ``revision`` (tag, branch or sha; default main) of ``repo`` points at now; offline, the
    commit it pointed at when it was last pulled."""
    check_repo_id(repo)
    revision = revision or "main"
    if is_offline():
        return _cached_commit(Path(cache_dir) if cache_dir else default_cache_dir(), repo, revision)
    return _Hub(endpoint, token, timeout).commit_of(repo, revision)


def _forget(path: Path) -> None:
    """Drop a bad file from the cache (snapshot link and blob), so a later pull downloads it again."""
    try:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        if blob != path and blob.is_file():
            blob.unlink(missing_ok=True)
    except OSError:
        pass


def pull(repo: str, revision: str | None = None, *, endpoint: str | None = None, token: str | None = None,
         dest: str | Path | None = None, cache_dir: str | Path | None = None, commit: str | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> PullResult:
    """Download ``repo`` at ``revision`` (tag, branch or sha; default main) into ``dest`` (absent or empty;
    default ``$STADAPTER_HOME/hub/bundles/ORG--NAME/COMMIT``) and return it verified.

    The revision is resolved to one commit first and only that commit is read. Refused, naming the file, with
    ``dest`` left untouched: pickles, files not in the manifest, a manifest of another format version, a
    missing listed file, a file whose size or sha256 differs from the manifest, content that does not fit
    the file name, and whatever ``stadapter.bundle.check_bundle`` refuses (config, labels, tensors); refused
    content is removed from the Hub cache. With HF_HUB_OFFLINE=1 the revision and files come from the local
    cache only.

    commit: the sha ``revision`` was already resolved to (by :func:`resolve_revision`), to pin exactly that
    commit even if the revision moves in between."""
    check_repo_id(repo)
    revision = revision or "main"
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    offline = is_offline()
    hub = _Hub(endpoint, token, timeout)
    if commit is not None and not SHA_RE.match(commit):
        raise HubError(f"pull {repo}: commit must be a full 40-character sha, got {commit!r}")
    if offline:
        commit = commit or _cached_commit(cache, repo, revision)
        remote: set[str] | None = None
    else:
        resolved, siblings = hub.snapshot(repo, commit or revision)
        if commit is not None and resolved != commit:
            raise HubError(f"pull {repo}@{commit}: the Hub at {hub.endpoint} answered with commit {resolved}")
        commit, remote = resolved, set(siblings)
    where = f"{repo}@{revision}" + (f" (commit {commit[:12]})" if revision != commit else "")

    if remote is not None:
        _check_remote_names(where, remote)
    manifest_path = hub.download(repo, MANIFEST, commit, cache, offline)
    try:
        listed: dict[str, dict[str, Any]] = load_manifest(manifest_path.resolve(), where)["files"]
        check_file_names(set(listed), f"{where} {MANIFEST}")
    except BundleError:
        _forget(manifest_path)
        raise
    if remote is not None:
        _check_remote_names(where, remote, set(listed))

    dest = Path(dest) if dest is not None else cache.parent / "bundles" / repo.replace("/", "--") / commit
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if dest.is_dir() and _same_bundle(dest, manifest_path):
            return PullResult(repo, revision, commit, dest, listed, offline)
        raise BundleError(f"{dest} exists and is not an empty directory")

    downloaded = [manifest_path]

    def stage(staging: Path) -> None:
        for name, entry in sorted(listed.items()):
            downloaded.append(hub.download(repo, name, commit, cache, offline))
            _copy_verified(downloaded[-1], name, entry, staging, where)
        shutil.copyfile(manifest_path.resolve(), staging / MANIFEST)
        check_bundle(staging, where)  # the staged copy, checked completely, as the registry will see it

    try:
        publish_dir(dest, stage)
    except BundleError:
        for path in downloaded:  # refused content does not linger in the Hub cache
            _forget(path)
        raise
    if not offline:
        _remember_ref(cache, repo, revision, commit)
    return PullResult(repo, revision, commit, dest, listed, offline)


def _check_remote_names(where: str, remote: set[str], listed: set[str] | None = None) -> None:
    """Refuse a remote tree with pickles or no manifest; with the manifest's ``listed`` names, also one with
    files the manifest does not list or without a file it lists."""
    pickles = sorted(n for n in remote if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise BundleError(f"{where}: refusing pickle file(s) {', '.join(pickles)}")
    if MANIFEST not in remote:
        raise BundleError(f"{where} is not a stadapter bundle: it has no {MANIFEST}")
    if listed is None:
        return
    unlisted = sorted(remote - listed - {MANIFEST} - IGNORED_REMOTE)
    if unlisted:
        raise BundleError(f"{where}: refusing file(s) not in the manifest: {', '.join(unlisted)}")
    missing = sorted(listed - remote)
    if missing:
        raise BundleError(f"{where}: file(s) listed in the manifest are missing: {', '.join(missing)}")


def _same_bundle(directory: Path, manifest_path: Path) -> bool:
    try:
        if (directory / MANIFEST).read_bytes() != manifest_path.read_bytes():
            return False
        verify_bundle(directory)
        return True
    except (OSError, BundleError):
        return False


def _copy_verified(path: Path, name: str, entry: dict[str, Any], staging: Path, where: str) -> None:
    """Copy the downloaded file ``path`` into ``staging`` once its size, sha256 and content fit the manifest
    ``entry``; a file that does not is dropped from the cache, so a later pull downloads it again. ``path`` is
    the cache's snapshot link: the blob it points to (in the cache) is what is read."""
    blob = path.resolve()
    size = blob.stat().st_size
    if size != entry["size"] or sha256_file(blob) != entry["sha256"]:
        _forget(path)
        sizes = f"; {size} bytes, {entry['size']} expected" if size != entry["size"] else ""
        raise BundleError(f"{where}: {name} does not match its sha256 in the manifest (changed on the Hub or "
                          f"corrupt{sizes}); nothing was pulled")
    check_content(blob, name, where)
    shutil.copyfile(blob, staging / name)


def fetch_files(repo: str, commit: str, names: list[str], *, endpoint: str | None = None,
                token: str | None = None, cache_dir: str | Path | None = None,
                timeout: float = DEFAULT_TIMEOUT, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Download the files ``names`` of ``repo`` at exactly ``commit`` (a full sha) into the Hub cache, with the
    same transport, retries and errors as :func:`pull`, and return ``{name: cached file}`` (the cache's snapshot
    links) for those the commit holds; the others are left out. Nothing is verified here: the caller checks
    every file against the sha256 it expects (``stadapter.registry.remote`` against a registry row's), and must
    :func:`forget` one that does not match. With ``sizes``, a file the commit lists at another size is left
    out, never downloaded. With HF_HUB_OFFLINE=1 only the local cache is read."""
    check_repo_id(repo)
    if not SHA_RE.match(commit):
        raise HubError(f"fetch from {repo}: commit must be a full 40-character sha, got {commit!r}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    offline = is_offline()
    hub = _Hub(endpoint, token, timeout)
    listed = {} if offline else hub.snapshot(repo, commit, files_metadata=sizes is not None)[1]
    present = set(names) if offline else {n for n, s in listed.items()
                                          if sizes is None or n not in sizes or s.size in (None, sizes[n])}
    return {name: hub.download(repo, name, commit, cache, offline) for name in names if name in present}


def forget(path: Path) -> None:
    """Drop a cached Hub file that failed its check, so that a later fetch downloads it again."""
    _forget(path)


# -- registry versions -----------------------------------------------------------------------------------
# The registry imports nothing from here; it is imported lazily so that this module loads without SQLAlchemy.
if TYPE_CHECKING:
    from stadapter.registry import Registry, VersionInfo


@dataclass(frozen=True)
class VersionPush:
    """A registered version pushed: ``info`` (its Hub repo, commit and tag now recorded) and the Hub's answer."""

    info: VersionInfo
    result: PushResult


@dataclass(frozen=True)
class VersionPull:
    """A Hub revision in the registry: ``info`` is the version holding ``commit`` (what ``revision`` resolved
    to); ``registered`` is False when that commit was registered before and nothing was downloaded."""

    info: VersionInfo
    repo: str
    revision: str
    commit: str
    registered: bool


def push_version(registry: Registry, ref: str | VersionInfo, repo: str, *, endpoint: str | None = None,
                 token: str | None = None, private: bool = False, branch: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> VersionPush:
    """Upload a registered version (``ref``: TASK, TASK:VERSION or TASK@ALIAS) to ``repo`` with its model card,
    tagged ``v<VERSION>``, and record the repo, commit and tag in the registry.

    The files come from the registry's blob store (each checked against its sha256); the model card and the
    manifest are written for this version and repo. An unchanged bundle makes no new commit; an existing tag
    is never moved (see :func:`push`)."""
    from stadapter.bundle import CARD, Bundle, write_manifest
    from stadapter.model_card import render_card

    check_repo_id(repo)
    info = registry.resolve(ref) if isinstance(ref, str) else ref
    tag = f"v{info.version}"
    from stadapter.registry.leftovers import work_dir

    with work_dir(registry.home, "push") as tmp:  # under $STADAPTER_HOME, where `gc` finds a killed push's
        path = registry.materialize(info, dest=tmp / "bundle")
        bundle = Bundle.load(path, verify=False)  # materialize() checked every file's sha256
        bundle.task = info.task
        (path / CARD).write_text(render_card(bundle, repo=repo, version=info.version))
        write_manifest(path)
        result = push(path, repo, endpoint=endpoint, token=token, private=private, branch=branch, tag=tag,
                      message=f"stadapter: {info.task} {tag}", timeout=timeout)  # verifies the bundle first
    return VersionPush(registry.set_hub(info, repo, result.commit, result.tag), result)


def pull_version(registry: Registry, repo: str, revision: str | None = None, *, task: str | None = None,
                 endpoint: str | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> VersionPull:
    """Pull ``repo`` at ``revision`` (a tag such as v3, a branch, a commit sha; default main) pinned to one
    commit, verified, and register it as the next version of ``task`` (default: the bundle's own).

    ``repo`` may carry the revision: ``ORG/NAME@REVISION``. The version records its Hub source (repo, commit,
    revision, and the tag when the revision is one of ours, ``v<N>``) as lineage. A commit already registered
    (for ``task``, when given) is not downloaded again: its version comes back with ``registered`` False."""
    if task is not None:
        from stadapter.registry.api import check_name

        check_name(task, "task")  # before anything is downloaded
    if revision is None:
        repo, revision = parse_repo_ref(repo)
    revision = revision or "main"
    commit = resolve_revision(repo, revision, endpoint=endpoint, token=token, timeout=timeout)
    existing = registry.find_by_source(repo, commit, task)
    if existing is not None:
        return VersionPull(existing, repo, revision, commit, registered=False)
    from stadapter.registry.leftovers import work_dir

    with work_dir(registry.home, "pull") as tmp:  # under $STADAPTER_HOME, where `gc` finds a killed pull's
        result = pull(repo, revision, commit=commit, endpoint=endpoint, token=token, dest=tmp / "bundle",
                      timeout=timeout)
        source = {"kind": "hub", "repo": repo, "commit": result.commit, "revision": revision}
        if revision.startswith("v") and revision[1:].isdigit():
            source["tag"] = revision
        info = registry.register(result.path, task=task, source=source)
    return VersionPull(info, repo, revision, commit, registered=True)


__all__ = ["DEFAULT_ENDPOINT", "DEFAULT_TIMEOUT", "PullResult", "PushResult", "VersionPull", "VersionPush",
           "check_content", "check_repo_id", "default_cache_dir", "fetch_files", "forget", "is_offline",
           "parse_repo_ref", "pull",
           "pull_version", "push", "push_version", "resolve_endpoint", "resolve_revision", "resolve_token"]
