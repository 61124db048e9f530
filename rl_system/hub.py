"""Whether the Hugging Face Hub can be reached, decided in seconds.

``huggingface_hub`` and ``datasets`` retry a dead connection for minutes; the export and
``hf://`` seeds ask here first and turn a reason into their own message and fix.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The Hub's URL: ``$HF_ENDPOINT`` (a mirror, a local server) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_unreachable(endpoint: str | None = None) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached, or ``None`` when a TCP connection opens.

    Offline mode (``HF_HUB_OFFLINE``) answers without touching the network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached"
    endpoint = endpoint or hub_endpoint()
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot reach the Hugging Face Hub at {endpoint} ({exc.strerror or exc})"
    return None
