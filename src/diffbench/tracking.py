"""Weights & Biases that never blocks: online when credentials exist, offline otherwise."""

from __future__ import annotations

import netrc
import os
import socket
import threading
import urllib.parse
from pathlib import Path

PROBE_SECONDS = 3.0
"""How long the W&B server gets to accept a connection before a run goes offline."""


def has_wandb_credentials() -> bool:
    """An API key in the environment or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_server_answers(timeout: float = PROBE_SECONDS) -> bool:
    """Whether $WANDB_BASE_URL (default api.wandb.ai) accepts a TCP connection within `timeout`
    seconds, DNS included: credentials without a network must mean offline, not wandb.init's
    ~100 s hang. The probe runs in a daemon thread because name lookup ignores socket timeouts."""
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    answered = threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.set()
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return answered.is_set()


def wandb_online() -> bool:
    """Online needs credentials and a server that answers; anything else logs offline."""
    return has_wandb_credentials() and wandb_server_answers()


def wandb_mode(requested: str = "auto") -> str:
    """$WANDB_MODE wins; `auto` means online only with credentials and a reachable server, so
    nothing ever prompts or hangs."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    return "online" if wandb_online() else "offline"


def quiet_wandb_environment() -> None:
    """No login prompt, no console capture fighting the progress bar."""
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
