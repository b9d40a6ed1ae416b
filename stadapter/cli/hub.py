"""`stadapter push` and `stadapter pull`: move registry versions through the Hugging Face Hub."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from stadapter.cli.common import console, user_errors

DbOpt = Annotated[str | None, typer.Option(
    "--db", envvar="STADAPTER_DB", show_default=False,
    help="Registry database: an SQLAlchemy URL or an SQLite file. Default: SQLite at $STADAPTER_HOME/registry.db.")]
EndpointOpt = Annotated[str | None, typer.Option(
    "--endpoint", show_default=False, help="Hub URL. Default: $HF_ENDPOINT, else https://huggingface.co.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", show_default=False,
    help="Hub token. Default: $HF_TOKEN (prefer it: a flag shows in the process list). Never printed.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per Hub request (and retry budget).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a sentence.")]


@user_errors
def push(
    ref: Annotated[str, typer.Argument(help="TASK (production alias, else latest), TASK:VERSION or TASK@ALIAS.",
                                       show_default=False)],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository ORG/NAME (created if absent).",
                                      show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    branch: Annotated[str | None, typer.Option("--branch", help="Push to this branch (created from main).",
                                               show_default=False)] = None,
    endpoint: EndpointOpt = None,
    token: TokenOpt = None,
    db: DbOpt = None,
    timeout: TimeoutOpt = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Upload a registered version to the Hub with its model card, tagged v<VERSION>.

    The repo, commit and tag are recorded in the registry. An unchanged bundle makes no new commit; an existing
    tag is never moved."""
    from stadapter.bundle import CARD, Bundle, verify_bundle, write_manifest
    from stadapter.hub import check_repo_id
    from stadapter.hub import push as hub_push
    from stadapter.model_card import render_card
    from stadapter.registry import open_registry

    check_repo_id(repo)
    with open_registry(db) as reg:
        info = reg.resolve(ref)
        tag = f"v{info.version}"
        with tempfile.TemporaryDirectory(prefix="stadapter-push-") as tmp:
            path = reg.materialize(info, dest=Path(tmp) / "bundle")
            bundle = Bundle.load(path, verify=False)  # materialize() checked every file's sha256
            bundle.task = info.task
            (path / CARD).write_text(render_card(bundle, repo=repo, version=info.version))
            write_manifest(path)
            verify_bundle(path)
            result = hub_push(path, repo, endpoint=endpoint, token=token, private=private, branch=branch, tag=tag,
                              message=f"stadapter: {info.task} {tag}", timeout=timeout)
        reg.set_hub(info, repo, result.commit, result.tag)
    if as_json:
        typer.echo(json.dumps({"ref": info.ref, "repo": repo, "commit": result.commit, "tag": result.tag,
                               "branch": result.branch, "url": result.url, "created": result.created,
                               "repo_created": result.repo_created}))
        return
    what = "pushed" if result.created else "unchanged on the Hub:"
    console.print(f"{what} {info.ref} -> {repo}@{tag} (commit {result.commit[:12]}) {result.url}", highlight=False,
                  soft_wrap=True)


@user_errors
def pull(
    target: Annotated[str, typer.Argument(help="ORG/NAME or ORG/NAME@REVISION (a tag such as v3, a branch, a "
                                               "commit sha). Default revision: main.", show_default=False)],
    task: Annotated[str | None, typer.Option("--task", help="Register under this task name (default: the "
                                                            "bundle's own).", show_default=False)] = None,
    endpoint: EndpointOpt = None,
    token: TokenOpt = None,
    db: DbOpt = None,
    timeout: TimeoutOpt = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Download a bundle from the Hub pinned to one commit, verify it, and register it.

    Every file is checked against the bundle's manifest (sha256 and size); pickles and unlisted files are
    refused. The version records its Hub source (repo, commit, revision) as lineage; pulling a commit that is
    already registered is a no-op. With HF_HUB_OFFLINE=1, revisions pulled once before come from the cache."""
    from stadapter.hub import parse_repo_ref, resolve_revision
    from stadapter.hub import pull as hub_pull
    from stadapter.registry import open_registry

    repo, revision = parse_repo_ref(target)
    revision = revision or "main"
    with open_registry(db) as reg:
        commit = resolve_revision(repo, revision, endpoint=endpoint, token=token, timeout=timeout)
        existing = reg.find_by_source(repo, commit, task)
        if existing is not None:
            _report(as_json, existing, repo, revision, commit, new=False)
            return
        with tempfile.TemporaryDirectory(prefix="stadapter-pull-") as tmp:
            result = hub_pull(repo, revision, commit=commit, endpoint=endpoint, token=token,
                              dest=Path(tmp) / "bundle", timeout=timeout)
            source = {"kind": "hub", "repo": repo, "commit": result.commit, "revision": revision}
            if revision.startswith("v") and revision[1:].isdigit():
                source["tag"] = revision
            info = reg.register(result.path, task=task, source=source)
    _report(as_json, info, repo, revision, commit, new=True)


def _report(as_json: bool, info: Any, repo: str, revision: str, commit: str, new: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"ref": info.ref, "repo": repo, "revision": revision, "commit": commit,
                               "registered": new}))
    elif new:
        console.print(f"pulled {repo}@{revision} (commit {commit[:12]}), verified, registered as {info.ref}",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"{repo}@{revision} (commit {commit[:12]}) is already registered as {info.ref}; "
                      "nothing to do", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `push` and `pull` to the `stadapter` app."""
    app.command("push")(push)
    app.command("pull")(pull)
