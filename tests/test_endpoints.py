"""A service that is down (MLflow tracking server, the S3 endpoint of the DVC remote): bounded retries, then
one clear ServiceUnavailable, and from the CLI one line and exit 2. The "down" service is a loopback port
that nothing listens on, so each case takes well under a second. That the probes are all that is tried
(not an MLflow or S3 client's own minutes of retries) is counted, not timed: ``retry`` logs each failed
attempt, and the environment's policy (2 attempts) differs from the default (3)."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from longshort.cli import app
from longshort.config import ConfigError, load_profile
from longshort.endpoints import RetryPolicy, ServiceUnavailable, display_url, require_reachable, retry

FAST = {"LONGSHORT_RETRIES": "2", "LONGSHORT_RETRY_BACKOFF_S": "0.05", "LONGSHORT_RETRY_TIMEOUT_S": "2"}


@pytest.fixture()
def fast_retries(monkeypatch):
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture()
def attempts(caplog):
    """The failed attempts ``retry`` logged so far, as (service, url, i, n, reason)."""
    caplog.set_level(logging.INFO, logger="longshort.endpoints")

    def logged() -> list[tuple]:
        return [r.args for r in caplog.records if r.name == "longshort.endpoints" and "attempt %d of %d" in r.msg]

    return logged


@pytest.fixture()
def dead_url() -> Iterator[str]:
    """A port bound for the whole test but not listening: a connection is refused, and no server started
    meanwhile (another test's, another process's) can take the port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def test_policy_defaults_env_and_backoff():
    assert RetryPolicy.from_env({}) == RetryPolicy(attempts=3, backoff_s=1.0, timeout_s=5.0)
    assert RetryPolicy.from_env({}).waits_s() == [1.0, 2.0]
    policy = RetryPolicy.from_env({"LONGSHORT_RETRIES": "6", "LONGSHORT_RETRY_BACKOFF_S": "3"})
    assert policy.waits_s() == [3.0, 6.0, 10.0, 10.0, 10.0]  # doubling, capped at max_backoff_s
    with pytest.raises(ConfigError, match="LONGSHORT_RETRIES='many' is not an integer"):
        RetryPolicy.from_env({"LONGSHORT_RETRIES": "many"})
    with pytest.raises(ConfigError, match="attempts >= 1"):
        RetryPolicy.from_env({"LONGSHORT_RETRIES": "0"})


def test_retry_waits_between_attempts_and_stops_at_success():
    calls, waits = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    policy = RetryPolicy(attempts=4, backoff_s=0.5)
    assert retry(flaky, service="svc", url="http://h", policy=policy, sleep=waits.append) == "ok"
    assert len(calls) == 3 and waits == [0.5, 1.0]


def test_retry_gives_up_with_one_clear_error_and_passes_bugs_through():
    waits: list[float] = []

    def down() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ServiceUnavailable) as err:
        retry(down, service="MLflow tracking server", url="http://user:pw@h:5000", policy=RetryPolicy(attempts=2),
              sleep=waits.append)  # fmt: skip
    assert str(err.value) == "MLflow tracking server at http://h:5000 is not reachable after 2 attempts: Connection refused"
    assert waits == [1.0] and isinstance(err.value.__cause__, ConnectionRefusedError)

    def bug() -> None:
        raise KeyError("not a network problem")

    with pytest.raises(KeyError):  # not transient: no retries, no disguise
        retry(bug, service="s", url="http://h", policy=RetryPolicy(attempts=5), sleep=waits.append)
    assert waits == [1.0]
    assert display_url("https://a:b@example.org:8443/x") == "https://example.org:8443/x"


def test_probe_accepts_any_http_answer_and_refuses_a_dead_port(dead_url, attempts):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        require_reachable(f"http://127.0.0.1:{server.server_port}", "svc", path="/health", policy=RetryPolicy(attempts=1))
    finally:
        server.shutdown()
        server.server_close()
    require_reachable("sqlite:///nowhere/mlflow.db", "svc")  # nothing to probe
    assert attempts() == []  # the 404 answered at once
    with pytest.raises(ServiceUnavailable, match=rf"^svc at {dead_url} is not reachable after 3 attempts: Connection refused$"):
        require_reachable(dead_url, "svc", policy=RetryPolicy(attempts=3, backoff_s=0.05))
    assert attempts() == [("svc", dead_url, i, 3, "Connection refused") for i in (1, 2, 3)]


def test_tracking_to_a_dead_server_fails_fast_and_writes_nothing(tmp_path, fast_retries, dead_url, attempts):
    import mlflow

    from longshort import tracking

    before = mlflow.get_tracking_uri()
    profile = load_profile("smoke", [f"tracking.tracking_uri={dead_url}", f"run.workspace={tmp_path / 'ws'}"])
    with pytest.raises(ServiceUnavailable, match=rf"MLflow tracking server at {dead_url} is not reachable after 2 attempts"):
        tracking.configure(profile)
    # the environment's policy, and only the probe: MLflow's client never got the URL to retry on its own
    assert attempts() == [("MLflow tracking server", dead_url, i, 2, "Connection refused") for i in (1, 2)]
    assert mlflow.get_tracking_uri() == before and not (tmp_path / "ws").exists()


runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("command", [["compare"], ["promote", "some-run-id"], ["run"]])
def test_cli_reports_a_dead_tracking_server_in_one_line(tmp_path, fast_retries, dead_url, attempts, command):
    result = runner.invoke(app, [*command, "-p", "smoke", "-s", f"tracking.tracking_uri={dead_url}",
                                 "-s", f"run.workspace={tmp_path / 'ws'}"])  # fmt: skip
    line = _one_line_error(result)
    assert line == f"error: MLflow tracking server at {dead_url} is not reachable after 2 attempts: Connection refused"
    assert [a[2:4] for a in attempts()] == [(1, 2), (2, 2)] and not (tmp_path / "ws").exists()


def test_dvc_push_to_a_dead_s3_endpoint_fails_before_dvc_runs(tmp_path, fast_retries, dead_url, attempts):
    from tasks.versioning import Remote, version_stages

    (tmp_path / ".dvc").mkdir()
    remote = Remote(url="s3://longshort/dvc", endpoint_url=dead_url)
    with pytest.raises(ServiceUnavailable) as err:
        version_stages(["synthesize"], remote, tmp_path)
    assert str(err.value) == (
        f"S3 endpoint of DVC remote s3://longshort/dvc at {dead_url} is not reachable after 2 attempts: Connection refused"
    )
    assert [a[2:4] for a in attempts()] == [(1, 2), (2, 2)]
    assert list((tmp_path / ".dvc").iterdir()) == []  # no remote configured, nothing reproduced or pushed


def test_cli_names_a_bad_retry_setting_in_one_line(tmp_path, dead_url, monkeypatch):
    monkeypatch.setenv("LONGSHORT_RETRIES", "many")
    result = runner.invoke(app, ["compare", "-p", "smoke", "-s", f"tracking.tracking_uri={dead_url}",
                                 "-s", f"run.workspace={tmp_path / 'ws'}"])  # fmt: skip
    assert _one_line_error(result) == "error: LONGSHORT_RETRIES='many' is not an integer"
    assert not (tmp_path / "ws").exists()


def test_stopping_a_service_whose_leader_died_stops_the_children_left_in_its_group():
    """A service's leader can die on its own (a crash, a kill by hand) while its workers live on in its process
    group holding ports: `services down` still stops them, by the group the leader's PID names."""
    import signal
    import subprocess
    import sys
    import time

    from infra.services import _group_alive, stop_process

    leader = subprocess.Popen(  # a leader in its own group with a child that outlives it
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
         "'import time; time.sleep(60)']); time.sleep(60)"],
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(open(f"/proc/{leader.pid}/task/{leader.pid}/children").read().split()) < 1:
        time.sleep(0.05)
    leader.send_signal(signal.SIGKILL)
    leader.wait()
    assert _group_alive(leader.pid)  # the child lives on in the group
    stop_process("mlflow", leader.pid, timeout_s=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_alive(leader.pid):
        time.sleep(0.05)
    assert not _group_alive(leader.pid)


def test_services_up_refuses_a_disk_where_seaweedfs_would_keep_its_volumes_read_only(tmp_path, monkeypatch):
    """Below its free-space floor SeaweedFS marks every volume read-only and an S3 PUT hangs until the client's
    read timeout (the symptom of a failed CI run's `dvc push`): `up` names the disk and the floor, and starts nothing."""
    import shutil

    from infra import services

    free_mib = shutil.disk_usage(tmp_path).free / 2**20
    monkeypatch.setattr(services, "WEED_MIN_FREE_MIB", int(free_mib) + 1024)
    with pytest.raises(services.ServiceError, match=r"only \d+ MiB free on the disk of .*seaweedfs; below \d+ MiB"):
        services.up(tmp_path / "state", timeout_s=5)
    layout = services.Layout(tmp_path / "state")
    assert list(layout.pids.iterdir()) == [] and not layout.state_file.exists()
    argv = services._weed_argv(layout, dict.fromkeys(services.PORT_NAMES, 1))
    assert f"-volume.minFreeSpace={int(free_mib) + 1024}MiB" in argv  # the server's floor is the one `up` checks
