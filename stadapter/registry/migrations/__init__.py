"""Alembic migrations of the registry schema (a package so that wheels ship them)."""
