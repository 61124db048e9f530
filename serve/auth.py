"""The ingress key and the guards in front of every HTTP app we serve.

The key comes from the process environment or a mounted file, read where it is used
(the ingress replica, an HTTP client) and never stored in a config, a Serve bind
argument, a log line or a pickled object. ``guard`` puts the body limit and the key
check in front of an app (our ingress, Ray Serve LLM's); ``check_exposure`` refuses a
host other machines can reach without a key.

    export TEAMS_RL_API_KEY=...                  # or
    serve.api_key_file: /var/run/secrets/teams-rl/api-key
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

API_KEY_ENV = "TEAMS_RL_API_KEY"


def load_api_key(key_file: str | os.PathLike | None = None) -> str | None:
    """The ingress key: ``$TEAMS_RL_API_KEY`` if set, else the first line of ``key_file``.

    ``None`` means no key is configured. A named key file that cannot be read raises
    ``OSError`` naming the file: a run that was meant to be protected must not start open.
    """
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        return key
    if key_file is None:
        return None
    path = Path(key_file).expanduser()
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise OSError(f"serve.api_key_file: cannot read {path}: {exc.strerror}") from None
    if not key:
        raise OSError(f"serve.api_key_file: {path} is empty")
    return key


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine (a name other than localhost counts as not)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, key: str | None) -> None:
    """Refuse to serve on a non-loopback ``host`` without a key: Ray's token auth guards the
    control plane only, so an open Serve proxy would answer anyone who can reach the node."""
    if key is None and not is_loopback(host):
        raise ValueError(
            f"serve.host is {host}, reachable from other machines, but no ingress key is "
            f"set: export {API_KEY_ENV}=<key> or set serve.api_key_file (or bind "
            "serve.host=127.0.0.1)"
        )


class RequireKey:
    """ASGI middleware: every request needs ``Authorization: Bearer <key>`` except the
    paths in ``open_paths`` (relative to the app's route prefix).

    It wraps the whole app, so it also covers routes the app did not declare (404s,
    405s, documentation pages) and runs before a body is read. The key is read in the
    replica (``load_api_key``) and handed to it there; it is never pickled.
    """

    def __init__(self, app, *, key: str, open_paths: frozenset[str] = frozenset()):
        self.app = app
        self._key = key.encode()
        self._open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or (
            _relative_path(scope) in self._open_paths
        ):
            return await self.app(scope, receive, send)
        token = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
        if hmac.compare_digest(token, self._key):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        body = json.dumps({"error": {
            "message": "missing or invalid API key (send Authorization: Bearer <key>)",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
        }}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})


def _relative_path(scope) -> str:
    # Ray Serve keeps the route prefix in `path` and puts it in `root_path` too.
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


class LimitBody:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before anything parses it.

    The body (at most ``max_bytes``) is read here and replayed to the app, so a chunked
    upload without ``Content-Length`` is held to the same limit.
    """

    def __init__(self, app, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"error": {
            "message": f"request body exceeds {self.max_bytes} bytes (serve.limits."
            "max_request_bytes)", "type": "invalid_request_error", "param": None,
            "code": "request_too_large",
        }}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


def guard(app, *, key: str | None, max_request_bytes: int, open_paths=frozenset()):
    """Put the body limit and (with a key) the key check in front of a Starlette/FastAPI
    ``app`` that has not started yet; the key check runs first."""
    app.add_middleware(LimitBody, max_bytes=max_request_bytes)
    if key is not None:
        app.add_middleware(RequireKey, key=key, open_paths=frozenset(open_paths))
    return app
