"""`stadapter push` and `stadapter pull`: move registry versions through the Hugging Face Hub."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from stadapter.cli.common import DbOpt, JsonOpt, console, user_errors

if TYPE_CHECKING:
    from stadapter.hub import VersionPull

EndpointOpt = Annotated[str | None, typer.Option(
    "--endpoint", show_default=False, help="Hub URL. Default: $HF_ENDPOINT, else https://huggingface.co.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", show_default=False,
    help="Hub token. Default: $HF_TOKEN (prefer it: a flag shows in the process list). Never printed.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per Hub request (and retry budget).")]


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
    publish: Annotated[bool, typer.Option(
        "--publish", help="Also copy the version's files to the shared store ($STADAPTER_STORE), for machines "
                          "that share the database but not the Hub.")] = False,
) -> None:
    """Upload a registered version to the Hub with its model card, tagged v<VERSION>.

    The repo, commit and tag are recorded in the registry. An unchanged bundle makes no new commit; an existing
    tag is never moved."""
    from stadapter.hub import check_repo_id, push_version
    from stadapter.registry import open_registry, parse_ref

    parse_ref(ref)
    check_repo_id(repo)  # both before the registry is opened
    if publish:
        from stadapter.errors import RegistryError
        from stadapter.registry.remote import ENV, shared_store

        if shared_store() is None:
            raise RegistryError(f"--publish needs a shared store: set {ENV} (file:///path, s3://bucket/prefix, "
                                f"gs://bucket/prefix)")
    with open_registry(db) as reg:
        pushed = push_version(reg, ref, repo, endpoint=endpoint, token=token, private=private, branch=branch,
                              timeout=timeout)
        if publish:
            from stadapter.registry.remote import publish_version

            publish_version(reg, pushed.info)
    info, result = pushed.info, pushed.result
    if as_json:
        typer.echo(json.dumps({"ref": info.ref, "repo": repo, "commit": result.commit, "tag": result.tag,
                               "branch": result.branch, "url": result.url, "created": result.created,
                               "repo_created": result.repo_created}))
        return
    what = "pushed" if result.created else "unchanged on the Hub:"
    console.print(f"{what} {info.ref} -> {repo}@{result.tag} (commit {result.commit[:12]}) {result.url}",
                  highlight=False, soft_wrap=True)


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
    from stadapter.hub import parse_repo_ref, pull_version
    from stadapter.registry import open_registry
    from stadapter.registry.api import check_name

    parse_repo_ref(target)
    if task is not None:
        check_name(task, "task")  # both before the registry is opened or anything is downloaded
    with open_registry(db) as reg:
        pulled = pull_version(reg, target, task=task, endpoint=endpoint, token=token, timeout=timeout)
    _report(pulled, as_json)


def _report(pulled: VersionPull, as_json: bool) -> None:
    ref, repo, revision, commit = pulled.info.ref, pulled.repo, pulled.revision, pulled.commit
    if as_json:
        typer.echo(json.dumps({"ref": ref, "repo": repo, "revision": revision, "commit": commit,
                               "registered": pulled.registered}))
    elif pulled.registered:
        console.print(f"pulled {repo}@{revision} (commit {commit[:12]}), verified, registered as {ref}",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"{repo}@{revision} (commit {commit[:12]}) is already registered as {ref}; "
                      "nothing to do", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `push` and `pull` to the `stadapter` app."""
    app.command("push")(push)
    app.command("pull")(pull)
