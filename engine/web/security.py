"""Who may use the dashboard, and how its actions are kept from other sites.

* **Binding**: served on a loopback address, the dashboard needs no login (only this machine
  reaches it); served anywhere else it refuses to start without a token
  (``ENGINE_DASHBOARD_TOKEN``): see :func:`check_binding`.
* **Login**: with a token, every page asks for it once (``/login``) and then a session cookie
  (HttpOnly, SameSite=Strict) carries an HMAC of it, never the token itself. Scripts may send
  ``Authorization: Bearer <token>`` instead.
* **Hosts**: without a token, only requests for a loopback host name are served, so that a web
  page cannot reach the dashboard through DNS rebinding (a name of the attacker's that resolves
  to 127.0.0.1 would otherwise make its pages same-origin with ours).
* **Actions** (every POST) need both a same-origin request (``Origin``, else ``Referer``, names
  the host the request was sent to) and the page's CSRF token, an HMAC no other site can read.

Paths under an exempt prefix (the HTTP event API: an event key authenticates each request) skip
all of this.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.requests import Request

TOKEN_VARIABLE = "ENGINE_DASHBOARD_TOKEN"
SESSION_COOKIE = "engine_dashboard_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_FAILED_LOGINS = 10  # a minute


class BindingError(Exception):
    """The dashboard would be reachable from other machines without a token."""


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.x.y.z`` and ``::1`` (bracketed or not)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuses to serve on ``host`` when it is not loopback and there is no token.

    Raises:
        BindingError: with what to do about it.
    """
    if not token and not is_loopback(host):
        raise BindingError(
            f"the dashboard would listen on {host}, reachable from other machines, without"
            f" authentication: set ${TOKEN_VARIABLE} to a long random secret, or bind to"
            " 127.0.0.1"
        )


def token_from_environment() -> str | None:
    """``$ENGINE_DASHBOARD_TOKEN``, or None when unset or empty."""
    return os.environ.get(TOKEN_VARIABLE) or None


def _mac(key: bytes, purpose: str) -> str:
    return hmac.new(key, purpose.encode(), hashlib.sha256).hexdigest()


@dataclass
class Guard:
    """The dashboard's secrets and checks (see the module docstring).

    Args:
        token: the login token; None serves without login, to loopback host names only.
        exempt: path prefixes (within the app) that skip login, host and CSRF checks.
        allowed_hosts: host names served without a token (default: loopback names); ``"*"``
            allows any (an app mounted behind its own authentication).
    """

    token: str | None = None
    exempt: tuple[str, ...] = ()
    allowed_hosts: frozenset[str] | None = None
    _key: bytes = field(init=False, repr=False)
    _failures: list[float] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        # With a token, the key derives from it, so that every process serving the same
        # dashboard accepts the same session and CSRF tokens; without, a key of this process.
        self._key = (
            hashlib.sha256(b"engine-dashboard\0" + self.token.encode()).digest()
            if self.token
            else secrets.token_bytes(32)
        )

    @property
    def session_value(self) -> str:
        """The session cookie's value: proves the token was given, without being it."""
        return _mac(self._key, "session")

    @property
    def csrf_token(self) -> str:
        """The token every form of the dashboard carries (no other site can read it)."""
        return _mac(self._key, "csrf")

    def is_exempt(self, path: str) -> bool:
        """True for paths the checks skip (the event API)."""
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.exempt)

    def host_allowed(self, request: Request) -> bool:
        """Without a token: only loopback host names (or those configured)."""
        if self.token:
            return True
        allowed = self.allowed_hosts
        if allowed is not None and "*" in allowed:
            return True
        host = _host_name(request.headers.get("host", ""))
        return host in allowed if allowed is not None else is_loopback(host)

    def logged_in(self, request: Request) -> bool:
        """True without a token, or with the session cookie or a bearer token."""
        if not self.token:
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie, self.session_value):
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.login_allowed():
            return False
        if self.token_matches(given):
            return True
        self.login_failed()  # bearer tokens are guessed no faster than the login form's
        return False

    def login_allowed(self) -> bool:
        """False after ``MAX_FAILED_LOGINS`` wrong tokens within a minute: guessing the token
        takes at most that many tries a minute, from anywhere."""
        now = time.monotonic()
        self._failures[:] = [t for t in self._failures if now - t < 60]
        return len(self._failures) < MAX_FAILED_LOGINS

    def login_failed(self) -> None:
        """Counts a wrong token (see :meth:`login_allowed`)."""
        self._failures.append(time.monotonic())

    def token_matches(self, given: str) -> bool:
        """True if ``given`` is the token (compared in constant time)."""
        return bool(self.token) and hmac.compare_digest(
            given.strip().encode(), str(self.token).encode()
        )

    def same_origin(self, request: Request) -> bool:
        """True when the request comes from a page of this host.

        ``Origin`` (every browser sends it with a POST), else ``Referer``, must name the host
        the request was sent to. A request with neither is no browser's cross-site request
        (browsers send one of them on a cross-site POST): the CSRF token still guards it.
        """
        source = request.headers.get("origin") or request.headers.get("referer")
        if not source:
            return True
        if source == "null":  # sandboxed frames, data: URLs
            return False
        return urlsplit(source).netloc.lower() == request.headers.get("host", "").lower()

    def csrf_valid(self, given: str | None) -> bool:
        """True if ``given`` is this dashboard's CSRF token."""
        return bool(given) and hmac.compare_digest(str(given), self.csrf_token)


def _host_name(host_header: str) -> str:
    """The name of a Host header without its port (``[::1]:8288`` gives ``[::1]``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def allowed(hosts: Iterable[str] | None) -> frozenset[str] | None:
    """The allowed host names, normalised (lower case)."""
    return None if hosts is None else frozenset(h.lower() for h in hosts)
