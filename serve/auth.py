"""Where the ingress key comes from: the process environment or a mounted file, read
where it is used (the ingress replica, an HTTP client) and never stored in a config, a
Serve bind argument, a log line or a pickled object.

    export TEAMS_RL_API_KEY=...                  # or
    serve.api_key_file: /var/run/secrets/teams-rl/api-key
"""

from __future__ import annotations

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
