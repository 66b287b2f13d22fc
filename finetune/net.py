"""Fail fast when the Hugging Face hub cannot be reached, instead of ~25 s of client retries."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

from finetune.errors import FinetuneError

OFFLINE_HINT = (
    "for a run that needs no network, try: make finetune RECIPE=recipes/offline-demo.yaml"
)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the hub's endpoint; False when offline or HF_HUB_OFFLINE=1."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, key: str) -> None:
    """Raise a one-line error when `what` must come from the hub and the hub is out of reach."""
    if not hub_reachable():
        raise FinetuneError(
            f"{key}: {what} must be downloaded from the Hugging Face hub, which cannot be reached "
            f"(offline?); put it in a local folder and name that folder, or {OFFLINE_HINT}"
        )
