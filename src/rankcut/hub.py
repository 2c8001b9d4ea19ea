"""What rankcut needs to know about the Hugging Face hub before asking it anything.

Without network, ``from_pretrained`` on a hub id retries for about 25 s before it fails; these checks let
model and data loading fail (or fall back to the local cache) at once instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_mode_set() -> bool:
    """Whether the environment asks the Hugging Face libraries to stay offline."""
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"} for name in OFFLINE_ENV)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect, unless offline mode is set in the environment."""
    if offline_mode_set():
        return False
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub repository id (``name`` or ``owner/name``), not of a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
