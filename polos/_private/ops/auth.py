"""Authentication and authorization: per-role NATS users, generated credentials, TLS.

Each namespace (prefix ``p``) has three users, each allowed only what its role needs:

- ``p-service`` (orchestrator, scheduler, exporters): the namespace's subjects, and the
  JetStream API on the namespace's streams only (it alone creates the topology).
- ``p-worker``: pull and ack tasks, read and append run histories, its registrations, slots,
  rate buckets, memory, payloads, dead letters, live deltas; start runs like a client. It cannot
  create or delete streams, touch another namespace, or read commands.
- ``p-client``: publish commands and external events, read run histories, the run index and
  workers, wait on run control subjects, follow live deltas, keep cron schedules, queue limits,
  memory and payloads. It cannot append to a history or pull tasks.

Which role may do what with each stream and bucket is a column of the topology table
(``polos._private.store.topology.TOPOLOGY``); ``permissions`` only turns it into NATS grants.

Connections without credentials get nothing (the server refuses them). Credentials are random,
made on first start and kept in a JSON file readable only by its owner (0600); the server's
config with the same users is written beside it, 0600 as well.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from polos._private.store.names import Names
from polos._private.store.topology import CORE_SUBJECTS as TOPOLOGY_CORE
from polos._private.store.topology import ROLES, TOPOLOGY

# --------------------------------------------------------------------------- permissions

# Generated from the topology table (polos/_private/store/topology.py): a stream, bucket or core
# subject is granted to the roles its row names, so a new bucket cannot be forgotten here. A
# grant must name each stream: NATS wildcards match whole tokens only, so ``KV_<prefix>_*``
# cannot be said.


def namespace_streams(prefix: str) -> list[str]:
    """Every JetStream stream of a namespace (its streams, buckets and object stores)."""
    names = Names(prefix)
    return [row.stream(names) for row in TOPOLOGY]


def _use(stream: str) -> list[str]:
    """Read a stream (direct and message get) and use consumers on it (ordered ones too);
    never create, update, purge or delete it."""
    return [
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def _manage(stream: str) -> list[str]:
    """Everything on one stream: create, update, info, purge, delete (``STREAM.<op>.<s>``),
    message get and delete, direct gets, consumers of any kind, acks."""
    return [
        f"$JS.API.STREAM.*.{stream}",
        f"$JS.API.STREAM.MSG.*.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.*.{stream}",
        f"$JS.API.CONSUMER.*.{stream}.>",
        f"$JS.API.CONSUMER.*.*.{stream}.>",  # MSG.NEXT, DURABLE.CREATE, LEADER.STEPDOWN
        f"$JS.ACK.{stream}.>",
    ]


def permissions(role: str, prefix: str) -> dict[str, Any]:
    """The NATS ``permissions`` block of ``role`` in namespace ``prefix``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    names = Names(prefix)
    publish = [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",  # nats-py looks a stream up by subject for ordered consumers
        "$JS.FC.>",  # flow control answers of ordered consumers (Object Store reads)
    ]
    subscribe = ["_INBOX.>"]
    if role == "service":
        publish.append("_INBOX.>")  # the orchestrator answers commands on their Polos-Reply
        subscribe.append(f"{prefix}.>")  # followers and exporters watch what is appended
    for row in TOPOLOGY:
        stream = row.stream(names)
        if role == "service":
            # Only the service role creates and updates the topology (and may purge, delete).
            publish += _manage(stream)
        else:
            # Any role may look a stream up: that is how it finds out what is missing.
            publish.append(f"$JS.API.STREAM.INFO.{stream}")
            if role in row.read:
                publish += _use(stream)
            if role in row.delete_msg:
                publish.append(f"$JS.API.STREAM.MSG.DELETE.{stream}")
        publish += row.writes(role, names)
    for core in TOPOLOGY_CORE:
        if role in core.publish:
            publish.append(core.subject(names))
        if role in core.subscribe and role != "service":
            subscribe.append(core.subject(names))
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def describe_roles(prefix: str = "<prefix>") -> str:
    """A Markdown table of what each role may do, generated from the topology (the docs')."""
    names = Names(prefix)
    rows = [
        "| stream, bucket or subject | holds | " + " | ".join(ROLES) + " |",
        "|---|---|" + "---|" * len(ROLES),
    ]
    for row in TOPOLOGY:
        cells = []
        for role in ROLES:
            can = ["read"] if role in row.read else []
            if role in row.write:
                can.append("write")
            elif role in row.write_only:
                can.append("write " + ", ".join(f"`{s}`" for s in row.write_only[role](names)))
            if role in row.delete_msg:
                can.append("delete")
            if role == "service":
                can = ["all"]  # create, update, purge, delete; read and write
            cells.append(", ".join(can) or "look up")
        kind, name = row.label(names).rsplit(" ", 1)
        rows.append(f"| {kind} `{name}` | {row.what} | " + " | ".join(cells) + " |")
    for core in TOPOLOGY_CORE:
        cells = [
            ", ".join(
                (["publish"] if role in core.publish else [])
                + (["subscribe"] if role in core.subscribe else [])
            )
            or "-"
            for role in ROLES
        ]
        rows.append(
            f"| `{core.subject(names)}` (core NATS) | {core.what} | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------- credentials


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that only the owner can ever read it (no umask window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_credentials(path: str | Path, prefixes: list[str]) -> dict[str, dict[str, str]]:
    """Load ``path``, adding random users for namespaces it lacks; returns {user: {password,
    role, prefix}}. Made on first start; later starts reuse the same passwords."""
    path = Path(path)
    creds: dict[str, dict[str, str]] = {}
    if path.exists():
        creds = json.loads(path.read_text())
    changed = not path.exists()
    for prefix in prefixes:
        for role in ROLES:
            user = f"{prefix}-{role}"
            if user not in creds:
                creds[user] = {
                    "password": secrets.token_urlsafe(24),
                    "role": role,
                    "prefix": prefix,
                }
                changed = True
    if changed:
        _write_private(path, json.dumps(creds, indent=2, sort_keys=True) + "\n")
    os.chmod(path, 0o600)
    return creds


def render_authorization(creds: dict[str, dict[str, str]]) -> str:
    """The nats-server ``authorization`` block for ``creds`` (JSON is valid NATS config)."""
    users = [
        {
            "user": user,
            "password": c["password"],
            "permissions": permissions(c["role"], c["prefix"]),
        }
        for user, c in sorted(creds.items())
    ]
    return "authorization " + json.dumps({"users": users}, indent=2) + "\n"


def render_tls(
    cert: str | Path, key: str | Path, *, verify_clients: bool = False, ca: str | Path | None = None
) -> str:
    lines = [f'  cert_file: "{cert}"', f'  key_file: "{key}"', "  timeout: 2"]
    if ca is not None:
        lines.append(f'  ca_file: "{ca}"')
    if verify_clients:
        lines.append("  verify: true")
    return "tls {\n" + "\n".join(lines) + "\n}\n"


def write_server_config(
    out: str | Path,
    base_config: str | Path | None,
    creds: dict[str, dict[str, str]],
    *,
    tls: str | None = None,
) -> Path:
    """A server config: the base (nats.conf) plus the users, and TLS if given. Mode 0600."""
    base = Path(base_config).read_text() if base_config else ""
    text = (
        f"# Generated by Polos from {base_config or '(defaults)'}: do not edit, edit the base.\n"
        + base
        + "\n\n"
        + render_authorization(creds)
        + (tls or "")
    )
    out = Path(out)
    _write_private(out, text)
    return out


def url_for(creds: dict[str, dict[str, str]], user: str, url: str) -> str:
    """``url`` (or a comma-separated cluster list) with ``user``'s credentials in it."""
    password = creds[user]["password"]
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.hostname or "127.0.0.1"
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        out.append(urlunsplit((parts.scheme or "nats", netloc, parts.path, "", "")))
    return ",".join(out)


# --------------------------------------------------------------------------- TLS


def make_self_signed(directory: str | Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A self-made CA and a server certificate for ``host`` (openssl CLI); returns
    (ca.pem, server-cert.pem, server-key.pem). Keys are 0600."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl not found: install it or bring your own certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        d / n for n in ("ca-key.pem", "ca.pem", "server-key.pem", "server.csr", "server-cert.pem")
    )
    ext = d / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:{host},DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "365",
        "-subj",
        "/CN=Polos test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={host}",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "365",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    for k in (ca_key, key):
        os.chmod(k, 0o600)
    return ca, cert, key


# --------------------------------------------------------------------------- polos up --auth

CREDENTIALS_FILE = "credentials.json"
SERVER_CONFIG_FILE = "nats-auth.conf"


def secure_server_config(
    data_dir: str | Path, prefix: str, base_config: str | Path | None
) -> tuple[dict[str, dict[str, str]], Path]:
    """Credentials for ``prefix`` (made on first start) and the server config that enforces
    them, both 0600 in ``data_dir``. ``polos up --auth`` runs the server with that config."""
    d = Path(data_dir)
    creds = ensure_credentials(d / CREDENTIALS_FILE, [prefix])
    conf = write_server_config(d / SERVER_CONFIG_FILE, base_config, creds)
    return creds, conf


__all__ = [
    "CREDENTIALS_FILE",
    "ROLES",
    "ensure_credentials",
    "make_self_signed",
    "permissions",
    "render_authorization",
    "render_tls",
    "secure_server_config",
    "url_for",
    "write_server_config",
]
