"""The registry: every task's adapter bundles as numbered versions, in a SQL database (SQLite by default,
PostgreSQL for teams) plus a content-addressed blob store, with aliases, tags, lineage and Hub locations.

    from stadapter.registry import open_registry
    reg = open_registry()            # $STADAPTER_DB, else SQLite at $STADAPTER_HOME/registry.db
    info = reg.register(bundle_dir)  # verified, published, numbered
    bundle = reg.load_bundle("ssv2@production")
"""

from stadapter.registry.api import Registry, TaskInfo, VersionInfo, open_registry, opened, parse_ref
from stadapter.registry.db import default_home

__all__ = ["Registry", "TaskInfo", "VersionInfo", "default_home", "open_registry", "opened", "parse_ref"]
