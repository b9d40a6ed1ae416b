"""Registry commands: `stadapter db ...`, `ls`, `show`, `alias ...`, `rm`, `export`, `import`, `gc`, `publish`."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from stadapter.cli.common import DbOpt, JsonOpt, console, user_errors
from stadapter.errors import RegistryError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from stadapter.registry.api import Registry
    from stadapter.registry.db import Target

RefArg = Annotated[str, typer.Argument(help="TASK (production alias, else latest), TASK:VERSION or TASK@ALIAS.",
                                       show_default=False)]

db_app = typer.Typer(help="The registry database's schema: upgrade, current, history.", no_args_is_help=True)
alias_app = typer.Typer(help="Name versions of a task: production, staging, anything.", no_args_is_help=True)


def _open(db: str | None) -> Registry:
    from stadapter.registry import open_registry

    return open_registry(db)


def _check_names(*, ref: str | None = None, task: str | None = None, alias: str | None = None) -> None:
    """Refuse a malformed reference, task or alias name (the registry's rule) before any work is done."""
    from stadapter.registry.api import check_name, parse_ref

    if ref is not None:
        parse_ref(ref)
    if task is not None:
        check_name(task, "task")
    if alias is not None:
        check_name(alias, "alias")


# -- db -------------------------------------------------------------------------------------------------

def _engine(db: str | None) -> tuple[ModuleType, Target, Engine]:
    from stadapter.registry import db as dbm

    target = dbm.resolve_target(db)
    return dbm, target, dbm.make_engine(target.url)


@db_app.command("upgrade")
@user_errors
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head", db: DbOpt = None) -> None:
    """Create the registry's tables, or migrate them to the newest schema."""
    dbm, target, engine = _engine(db)
    try:
        before = dbm.current_revision(engine)
        dbm.upgrade(engine, revision)
        after = dbm.current_revision(engine)
    finally:
        engine.dispose()
    where = dbm.redact(target.url)
    if before == after:
        console.print(f"{where}: already at revision {after}", highlight=False)
    else:
        console.print(f"{where}: upgraded from {before or 'an empty database'} to {after}", highlight=False)


@db_app.command("downgrade")
@user_errors
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision ('base' drops every table).")],
                 db: DbOpt = None) -> None:
    """Migrate the schema back to an older revision (data in dropped tables is lost)."""
    dbm, target, engine = _engine(db)
    try:
        dbm.downgrade(engine, revision)
        after = dbm.current_revision(engine)
    finally:
        engine.dispose()
    console.print(f"{dbm.redact(target.url)}: now at revision {after or 'base (no tables)'}", highlight=False)


@db_app.command("current")
@user_errors
def db_current(db: DbOpt = None) -> None:
    """The database's schema revision, and whether it is the newest this stadapter knows."""
    dbm, target, engine = _engine(db)
    try:
        current = dbm.current_revision(engine)
    finally:
        engine.dispose()
    head = dbm.head_revision()
    where = dbm.redact(target.url)
    if current == head:
        state = "up to date"
    elif current is None:
        state = "no registry tables yet: run `stadapter db upgrade`" + (
            " (the default database does this on first use)" if target.is_default else "")
    else:
        state = f"behind {head}: run `stadapter db upgrade`"
    console.print(f"{where}: revision {current or '-'} (head {head}), {state}", highlight=False)


@db_app.command("history")
@user_errors
def db_history() -> None:
    """Every schema migration shipped with this stadapter, oldest first."""
    from stadapter.registry import db as dbm

    head = dbm.head_revision()
    table = Table(title="registry migrations")
    for col in ("revision", "down", "description"):
        table.add_column(col)
    for rev, down, doc in dbm.history():
        table.add_row(rev + (" (head)" if rev == head else ""), down or "-", doc.splitlines()[0] if doc else "")
    console.print(table)


# -- listing ----------------------------------------------------------------------------------------------

def _metrics(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in ("top1", "top5") if k in flat] or sorted(flat)[:3]
    return ", ".join(f"{k} {flat[k]:.4g}" for k in keys) or "-"


@user_errors
def ls(task: Annotated[str | None, typer.Argument(help="List this task's versions.", show_default=False)] = None,
       limit: Annotated[int, typer.Option("--limit", help="Tasks per page (the registry refuses a page over "
                                                                "its maximum, with the range).")] = 100,
       after: Annotated[str | None, typer.Option(
           "--after", show_default=False, help="Start after this task name (the previous page's last; --json "
                                               "prints it as next_after).")] = None,
       prefix: Annotated[str | None, typer.Option("--prefix", show_default=False,
                                                  help="Only tasks whose names start with this.")] = None,
       alias: Annotated[str | None, typer.Option("--alias", show_default=False,
                                                 help="Only tasks with this alias (e.g. production).")] = None,
       tag: Annotated[str | None, typer.Option("--tag", show_default=False,
                                               help="Only tasks with a version tagged KEY or KEY=VALUE.")] = None,
       db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Tasks by name with their versions, aliases and latest metrics, a page at a time (one database query
    whatever the number of tasks); or one task's versions."""
    _check_names(task=task)
    with _open(db) as reg:
        if task is None:
            page = reg.list_page(limit, after, prefix, alias, tag)
            tasks = page.tasks
            if as_json:
                typer.echo(json.dumps({"tasks": [t.to_dict() for t in tasks], "next_after": page.next_after}))
                return
            table = Table(title=f"tasks in {reg.url.split('://')[0]} registry")
            for col in ("task", "versions", "latest", "aliases", "latest metrics", "recipe"):
                table.add_column(col)
            for t in tasks:
                table.add_row(t.name, str(t.versions), str(t.latest or "-"),
                              ", ".join(f"{a}->{v}" for a, v in t.aliases.items()) or "-",
                              _metrics(t.latest_metrics), t.recipe or "-")
            filtered = after or prefix or alias or tag
            console.print(table if tasks else ("no tasks match" if filtered else "no tasks registered yet"),
                          highlight=False)
            if page.next_after is not None:
                same = "".join(f" --{k} {v}" for k, v in (("prefix", prefix), ("alias", alias), ("tag", tag)) if v)
                more = f"stadapter ls --after {page.next_after}" + (f" --limit {limit}" if limit != 100 else "") + same
                console.print(f"more tasks follow: {more}", highlight=False, markup=False)
            return
        versions = reg.list_versions(task)
    if as_json:
        typer.echo(json.dumps({"task": task, "versions": [v.to_dict() for v in versions]}))
        return
    table = Table(title=f"versions of {task}")
    for col in ("version", "aliases", "backbone", "metrics", "source", "hub", "created"):
        table.add_column(col)
    for v in versions:
        table.add_row(str(v.version), ", ".join(v.aliases) or "-", f"{v.backbone_spec} {v.backbone_fingerprint[:12]}",
                      _metrics(v.metrics), (v.source or {}).get("kind", "-"),
                      f"{v.hub_repo}@{(v.hub_commit or '')[:8]}" if v.hub_repo else "-",
                      v.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


def _place(path: str) -> str:
    """A recorded path, labelled when it is relative (to the folder the recording command ran in)."""
    return path if Path(path).is_absolute() else f"{path} (relative to the folder the command ran in)"


def _source(source: dict[str, Any] | None) -> str:
    """``kind``, then its other fields; the local paths a training run or an import recorded via _place."""
    if not source:
        return "-"
    rest = [f"{k} {_place(str(v)) if k in ('run', 'path') else v}" for k, v in sorted(source.items()) if k != "kind"]
    return ", ".join([str(source.get("kind", "?")), *rest])


@user_errors
def show(ref: RefArg, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """One version: backbone, labels, metrics, files, lineage, Hub location."""
    _check_names(ref=ref)
    with _open(db) as reg:
        info = reg.resolve(ref)
    if as_json:
        typer.echo(json.dumps(info.to_dict()))
        return
    table = Table(title=info.ref, show_header=False)
    adapter = info.config.get("adapter", {})
    table.add_row("aliases", ", ".join(info.aliases) or "-")
    table.add_row("backbone", f"{info.backbone_spec} (weights {info.backbone_weights}, fingerprint "
                              f"{info.backbone_fingerprint})")
    table.add_row("adapter", ", ".join(f"{k}={adapter[k]}" for k in ("method", "width", "kernel", "positions")
                                       if k in adapter))
    table.add_row("labels", f"{len(info.labels)}: " + ", ".join(info.labels[:10]) + (" ..." if len(info.labels) > 10
                                                                                    else ""))
    table.add_row("metrics", json.dumps(info.metrics, sort_keys=True) if info.metrics else "-")
    table.add_row("files", "\n".join(f"{n}  {e['size']:,} B  {e['sha256'][:16]}"
                                     for n, e in sorted(info.files.items())))
    table.add_row("source", _source(info.source))
    table.add_row("parent", info.parent or "-")
    table.add_row("data", _place(info.data) if info.data else "-")
    table.add_row("hub", f"{info.hub_repo} @ {info.hub_commit}" + (f" (tag {info.hub_tag})" if info.hub_tag else "")
                  if info.hub_repo else "-")
    table.add_row("tags", ", ".join(f"{k}={v}" for k, v in info.tags.items()) or "-")
    table.add_row("status", info.status)
    table.add_row("created", info.created_at.isoformat(timespec="seconds"))
    console.print(table, highlight=False)


# -- changing ---------------------------------------------------------------------------------------------

@alias_app.command("set")
@user_errors
def alias_set(task: Annotated[str, typer.Argument(show_default=False)],
              name: Annotated[str, typer.Argument(help="production, staging, ...", show_default=False)],
              version: Annotated[int, typer.Argument(help="The version number.", show_default=False)],
              db: DbOpt = None) -> None:
    """Point TASK@NAME at VERSION."""
    _check_names(task=task, alias=name)
    with _open(db) as reg:
        info = reg.set_alias(task, name, version)
    console.print(f"{task}@{name} -> {info.ref}", highlight=False)


@alias_app.command("rm")
@user_errors
def alias_rm(task: Annotated[str, typer.Argument(show_default=False)],
             name: Annotated[str, typer.Argument(show_default=False)], db: DbOpt = None) -> None:
    """Remove the alias TASK@NAME (the version stays)."""
    _check_names(task=task, alias=name)
    with _open(db) as reg:
        reg.remove_alias(task, name)
    console.print(f"removed {task}@{name}", highlight=False)


@user_errors
def rm(ref: Annotated[str, typer.Argument(help="TASK:VERSION", show_default=False)],
       force: Annotated[bool, typer.Option("--force", help="Also remove the aliases that point at it.")] = False,
       db: DbOpt = None) -> None:
    """Remove a version (refused while an alias points at it, unless --force). `stadapter gc` frees its files."""
    from stadapter.registry import parse_ref

    task, number, _ = parse_ref(ref)
    if number is None or number < 1:
        raise RegistryError(f"name the version to remove: {task}:VERSION (got {ref!r})")
    with _open(db) as reg:
        info = reg.resolve(ref)
        reg.remove_version(info, force=force)
    console.print(f"removed {info.ref}" + (f" and alias(es) {', '.join(info.aliases)}" if info.aliases else "")
                  + "; `stadapter gc` frees its files", highlight=False)


@user_errors
def export(ref: RefArg, path: Annotated[Path, typer.Argument(
               help="Destination: a directory (absent or empty) for --format bundle, a file for onnx or "
                    "torchscript (its sidecar is written beside it as PATH.json).", show_default=False)],
           fmt: Annotated[str, typer.Option(
               "--format", "-f", help="bundle: the version's bundle directory. onnx / torchscript: one "
                                      "self-contained model (backbone + this task's adapters + head): normalised "
                                      "clips (B, 3, T, H, W) in, logits out, checked against the eager model.")]
           = "bundle",
           weights: Annotated[str | None, typer.Option(
               "--weights", "-w", help="onnx / torchscript: backbone weights to build it from (default: the "
                                       "bundle's; must give the same fingerprint).", show_default=False)] = None,
           db: DbOpt = None) -> None:
    """Write a version's bundle directory (every file checked against its sha256), or the task as an ONNX or
    TorchScript model with a JSON sidecar (labels, frames, sampling, views, mean/std, fingerprint)."""
    _check_names(ref=ref)
    if fmt != "bundle":
        from stadapter.errors import InputError
        from stadapter.export import FORMATS, export_ref

        if fmt not in FORMATS:
            raise InputError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
        with _open(db) as reg:
            result = export_ref(ref, path, fmt, registry=reg, weights=weights)
        console.print(f"exported {ref} as {fmt} to {result.path} (sidecar {result.sidecar.name}; max logit "
                      f"difference to the eager model {result.max_abs_diff:.1e}; export {result.seconds:.1f} s, check "
                      f"{result.check_seconds:.1f} s)",
                      highlight=False, soft_wrap=True)
        return
    with _open(db) as reg:
        info = reg.resolve(ref)
        reg.materialize(info, path)
    console.print(f"exported {info.ref} to {path}", highlight=False)


@user_errors
def import_(directory: Annotated[Path, typer.Argument(help="A bundle directory.", show_default=False)],
            task: Annotated[str | None, typer.Option("--task", help="Register under this task name "
                                                     "(default: the one in its config.json).")] = None,
            db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Register a bundle directory (as `stadapter export` or `train` writes it) as the next version of its
    task."""
    _check_names(task=task)
    if directory.is_file():
        raise RegistryError(f"{directory} is a file; `stadapter import` takes a bundle directory (manifest.json, "
                            f"config.json, labels.json, adapter.safetensors, as `stadapter export` writes it)"
                            + OFFICIAL_HINT)
    with _open(db) as reg:
        info = reg.register(directory, task=task, source={"kind": "import", "path": str(directory.resolve())})
    if as_json:
        typer.echo(json.dumps(info.to_dict()))
    else:
        console.print(f"registered {info.ref}", highlight=False)


OFFICIAL_HINT = "; for a checkpoint file of the official ST-Adapter code (.pth) use `stadapter import-official`"


@user_errors
def gc(db: DbOpt = None,
       stale_after: Annotated[float | None, typer.Option(
           "--stale-after", min=0, show_default=False,
           help="Seconds a killed pull's or push's temporary folder must have been untouched before it is "
                "removed. Default: one hour.")] = None) -> None:
    """Delete blobs that no version references, leftovers of interrupted registrations, and the temporary
    folders of killed pulls and pushes."""
    with _open(db) as reg:
        removed, freed = reg.gc(stale_after, on_leftover=lambda x: console.print(
            f"removed stale {x.path} ({x.size:,} bytes)", highlight=False, soft_wrap=True))
    console.print(f"removed {removed} file(s), freed {freed:,} bytes", highlight=False)


@user_errors
def publish(ref: RefArg, db: DbOpt = None,
            store: Annotated[str | None, typer.Option(
                "--store", show_default=False,
                help="The shared store: file:///path, s3://bucket/prefix or gs://bucket/prefix. Default: "
                     "$STADAPTER_STORE.")] = None) -> None:
    """Copy a version's files to the shared store, so that every machine sharing the database can load it.
    With STADAPTER_STORE set, versions registered from then on are published as they are registered."""
    from stadapter.registry.remote import publish_version, shared_store

    _check_names(ref=ref)
    with _open(db) as reg:
        shared = shared_store(store)
        info = reg.resolve(ref)
        n = publish_version(reg, info, shared)
    console.print(f"published {info.ref}: {n} new file(s) in {shared.url if shared else '?'}", highlight=False,
                  soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the registry commands to the `stadapter` app."""
    app.add_typer(db_app, name="db")
    app.add_typer(alias_app, name="alias")
    app.command("ls")(ls)
    app.command("show")(show)
    app.command("rm")(rm)
    app.command("export")(export)
    app.command("import")(import_)
    app.command("gc")(gc)
    app.command("publish")(publish)
