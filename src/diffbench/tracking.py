"""Weights & Biases that never blocks: online when credentials exist, offline otherwise; and what a
run's W&B summary carries, so a report read from W&B reads what one read from run directories does."""

from __future__ import annotations

import http.client
import netrc
import os
import sys
import threading
import urllib.parse
from collections.abc import Callable, MutableMapping
from pathlib import Path

PROBE_SECONDS = 5.0
"""How long the W&B server gets to accept a connection and answer a request before a run goes
offline; wandb's own start is then bounded by INIT_SECONDS, so a silent server costs a run at
most about ten seconds."""
INIT_SECONDS = 5
GRAPHQL = "/graphql"


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


def wandb_server_answers(timeout: float | None = None) -> bool:
    """Whether $WANDB_BASE_URL (default api.wandb.ai) answers a GraphQL request, the endpoint
    wandb.init needs first, within `timeout` seconds (DNS, connection and answer), with a status
    below 500 (401 for a bad key is an answer): credentials without a network, a server that
    accepts and never answers, or one that fails must all mean offline, not wandb.init's 90 s wait.
    The probe runs in a daemon thread because name lookup ignores socket timeouts."""
    timeout = PROBE_SECONDS if timeout is None else timeout
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    https = url.scheme != "http"
    port = url.port or (443 if https else 80)
    answered = threading.Event()

    def ask() -> None:
        connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
        connection = connection_class(host, port, timeout=timeout)
        try:
            body = b'{"query": "{ __typename }"}'
            connection.request("POST", GRAPHQL, body=body, headers={"Content-Type": "application/json"})
            if connection.getresponse().status < 500:
                answered.set()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()

    probe = threading.Thread(target=ask, daemon=True)
    probe.start()
    probe.join(timeout)
    return answered.is_set()


def wandb_online() -> bool:
    """Online needs credentials and a server that answers; anything else logs offline."""
    return has_wandb_credentials() and wandb_server_answers()


def trials_online(env: dict[str, str], wanted: bool) -> bool:
    """Whether the trials a sweep starts with `env` log to W&B online: only when `wanted`, when
    `env` leaves WANDB_MODE unset or online, and when W&B is reachable (`wandb_online`). Otherwise
    an unset or online WANDB_MODE in `env` becomes offline (another explicit mode, such as disabled,
    is kept), so no trial prompts or waits for a server."""
    if env.get("WANDB_MODE", "online") != "online":
        return False
    if wanted and wandb_online():
        return True
    go_offline(env)
    return False


def go_offline(env: MutableMapping[str, str]) -> None:
    """The one W&B fallback, for a sweep's trials and for a run whose W&B start failed: WANDB_MODE
    offline in `env`, so nothing waits for a server and `wandb sync` uploads the run later."""
    env["WANDB_MODE"] = "offline"


def run_started(start: Callable[[], object]) -> bool:
    """Start the W&B run now (`start()`, such as a logger's `experiment`), before any training, so
    that a W&B failure (a malformed or rejected key, a server that refuses) costs a line and an
    offline run rather than the run itself. False means this process is now offline
    (`go_offline`): the caller builds its logger again."""
    try:
        run = start()
    except Exception as error:  # wandb raises its own error types, and OSError/ValueError besides
        print(
            f"[diffbench] W&B could not start a run ({type(error).__name__}: {error}); "
            "logging offline instead (wandb sync uploads it later).",
            file=sys.stderr,
        )
        run = None
    if run is None:
        go_offline(os.environ)
        return False
    return True


def wandb_mode(requested: str = "auto") -> str:
    """$WANDB_MODE wins; `auto` means online only with credentials and a reachable server, so
    nothing ever prompts or hangs."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    if not has_wandb_credentials():
        return "offline"
    if wandb_server_answers():
        return "online"
    server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    print(
        f"[diffbench] W&B: {server} gave no usable answer within {PROBE_SECONDS:g} s; logging offline "
        "(`wandb sync` the run's wandb/ folder later)",
        file=sys.stderr,
    )
    return "offline"


def settle_wandb_mode(requested: str = "auto") -> str:
    """Decide the mode once and put it in $WANDB_MODE, so every part of wandb in this process sees
    it: with only `wandb.init(mode=...)` offline, wandb's own telemetry still posted to the silent
    server at exit and waited 10 s for it."""
    mode = wandb_mode(requested)
    os.environ["WANDB_MODE"] = mode
    return mode


def quiet_wandb_environment() -> None:
    """No login prompt, no console capture fighting the progress bar."""
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", str(INIT_SECONDS))


FINAL = "final/"
"""The prefix of the final metrics in a run's W&B summary (what W&B's runs table aggregates)."""
SUMMARY_FIELDS = (
    "status",
    "diverged_at_step",
    "seed",
    "num_params",
    "steps",
    "evaluation",
    "optimisation",
    "budgets",
)
"""The results.json fields a run's W&B summary carries under their own names, beside the final
metrics: everything the report reads from results.json, the per-budget rows included, so that
its headlines can be settled from a W&B project as from run directories."""


def wandb_summary(results: dict) -> dict:
    """What a run's W&B summary is updated with: `final/<metric>` for each final metric and the
    SUMMARY_FIELDS of `results` (a results.json record) that it has. JSON-able, as results.json is."""
    return {
        **{f"{FINAL}{key}": value for key, value in (results.get("metrics") or {}).items()},
        **{key: results[key] for key in SUMMARY_FIELDS if results.get(key) is not None},
    }


def summary_results(summary: object) -> dict:
    """A W&B run's summary read back as the results.json record `wandb_summary` was given (its
    `metrics` and SUMMARY_FIELDS), in plain dicts and lists: W&B's public API returns nested
    values as its own dict-like objects."""
    values = plain(summary)
    if not isinstance(values, dict):
        return {"metrics": {}}
    metrics = {key.removeprefix(FINAL): value for key, value in values.items() if key.startswith(FINAL)}
    return {"metrics": metrics, **{key: values[key] for key in SUMMARY_FIELDS if key in values}}


def plain(value: object) -> object:
    """`value` with every dict-like object (one with keys() and item access) a dict and every
    list or tuple a list, recursively."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if not isinstance(value, (str, bytes)) and hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return {key: plain(value[key]) for key in value.keys()}
    return value
