"""The UI's credential, its session cookie, CSRF tokens and signed approval links.

- **Credential**: a random token kept 0600 in the data dir (``ui.json``, made on first start,
  reused after) or given by ``POLOS_UI_TOKEN``. ``polos up`` prints it in the UI's URL
  (``/?token=...``), as Jupyter does; opening that URL sets a session cookie and drops the
  token from the address bar. Scripts may send ``Authorization: Bearer <token>`` instead.
- **Session cookie**: ``<nonce>.<issued>.<HMAC>`` signed with the UI's secret, HttpOnly,
  SameSite=Lax, named after the port (two UIs on one host keep their own).
- **CSRF**: every form carries ``_csrf`` = HMAC(secret, nonce); an action without it, or from
  another origin (``Origin`` / ``Sec-Fetch-Site``), is refused.
- **Approval links**: ``/approve/<run>/<step>`` needs the session like every page; the page
  also offers a *signed* link (``?sig=HMAC(secret, run, step)``) that opens that one approval,
  and nothing else, without the token: the link to put in an email or a chat message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

SESSION_MAX_AGE = 14 * 24 * 3600
SECRETS_FILE = "ui.json"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Secrets:
    token: str
    key: bytes

    @classmethod
    def generate(cls) -> Secrets:
        return cls(secrets.token_urlsafe(24), secrets.token_bytes(32))

    @classmethod
    def load_or_create(cls, path: Path | None, token: str | None = None) -> Secrets:
        """The secrets in ``path`` (made 0600 on first use); ``token`` overrides the stored
        token. Without a path (nowhere to keep them), fresh ones for this process."""
        if path is None:
            fresh = cls.generate()
            return cls(token or fresh.token, fresh.key)
        doc: dict[str, Any] = {}
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {}
        if not (isinstance(doc.get("token"), str) and isinstance(doc.get("key"), str)):
            fresh = cls.generate()
            doc = {"token": fresh.token, "key": fresh.key.hex()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(doc) + "\n")
            os.replace(tmp, path)
        return cls(token or str(doc["token"]), bytes.fromhex(str(doc["key"])))

    # ------------------------------------------------------------------ derived values

    def _mac(self, *parts: str) -> str:
        return _b64(hmac.new(self.key, "\0".join(parts).encode(), hashlib.sha256).digest())

    def token_ok(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(str(candidate).encode(), self.token.encode())

    def new_session(self) -> tuple[str, str]:
        """(cookie value, nonce) of a new session."""
        nonce = secrets.token_urlsafe(12)
        issued = str(int(time.time()))
        return f"{nonce}.{issued}.{self._mac('session', nonce, issued)}", nonce

    def session_nonce(self, cookie: str | None) -> str | None:
        """The nonce of a valid, unexpired session cookie, else None."""
        if not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 3:
            return None
        nonce, issued, mac = parts
        if not hmac.compare_digest(mac, self._mac("session", nonce, issued)):
            return None
        try:
            if time.time() - int(issued) > SESSION_MAX_AGE:
                return None
        except ValueError:
            return None
        return nonce

    def csrf_for(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def link_sig(self, run_id: str, step: str) -> str:
        return self._mac("approve", run_id, step)[:32]

    def link_ok(self, run_id: str, step: str, sig: str | None) -> bool:
        return bool(sig) and hmac.compare_digest(str(sig), self.link_sig(run_id, step))


def approve_path(run_id: str, step: str) -> str:
    """The approval page of a suspended step: ``/approve/<run id>/<step key>``."""
    return f"/approve/{run_id}/{quote(step, safe='/')}"


def approval_url(base_url: str, run_id: str, step: str) -> str:
    """The approval page of ``ctx.step.suspend(step)`` of ``run_id`` on the UI at
    ``base_url`` (what ``_approval_url`` holds)."""
    return base_url.rstrip("/") + approve_path(run_id, step)


# --------------------------------------------------------------------------- ASGI middleware

LOGIN_PATH = "/login"
PUBLIC_PREFIXES = ("/static/",)


class AuthMiddleware:
    """No page or API answers without the credential (unless ``auth`` is off); actions must
    come from this origin. Sets ``scope["polos_ui"]`` = {"nonce", "via", "link"} for the app."""

    def __init__(self, app: Any, *, secrets_: Secrets, auth: bool, cookie_name: Any) -> None:
        self.app = app
        self.secrets = secrets_
        self.auth = auth
        self._cookie_name = cookie_name  # a callable: the port is known only once bound

    @property
    def cookie_name(self) -> str:
        return str(self._cookie_name())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        if path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        if method not in ("GET", "HEAD", "OPTIONS") and not _same_origin(headers):
            await _plain(
                send,
                403,
                "refused: a cross-site request (Origin or Sec-Fetch-Site names another site)",
            )
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        cookies = _cookies(headers.get("cookie", ""))
        nonce = self.secrets.session_nonce(cookies.get(self.cookie_name))
        info: dict[str, Any] = {"nonce": nonce, "via": "cookie" if nonce else None, "link": None}
        scope["polos_ui"] = info

        if "token" in query and method == "GET":
            if not self.secrets.token_ok(query["token"]):
                await _plain(send, 401, "the token in this URL is not this UI's token")
                return
            cookie, _ = self.secrets.new_session()
            rest = urlencode([(k, v) for k, v in query.items() if k != "token"])
            await _redirect(send, path + (f"?{rest}" if rest else ""), self._set_cookie(cookie))
            return
        if nonce is not None:
            await self.app(scope, receive, send)
            return
        bearer = headers.get("authorization", "")
        if bearer.lower().startswith("bearer ") and self.secrets.token_ok(bearer[7:].strip()):
            info["via"] = "bearer"
            await self.app(scope, receive, send)
            return
        if path.startswith("/approve/") and "sig" in query:
            from urllib.parse import unquote

            run_id, _, step = path[len("/approve/") :].partition("/")
            step = unquote(step)
            if self.secrets.link_ok(run_id, step, query.get("sig")):
                info.update(via="link", link=(run_id, step), nonce="link:" + str(query["sig"]))
                await self.app(scope, receive, send)
                return
        if not self.auth:
            # Auth off: everyone gets a session, still needed for the CSRF tokens of forms.
            cookie, new = self.secrets.new_session()
            info.update(nonce=new, via="anonymous")
            await self.app(scope, receive, _with_cookie(send, self._set_cookie(cookie)))
            return
        if path == LOGIN_PATH:
            await self.app(scope, receive, send)
            return
        if (
            method == "GET"
            and "text/html" in headers.get("accept", "")
            and not path.startswith("/api/")
        ):
            qs = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{qs}" if qs else "")
            await _redirect(send, f"{LOGIN_PATH}?{urlencode({'next': target})}", None)
            return
        await _plain(
            send,
            401,
            "authentication required: open the URL `polos up` printed "
            "(with its token), or send Authorization: Bearer <token>",
        )

    def _set_cookie(self, value: str) -> str:
        return (
            f"{self.cookie_name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={SESSION_MAX_AGE}"
        )


def _same_origin(headers: dict[str, str]) -> bool:
    """False for a request a browser says comes from another site. Browsers send ``Origin``
    with every POST; a request without it is not a browser's (a script, curl)."""
    site = headers.get("sec-fetch-site")
    if site is not None:  # what the browser itself says (every current browser sends it)
        return site in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    return origin.split("://", 1)[-1].rstrip("/") == headers.get("host", "")


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name] = value
    return out


SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; "
        b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
        b"form-action 'self'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # Not no-referrer: with it a browser sends ``Origin: null`` even on same-origin forms.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def _with_headers(send: Any) -> Any:
    """Every response gets the security headers (a page may set its own cache policy)."""

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            have = {k.lower() for k, _ in message.get("headers", [])}
            message["headers"] = [
                *message.get("headers", []),
                *[(k, v) for k, v in SECURITY_HEADERS if k not in have],
            ]
        await send(message)

    return wrapped


async def _plain(send: Any, status: int, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": (text + "\n").encode()})


async def _redirect(send: Any, location: str, cookie: str | None) -> None:
    headers = [(b"location", location.encode("latin-1", "replace"))]
    if cookie:
        headers.append((b"set-cookie", cookie.encode("latin-1")))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _with_cookie(send: Any, cookie: str) -> Any:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
        await send(message)

    return wrapped
