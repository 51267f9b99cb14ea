"""Weights & Biases that never blocks: online when credentials exist, offline otherwise."""

from __future__ import annotations

import netrc
import os
from pathlib import Path


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


def wandb_mode(requested: str = "auto") -> str:
    """$WANDB_MODE wins; `auto` means online only with credentials, so nothing ever prompts."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    return "online" if has_wandb_credentials() else "offline"


def quiet_wandb_environment() -> None:
    """No login prompt, no console capture fighting the progress bar."""
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
