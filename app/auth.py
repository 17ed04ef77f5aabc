"""Login for ``run_app.py --basic-auth``: Panel's login page with a per-client back-off and revocation on logout.

Panel's own basic-auth provider accepts any number of wrong passwords, and its logout only asks the browser
to drop the cookies: a copy of the old ``user`` cookie still gets the page. :class:`LexicellAuthProvider`
keeps Panel's login and logout pages and adds

- **back-off**: after ``max_failures`` (5) failed logins from one client address within ``window`` seconds
  (60), every login attempt from that address gets HTTP 429 with a ``Retry-After`` header for a period that
  doubles with each new block (30 s, 60 s, 120 s, ... up to an hour); a successful login clears the count
  (:class:`LoginThrottle`);
- **revocation**: ``/logout`` records the signed cookie it was sent (:class:`RevokedCookies`); the page, its
  websocket and every login-protected endpoint refuse a revoked cookie until it would have expired anyway;
- **cookies stay out of the page**: :func:`session_cookie_options` tells Bokeh not to copy the login cookies
  (or the ``Cookie``/``Authorization`` headers) into the session token embedded in the page.

Passwords are compared in constant time (:func:`hmac.compare_digest`). The client address is Tornado's
``request.remote_ip``: behind a reverse proxy every client has the proxy's address unless the server trusts
``X-Forwarded-For`` (Bokeh's ``--use-xheaders``), so the back-off then applies to the proxy as a whole.
"""
from __future__ import annotations

import hmac
import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import tornado.escape
import tornado.web
from panel.auth import BasicAuthProvider, BasicLoginHandler, LogoutHandler, _validate_next_url
from panel.config import config
from panel.io.state import state

from engine.errors import ConfigError

__all__ = ["LoginThrottle", "RevokedCookies", "LexicellAuthProvider", "load_credentials", "session_cookie_options",
           "AUTH_COOKIES"]

#: Cookies that prove a login (Panel's names); never copied into the page's session token.
AUTH_COOKIES = ("user", "id_token", "access_token", "refresh_token", "oauth_expiry")


def session_cookie_options() -> dict:
    """Bokeh server options that keep login cookies and the raw ``Cookie``/``Authorization`` headers out of the
    session token that Bokeh embeds in the page (``exclude_cookies``, ``exclude_headers``)."""
    return {"exclude_cookies": list(AUTH_COOKIES), "exclude_headers": ["Cookie", "Authorization"]}


def load_credentials(spec: str) -> str | dict[str, str]:
    """The ``--basic-auth`` value: a shared password, or ``{user: password}`` from a JSON file.

    Raises
    ------
    ConfigError
        When the file exists but is not a JSON object of strings.
    """
    if spec and os.path.isfile(spec):
        try:
            creds = json.loads(Path(spec).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError("The --basic-auth file cannot be read", found=f"{spec}: {err}",
                              expected='a JSON object such as {"alice": "password"}') from err
        if not isinstance(creds, dict) or not creds or not all(isinstance(k, str) and isinstance(v, str) and v
                                                              for k, v in creds.items()):
            raise ConfigError("The --basic-auth file is not a list of users", found=f"{spec}",
                              expected='a JSON object of user names to non-empty passwords, e.g. {"alice": "pw"}')
        return creds
    if not spec:
        raise ConfigError("Empty --basic-auth password", found="''", expected="a password or a JSON file of users")
    return spec


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def check_password(credentials: str | dict[str, str], username: str, password: str) -> bool:
    """True when ``password`` is right (for ``username`` with a file of users), compared in constant time."""
    if isinstance(credentials, dict):
        expected = credentials.get(username)
        if expected is None:
            _same(password, password)  # same work as a wrong password of a known user
            return False
        return _same(password, expected)
    return _same(password, credentials)


@dataclass
class _Client:
    failures: deque = field(default_factory=deque)
    strikes: int = 0
    blocked_until: float = 0.0
    last_seen: float = 0.0


class LoginThrottle:
    """Per-client back-off for failed logins.

    Parameters
    ----------
    max_failures
        Failures within ``window`` seconds that block the client.
    window
        Seconds over which failures are counted.
    base_block
        Seconds of the first block; each further block of the same client doubles it.
    max_block
        Longest block, in seconds; a client that stays clean this long after a block starts again at
        ``base_block``.
    max_clients
        Clients remembered at most (the least recently seen unblocked ones are forgotten first).
    clock
        Monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, max_failures: int = 5, window: float = 60.0, base_block: float = 30.0,
                 max_block: float = 3600.0, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.max_failures, self.window = int(max_failures), float(window)
        self.base_block, self.max_block = float(base_block), float(max_block)
        self.max_clients, self.clock = int(max_clients), clock
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        with self._lock:
            c = self._clients.get(client)
            return max(0.0, c.blocked_until - self.clock()) if c else 0.0

    def failure(self, client: str) -> float:
        """Record a failed login; returns the seconds ``client`` is now blocked for (0: not blocked)."""
        now = self.clock()
        with self._lock:
            c = self._clients.get(client)
            if c is None:
                self._prune(now)
                c = self._clients[client] = _Client()
            if c.strikes and now - c.blocked_until > self.max_block:
                c.strikes = 0  # clean for a long time: start again
            c.last_seen = now
            while c.failures and now - c.failures[0] > self.window:
                c.failures.popleft()
            c.failures.append(now)
            if len(c.failures) < self.max_failures:
                return 0.0
            c.failures.clear()
            block = min(self.base_block * 2 ** c.strikes, self.max_block)
            c.strikes += 1
            c.blocked_until = now + block
            return block

    def success(self, client: str) -> None:
        """A successful login forgets the client's failures and blocks."""
        with self._lock:
            self._clients.pop(client, None)

    def __len__(self) -> int:
        return len(self._clients)

    def _prune(self, now: float) -> None:
        if len(self._clients) < self.max_clients:
            return
        idle = sorted((c.last_seen, k) for k, c in self._clients.items() if c.blocked_until <= now)
        for _, k in idle[: max(1, len(self._clients) - self.max_clients + 1)]:
            del self._clients[k]


class RevokedCookies:
    """Signed login cookies given back at logout; refused until they would have expired anyway.

    Only validly signed cookies are recorded (the caller checks), so the set cannot be filled with junk by
    clients that never logged in; expired entries are dropped as new ones come.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, value: str, max_age_days: float) -> None:
        now = self.clock()
        with self._lock:
            for k in [k for k, t in self._until.items() if t < now]:
                del self._until[k]
            self._until[value] = now + max_age_days * 86400.0

    def __contains__(self, value) -> bool:
        if not value:
            return False
        with self._lock:
            t = self._until.get(value)
        return t is not None and t >= self.clock()

    def __len__(self) -> int:
        return len(self._until)


def _max_age_days() -> float:
    return float(config.oauth_expiry or 7)


class LexicellLoginHandler(BasicLoginHandler):
    """Panel's login page with back-off (HTTP 429) and constant-time password checks."""

    provider: "LexicellAuthProvider"

    def _client(self) -> str:
        return self.request.remote_ip or "unknown"

    def _too_many(self, seconds: float) -> None:
        wait = max(1, math.ceil(seconds))
        self.set_status(429)
        self.set_header("Retry-After", str(wait))
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish("<!DOCTYPE html><html><head><title>Too many attempts</title></head><body>"
                    "<h3>Too many failed logins from this address.</h3>"
                    f"<p>Try again in {wait} seconds.</p></body></html>")

    def _validate(self, username, password):
        return check_password(self.provider.credentials, username, password)

    def post(self):
        client = self._client()
        throttle = self.provider.throttle
        wait = throttle.retry_after(client)
        if wait > 0:  # blocked: not even a right password is checked
            self._too_many(wait)
            return
        username = self.get_argument("username", "")
        password = self.get_argument("password", "")
        if self._validate(username, password):
            throttle.success(client)
            self.set_current_user(username)
            self.redirect(_validate_next_url(self.get_cookie("next_url", state.base_url)))
            return
        blocked = throttle.failure(client)
        if blocked > 0:
            self._too_many(blocked)
            return
        error = "?error=" + tornado.escape.url_escape("Invalid username or password!")
        self.redirect(self.request.path + error)

    def create_signed_value(self, name, value, version=None):
        """Signed cookie values that never equal a revoked one (same user, same second: a later timestamp)."""
        secret = self.application.settings["cookie_secret"]
        t = time.time()
        while True:
            signed = tornado.web.create_signed_value(secret, name, value, version=version, clock=lambda: t)
            if signed.decode("utf-8") not in self.provider.revoked:
                return signed
            t += 1.0


class LexicellLogoutHandler(LogoutHandler):
    """Panel's logout page, which also revokes the login cookie on the server."""

    provider: "LexicellAuthProvider"

    def get(self):
        for name in ("user", "id_token"):
            raw = self.get_cookie(name)
            if raw and self.get_secure_cookie(name, value=raw, max_age_days=_max_age_days()) is not None:
                self.provider.revoked.add(raw, _max_age_days())
        super().get()


class LexicellAuthProvider(BasicAuthProvider):
    """Panel's basic-auth provider with a login back-off and server-side revocation on logout.

    Parameters
    ----------
    credentials
        A shared password, or ``{user: password}`` (:func:`load_credentials`).
    throttle
        The back-off (default :class:`LoginThrottle` with 5 failures per minute).
    revoked
        The revoked-cookie set (default a new :class:`RevokedCookies`).
    **kwargs
        Passed to :class:`panel.auth.BasicAuthProvider` (endpoints, templates).
    """

    def __init__(self, credentials: str | dict[str, str], *, throttle: LoginThrottle | None = None,
                 revoked: RevokedCookies | None = None, **kwargs):
        self.credentials = credentials
        self.throttle = throttle or LoginThrottle()
        self.revoked = revoked or RevokedCookies()
        super().__init__(**kwargs)

    def _remove_user(self, session_context):
        """Panel counts active users from the session's cookies, which Lexicell keeps out of sessions."""

    @property
    def get_user(self):
        def get_user(handler):
            raw = handler.get_cookie("user")
            if not raw or raw in self.revoked:
                return None
            user = handler.get_secure_cookie("user", value=raw, max_age_days=_max_age_days())
            return user.decode("utf-8") if user else None
        return get_user

    @property
    def login_handler(self):
        return type("LexicellLoginHandler", (LexicellLoginHandler,),
                    {"provider": self, "_login_endpoint": self._login_endpoint,
                     "_login_template": self._login_template})

    @property
    def logout_handler(self):
        return type("LexicellLogoutHandler", (LexicellLogoutHandler,),
                    {"provider": self, "_login_endpoint": self._login_endpoint,
                     "_logout_template": self._logout_template})
