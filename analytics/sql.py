"""DuckDB over the exported Parquet: views for runs, steps, events, LLM calls, tool calls,
decisions and costs.

    con = analytics.connect(".polos/exports")
    con.sql("select workflow, count(*) from runs group by all").show()

The views are defined once, in ``views.sql`` beside this module (the duckdb CLI reads the same
file; ``views_sql(directory)`` fills its paths in). Views read the Parquet files through a glob, so files exported later appear in the next
query. Only a table that had no file at all when the connection was opened needs
``refresh(con, directory)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from .export import HISTORY_SCHEMA, MESSAGE_SCHEMA

_RAW = {
    "history": HISTORY_SCHEMA,
    "external_events": MESSAGE_SCHEMA,
    "dead_letters": MESSAGE_SCHEMA,
    "commands": MESSAGE_SCHEMA,
}

# The view definitions live in views.sql (package data), the one copy the duckdb CLI reads too.
VIEWS_FILE = Path(__file__).resolve().with_name("views.sql")
VIEWS = VIEWS_FILE.read_text()

VIEW_NAMES = (
    "runs",
    "run_tree",
    "run_ancestors",
    "steps",
    "events",
    "llm_calls",
    "tool_calls",
    "decisions",
    "costs",
    "external_events",
    "dead_letters",
    "commands",
)


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# Parquet column types as DuckDB reads them, for the empty stand-in of a table with no file.
_DUCKDB_TYPES = {
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}

# `getvariable('polos_export_dir') || '/<table>/*.parquet'` in views.sql.
_GLOB_RE = re.compile(r"getvariable\('polos_export_dir'\) \|\| '/(\w+)/\*\.parquet'")
_RAW_RE = re.compile(
    r"^CREATE OR REPLACE VIEW raw_(\w+) AS\n(SELECT \* FROM read_parquet\(.*?\));$", re.M | re.S
)


def _empty_select(schema: pa.Schema) -> str:
    """A query with the table's columns and no row, for a table nothing was exported to yet."""
    cols = ", ".join(f"CAST(NULL AS {_DUCKDB_TYPES[f.type]}) AS {f.name}" for f in schema)
    return f"SELECT {cols} WHERE false"


def has_files(directory: str | os.PathLike[str], table: str) -> bool:
    """Whether the glob of ``table`` in views.sql matches a file (else DuckDB refuses it)."""
    folder = Path(directory) / table
    return folder.is_dir() and next(folder.glob("*.parquet"), None) is not None


def views_sql(directory: str | os.PathLike[str]) -> str:
    """views.sql for the export in ``directory``: its paths filled in (absolute), and an empty
    table with the right columns standing in for a table that has no file yet.

    This is what ``connect`` runs and what ``polos sql --print-views`` prints."""
    root = Path(directory).resolve()

    def raw(m: re.Match[str]) -> str:
        table = m.group(1)
        if table not in _RAW:
            raise ValueError(f"views.sql defines raw_{table}, which the export does not write")
        if not has_files(root, table):
            return f"CREATE OR REPLACE VIEW raw_{table} AS\n{_empty_select(_RAW[table])};"
        body = _GLOB_RE.sub(lambda g: _sql_str(f"{root / g.group(1)}/*.parquet"), m.group(2))
        return f"CREATE OR REPLACE VIEW raw_{table} AS\n{body};"

    text, defined = _RAW_RE.subn(raw, VIEWS)
    if defined != len(_RAW) or "getvariable(" in text:
        raise ValueError(f"{VIEWS_FILE} must define raw_{', raw_'.join(_RAW)} in its own form")
    return text


def refresh(con: duckdb.DuckDBPyConnection, directory: str | os.PathLike[str]) -> None:
    """(Re)define the raw tables over the Parquet files now under ``directory``, and the views."""
    con.execute(views_sql(directory))


def connect(
    directory: str | os.PathLike[str], database: str = ":memory:"
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the Polos views over the export in ``directory``."""
    con = duckdb.connect(database)
    con.execute("SET TimeZone = 'UTC'")
    refresh(con, directory)
    return con


__all__ = ["VIEWS", "VIEWS_FILE", "VIEW_NAMES", "connect", "has_files", "refresh", "views_sql"]
