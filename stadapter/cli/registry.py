"""Registry commands: `stadapter db ...`, `ls`, `show`, `alias ...`, `rm`, `export`, `import`, `gc`."""

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
       db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Tasks with their versions, aliases and latest metrics; or one task's versions."""
    _check_names(task=task)
    with _open(db) as reg:
        if task is None:
            tasks = reg.list_tasks()
            if as_json:
                typer.echo(json.dumps({"tasks": [t.to_dict() for t in tasks]}))
                return
            table = Table(title=f"tasks in {reg.url.split('://')[0]} registry")
            for col in ("task", "versions", "latest", "aliases", "latest metrics", "recipe"):
                table.add_column(col)
            for t in tasks:
                table.add_row(t.name, str(t.versions), str(t.latest or "-"),
                              ", ".join(f"{a}->{v}" for a, v in t.aliases.items()) or "-",
                              _metrics(t.latest_metrics), t.recipe or "-")
            console.print(table if tasks else "no tasks registered yet", highlight=False)
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
    table.add_row("source", json.dumps(info.source, sort_keys=True) if info.source else "-")
    table.add_row("parent", info.parent or "-")
    table.add_row("data", info.data or "-")
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
def export(ref: RefArg, directory: Annotated[Path, typer.Argument(help="Destination (absent or empty).",
                                                                  show_default=False)],
           db: DbOpt = None) -> None:
    """Write a version's bundle directory (every file checked against its sha256)."""
    _check_names(ref=ref)
    with _open(db) as reg:
        info = reg.resolve(ref)
        reg.materialize(info, directory)
    console.print(f"exported {info.ref} to {directory}", highlight=False)


@user_errors
def import_(directory: Annotated[Path, typer.Argument(help="A bundle directory.", show_default=False)],
            task: Annotated[str | None, typer.Option("--task", help="Register under this task name "
                                                     "(default: the one in its config.json).")] = None,
            db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Register a bundle directory as the next version of its task."""
    _check_names(task=task)
    with _open(db) as reg:
        info = reg.register(directory, task=task, source={"kind": "import", "path": str(directory.resolve())})
    if as_json:
        typer.echo(json.dumps(info.to_dict()))
    else:
        console.print(f"registered {info.ref}", highlight=False)


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
