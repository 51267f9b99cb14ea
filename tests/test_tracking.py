"""W&B never blocks: the reachability probe is bounded, auto mode goes offline without a server,
and a sweep whose W&B side fails runs its trials locally."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY
from diffbench import launch, tracking
from diffbench.sweep import main
from diffbench.tracking import trials_online, wandb_mode, wandb_server_answers

pytestmark = pytest.mark.slow  # end to end: trains, runs commands or simulates thousands of reports


def closed_port() -> int:
    """A loopback port with nothing listening: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Answer(http.server.BaseHTTPRequestHandler):
    """Answers a POST to /graphql with the class's status, anything else with 404."""

    status = 200

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.status if self.path == tracking.GRAPHQL else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_server(status: int) -> Iterator[int]:
    handler = type("Handler", (Answer,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_probe_needs_an_answer_below_500(monkeypatch: pytest.MonkeyPatch) -> None:
    for status, online in ((200, True), (401, True), (500, False), (503, False)):
        with http_server(status) as port:
            monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
            assert wandb_server_answers(timeout=2.0) is online, status
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    assert not wandb_server_answers(timeout=2.0)


def test_a_silent_server_means_offline_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the connection and never answers (the case that used to cost each
    run about 90 s): offline once the probe's bound has passed."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(tracking, "PROBE_SECONDS", 1.0)
        start = time.perf_counter()
        assert wandb_mode("auto") == "offline"
        assert time.perf_counter() - start < 2.0


def test_probe_gives_up_in_bounded_time_when_the_connect_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(*args: object, **kwargs: object) -> socket.socket:
        time.sleep(5)
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert not wandb_server_answers(timeout=0.3)
    assert time.perf_counter() - start < 1.5


def test_auto_mode_is_offline_with_credentials_but_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode("auto") == "online", "an explicit WANDB_MODE is respected"


def test_sweep_falls_back_to_the_local_runner_when_wandb_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    ran: list[dict] = []

    def broken_wandb(*args: object) -> None:
        raise RuntimeError("wandb.errors.AuthenticationError: API key not valid")

    def local(trials: list, env: dict, slots: list, jobs: object = None) -> None:
        ran.append({"points": len(trials), "mode": env["WANDB_MODE"]})

    monkeypatch.setattr(tracking, "wandb_online", lambda: True)
    monkeypatch.setattr(launch, "run_wandb", broken_wandb)
    monkeypatch.setattr(launch, "run_local", local)
    assert main(["--obj", "eps_simple", "--profile", "smoke", "--seeds", "2"]) == 1
    assert ran == [{"points": 2, "mode": "offline"}]
    assert "local runner" in capsys.readouterr().err


def test_trials_go_offline_unless_wanted_and_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one place a sweep decides its trials' W&B mode: an explicit mode other than online is
    kept, anything else is online only when wanted and reachable, else offline."""
    monkeypatch.setattr(tracking, "wandb_online", lambda: True)
    env: dict[str, str] = {}
    assert trials_online(env, wanted=True) and "WANDB_MODE" not in env
    assert not trials_online(env, wanted=False) and env["WANDB_MODE"] == "offline"
    disabled = {"WANDB_MODE": "disabled"}
    assert not trials_online(disabled, wanted=True) and disabled["WANDB_MODE"] == "disabled"
    monkeypatch.setattr(tracking, "wandb_online", lambda: False)
    online = {"WANDB_MODE": "online"}
    assert not trials_online(online, wanted=True) and online["WANDB_MODE"] == "offline"


@pytest.mark.parametrize("seeds", ["0", "2,-1", "three", ","])
def test_seeds_selecting_nothing_exit_2_before_anything_runs(
    seeds: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--obj", "eps_simple", "--seeds", seeds]) == 2
    err = capsys.readouterr().err
    assert "SEEDS=" in err and "nothing was started" in err
    assert not (tmp_path / "runs").exists()


def logged_in_run(cwd: Path, key: str, port: int) -> subprocess.CompletedProcess:
    """A short training run as a user logged in to the W&B server at `port` (WANDB_MODE unset)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY=key, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    command = [sys.executable, "-m", "diffbench.run", "experiment=eps_simple", *TINY, "eval.enabled=false"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_run_with_a_rejected_key_logs_offline_instead(tmp_path: Path) -> None:
    """Credentials and a server that answers, but a key W&B rejects: the run says so and finishes
    with an offline W&B run instead of a traceback."""
    with http_server(200) as port:
        proc = logged_in_run(tmp_path, "abc", port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B could not start a run" in proc.stderr and "logging offline instead" in proc.stderr
    (run_dir,) = (tmp_path / "runs" / "eps_simple").iterdir()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_a_run_against_a_silent_server_goes_offline_within_the_bound(tmp_path: Path) -> None:
    """Logged in, and the server accepts connections but never answers: the run spends the probe's
    bound, says so in one line, and trains offline; before, each run waited about 90 s."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        start = time.perf_counter()
        proc = logged_in_run(tmp_path, "x" * 40, server.getsockname()[1])
        elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    notices = [line for line in proc.stderr.splitlines() if "gave no usable answer" in line]
    assert len(notices) == 1 and f"within {tracking.PROBE_SECONDS:g} s; logging offline" in notices[0]
    assert "could not start a run" not in proc.stderr, "wandb.init was never asked to go online"
    (run_dir,) = (tmp_path / "runs" / "eps_simple").iterdir()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert elapsed < 60, f"{elapsed:.0f} s: the silent server held the run up"
