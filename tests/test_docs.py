"""docs/architecture.md against the code: its tables of streams and subjects, KV buckets,
events and dead-letter sources say exactly what the code defines, and its paths and code map
match the tree, so the document cannot drift.

The code side is collected in one place below (``code_*``), from the code's own definitions:
the one catalogue of names (``store.names.Names``), the one topology table
(``store.topology.TOPOLOGY`` and ``CORE_SUBJECTS``) and what it creates on a real server,
``events``' registry and ``store.DLQ_SOURCES``.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from polos import history as ev
from polos._private.ops import auth
from polos._private.store import DLQ_SOURCES, Names, dead_letter, ensure_topology
from polos._private.store.topology import CORE_SUBJECTS, TOPOLOGY
from polos.config import Settings

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Code names are rendered with these words (valid tokens), then read back as the document's
# placeholders: ``<p>`` / ``<P>`` for the prefix, ``*`` for any one token.
PREFIX = "zpfx"
_PLACEHOLDER = re.compile(r"^zph\d+$")


# --------------------------------------------------------------------------- the document


def _section(title: str) -> str:
    text = ARCHITECTURE.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/architecture.md has no section '## {title}'"
    return m.group(1)


def _table(title: str) -> list[list[str]]:
    """The rows (cells) of the first table in a section, without its header."""
    lines = [ln for ln in _section(title).splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert len(rows) > 2, f"section '{title}' has no table"
    return rows[2:]


def _ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _doc_subject(subject: str) -> str:
    """A documented subject's shape: ``<p>`` stays, any other ``<...>`` is one token."""
    return ".".join(
        t if t == "<p>" else "*" if t.startswith("<") and t.endswith(">") else t
        for t in subject.split(".")
    )


def doc_streams() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in _table("Streams and subjects"):
        [stream] = _ticks(row[0])
        assert stream not in out, f"stream {stream} documented twice"
        out[stream] = {_doc_subject(s) for s in _ticks(row[1]) if s.startswith("<p>.")}
    return out


def doc_core_subjects() -> set[str]:
    para = next(
        p
        for p in _section("Streams and subjects").split("\n\n")
        if p.startswith("Core NATS subjects")
    )
    return {_doc_subject(s) for s in _ticks(para) if s.startswith("<p>.")}


def doc_buckets() -> set[str]:
    out = set()
    for row in _table("KV buckets"):
        [bucket] = _ticks(row[0])
        out.add(f"object store {bucket}" if row[0].startswith("object store") else bucket)
    return out


def doc_events() -> dict[str, str]:
    """Event name -> documented subject kind."""
    out = {}
    for row in _table("Events"):
        for name in _ticks(row[0]):
            out[name] = row[1]
    return out


def doc_dlq_sources() -> set[str]:
    return {s for row in _table("Dead letters") for s in _ticks(row[0])}


# --------------------------------------------------------------------------- the code


def _names() -> Names:
    return Names(PREFIX)


def _module_functions(module: Any, suffix: str) -> list[Callable[..., Any]]:
    return [
        f
        for name, f in vars(module).items()
        if name.endswith(suffix) and inspect.isfunction(f) and f.__module__ == module.__name__
    ]


def _as_doc(name: str) -> str:
    tokens = []
    for t in name.split("."):
        if t == PREFIX:
            t = "<p>"
        elif _PLACEHOLDER.match(t):
            t = "*"
        tokens.append(t)
    return ".".join(tokens).replace(PREFIX.upper() + "_", "<P>_").replace(PREFIX + "_", "<p>_")


def _render(fn: Callable[..., Any], first: Any) -> list[str]:
    """``fn(first, <one placeholder per other parameter>)``; a ``kind`` parameter is each
    history kind (the runs stream stores only those)."""
    params = list(inspect.signature(fn).parameters)[1:]
    calls: list[list[Any]] = [[]]
    for i, p in enumerate(params):
        values = list(ev.HISTORY_KINDS) if p == "kind" else [f"zph{i}"]
        calls = [[*c, v] for c in calls for v in values]
    return [fn(first, *c) for c in calls]


def code_subjects() -> set[str]:
    """Every subject the code builds, rendered with placeholder tokens."""
    n = _names()
    out: list[str] = list(n.runs_subjects)
    for attr in dir(Names):
        if attr.endswith("_subject"):
            out += _render(getattr(Names, attr), n)
    return set(out)


def code_streams() -> set[str]:
    """The namespace's own streams (not the streams behind its KV buckets)."""
    n = _names()
    found = {getattr(n, a) for a in dir(Names) if a.endswith("_stream")}
    tables = {row.stream(n) for row in TOPOLOGY if row.kind == "stream"}
    assert found == tables, f"Names and the topology table disagree: {found ^ tables}"
    return found


def _backing_streams() -> set[str]:
    """The JetStream streams behind the KV buckets and object stores."""
    n = _names()
    return {row.stream(n) for row in TOPOLOGY if row.kind != "stream"}


def code_buckets() -> set[str]:
    n = _names()
    return {
        row.bucket(n) if row.kind == "kv" else f"object store {row.bucket(n)}"
        for row in TOPOLOGY
        if row.kind != "stream"
    }


def code_events() -> dict[str, str]:
    return {name: cls.KIND for name, cls in ev._REGISTRY.items()}


def _subject_matches(subject: str, pattern: str) -> bool:
    s, p = subject.split("."), pattern.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(s) == len(p)


@pytest.fixture
async def server_filters(plain_nats_server: Any) -> dict[str, list[str]]:
    """Each stream's subject filters as the code creates them on a real server (one without
    authentication: the document's placeholder namespace has no users; the roles' own checks
    are tests/test_roles.py)."""
    settings = Settings(nats_url=plain_nats_server.url, prefix=PREFIX)
    nc = await nats.connect(plain_nats_server.url)
    try:
        js = nc.jetstream()
        names = _names()
        await ensure_topology(js, names, settings)
        # Every stream storing a subject of the namespace (the server may hold many others).
        reply = await nc.request(
            "$JS.API.STREAM.NAMES", orjson.dumps({"subject": f"{PREFIX}.>"}), timeout=5
        )
        out = {}
        for name in orjson.loads(reply.data).get("streams") or []:
            info = await js.stream_info(name)
            out[_as_doc(name)] = list(info.config.subjects or [])
        return out
    finally:
        await nc.close()


def _diff(what: str, doc: set[str], code: set[str]) -> str:
    return (
        f"{what}: in docs/architecture.md but not in the code: {sorted(doc - code)}; "
        f"in the code but not in the document: {sorted(code - doc)}"
    )


# --------------------------------------------------------------------------- the checks


async def test_streams_table_lists_every_stream_and_its_subjects(
    server_filters: dict[str, list[str]],
) -> None:
    documented = doc_streams()
    streams = {_as_doc(s) for s in code_streams()}
    assert set(documented) == streams, _diff("streams", set(documented), streams)
    # What the code creates on a server is what it names, and what auth grants.
    assert set(server_filters) == streams, _diff("created streams", set(server_filters), streams)
    # Every role's grants name exactly the catalogued streams (they are generated from it).
    granted = {_as_doc(st) for st in auth.namespace_streams(PREFIX)}
    catalogued = streams | {_as_doc(b) for b in _backing_streams()}
    assert granted == catalogued, _diff("auth.namespace_streams", granted, catalogued)
    subjects = {_as_doc(s): s for s in code_subjects()}
    unstored = set(subjects)
    for stream, doc_subjects in documented.items():
        stored = {
            shape
            for shape, subject in subjects.items()
            if any(_subject_matches(subject, f) for f in server_filters[stream])
        }
        unstored -= stored
        assert doc_subjects == stored, _diff(f"subjects of {stream}", doc_subjects, stored)
    core = doc_core_subjects()
    assert core == unstored, _diff("core NATS subjects (in no stream)", core, unstored)
    # ... and each is declared (with who may use it) in the topology table's core subjects.
    filters = [c.subject(_names()) for c in CORE_SUBJECTS]
    undeclared = {
        shape
        for shape in unstored
        if not any(_subject_matches(subjects[shape], f) for f in filters)
    }
    assert not undeclared, f"core NATS subjects missing from topology.CORE_SUBJECTS: {undeclared}"


def test_buckets_table_lists_every_bucket() -> None:
    documented = doc_buckets()
    buckets = {_as_doc(b) for b in code_buckets()}
    assert documented == buckets, _diff("buckets", documented, buckets)


def test_events_table_lists_every_event_with_its_subject_kind() -> None:
    documented, events = doc_events(), code_events()
    assert set(documented) == set(events), _diff("events", set(documented), set(events))
    wrong = {n: (documented[n], k) for n, k in events.items() if documented[n] != k}
    assert not wrong, f"subject kind (documented, code): {wrong}"


def _dead_letter_calls() -> Iterator[tuple[str, int, ast.expr | None]]:
    for top in ("polos", "services", "analytics", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if name != "dead_letter":
                    continue
                source = next((k.value for k in node.keywords if k.arg == "source"), None)
                yield f"{path.relative_to(ROOT)}:{node.lineno}", node.lineno, source


def test_dead_letter_sources_table_is_the_code_s_closed_list() -> None:
    documented = doc_dlq_sources()
    assert documented == set(DLQ_SOURCES), _diff(
        "dead-letter sources", documented, set(DLQ_SOURCES)
    )
    used = set()
    for where, _, source in _dead_letter_calls():
        assert isinstance(source, ast.Constant) and source.value in DLQ_SOURCES, (
            f"{where}: dead_letter(source=...) must be one of store.DLQ_SOURCES"
        )
        used.add(source.value)
    # Every listed source is written somewhere: the list is not a wish list.
    assert used == set(DLQ_SOURCES), _diff(
        "sources used by dead_letter calls", set(DLQ_SOURCES), used
    )


async def test_dead_letter_refuses_a_source_not_in_the_list(plain_nats_server: Any) -> None:
    # Refused before anything is sent: no namespace, user or stream is needed.
    nc = await nats.connect(plain_nats_server.url)
    try:
        with pytest.raises(ValueError, match="not one of cmd, ctl"):
            await dead_letter(
                nc.jetstream(),
                _names(),
                source="oops",  # type: ignore[arg-type]
                reason="x",
                subject="x",
                data=b"",
            )
    finally:
        await nc.close()


# --------------------------------------------------------------------------- the code map


def _doc_paths() -> tuple[set[str], list[tuple[list[str], list[str]]]]:
    """The repository paths the document names (``polos/_private/store/``, ``polos/worker.py``),
    and per table row its directories and the bare file names it names in them."""
    text = ARCHITECTURE.read_text()
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    paths = {p for p in re.findall(r"`([\w.-]+(?:/[\w.-]*)+)`", text) if p.split("/", 1)[0] in tops}
    rows = [
        (re.findall(r"`([\w./-]+/)`", line), re.findall(r"`(\w+\.(?:py|sql))`", line))
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return paths, rows


def test_every_path_the_document_names_exists() -> None:
    paths, rows = _doc_paths()
    assert paths, "no paths found in docs/architecture.md"
    assert not {p for p in paths if not (ROOT / p).exists()}
    missing = {
        (name, tuple(dirs))
        for dirs, names in rows
        for name in names
        if not any((ROOT / d / name).exists() for d in dirs)
    }
    assert not missing, f"files a table names in its directories that are not there: {missing}"


def test_every_package_is_in_the_code_map_and_in_the_wheel() -> None:
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    paths, _ = _doc_paths()
    for package, directory in conf["package-dir"].items():
        for init in sorted((ROOT / directory).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / directory)
            dotted = ".".join([package, *rel.parts])
            where = init.parent.relative_to(ROOT).as_posix() + "/"
            assert dotted in listed, f"{dotted} ({where}) is not in pyproject's packages"
            assert any(p.startswith(where) for p in paths), f"{where} is not in the code map"
