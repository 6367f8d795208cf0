"""The service profile's servers, on loopback (DESIGN §7).

    python -m infra.services up|down|status|env [--state-dir DIR]

``up`` starts, in one state folder (default ``workspace/services``):

* PostgreSQL (``initdb`` with trust auth, listening on 127.0.0.1 only) with the
  databases ``mlflow`` and ``prefect``;
* SeaweedFS (``weed server -s3``) as the S3 endpoint, with one generated access
  key (kept in ``s3-config.json``, mode 0600, never in the repository) and the
  bucket ``longshort``;
* ``mlflow server`` on PostgreSQL, serving artifacts from ``s3://longshort/mlflow``
  (only the server holds S3 credentials; clients go through it);
* ``prefect server start`` on PostgreSQL, the process work pool ``gpu`` and a
  ``prefect worker`` on it whose environment points flow runs at these services.

Every process writes a PID file under ``pids/`` and a log under ``logs/``, and is
stopped by that PID (its process group), escalating to SIGKILL after a timeout.
Ports are picked free at start and recorded, without secrets, in ``services.json``.
``env`` prints the ``export`` lines a shell needs to use the services.
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

from longshort.io import atomic_write_text

log = logging.getLogger("infra.services")

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEFAULT_STATE_DIR = REPO / "workspace" / "services"
HOST = "127.0.0.1"
BUCKET = "longshort"
MLFLOW_ARTIFACTS = f"s3://{BUCKET}/mlflow"
DVC_REMOTE = f"s3://{BUCKET}/dvc"
WORK_POOL = "gpu"
DB_USER = "longshort"
REGION = "us-east-1"

# Start order; ``down`` stops them in reverse.
SERVICES = ("postgres", "seaweedfs", "mlflow", "prefect", "worker")
# A word that must appear in a PID's command line before we signal it (PIDs get reused).
CMDLINE_MARKER = {"postgres": "postgres", "seaweedfs": "weed", "mlflow": "mlflow", "prefect": "prefect", "worker": "worker"}
# SeaweedFS drains for 15 s or more on SIGTERM; PostgreSQL's fast shutdown is SIGINT.
STOP_TIMEOUT_S = {"postgres": 30.0, "seaweedfs": 20.0, "mlflow": 15.0, "prefect": 20.0, "worker": 20.0}
# Below this much free disk SeaweedFS marks every volume read-only, and an S3 PUT then hangs until the client's
# read timeout instead of failing. Its default, 1% of the disk, is 2.5 GB on a 252 GB disk: a fixed floor suits
# one local node better. `up` refuses to start below it and checks that an object can be written.
WEED_MIN_FREE_MIB = 256
PORT_NAMES = (
    "postgres", "mlflow", "prefect", "s3", "s3_grpc", "weed_master", "weed_master_grpc",
    "weed_volume", "weed_volume_grpc", "weed_filer", "weed_filer_grpc",
)  # fmt: skip


class ServiceError(RuntimeError):
    """A service that could not be started or reached; the message names it and its log."""


@dataclass
class ServiceState:
    """What ``services.json`` records: no secrets, only where things are."""

    state_dir: str
    ports: dict[str, int] = field(default_factory=dict)
    postgres_data: str = ""
    repo_dir: str = ""
    worker_name: str = ""

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def postgres_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}@{HOST}:{self.ports['postgres']}/{database}"


class Layout:
    """Paths inside a state folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.state_file = self.root / "services.json"
        self.s3_config = self.root / "s3-config.json"
        self.weed_dir = self.root / "seaweedfs"
        self.prefect_home = self.root / "prefect"
        self.logs = self.root / "logs"
        self.pids = self.root / "pids"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    def read_pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def load(self) -> ServiceState:
        if not self.state_file.is_file():
            raise ServiceError(f"no services recorded in {self.root} (run `python -m infra.services up` first)")
        return ServiceState(**json.loads(self.state_file.read_text()))

    def save(self, state: ServiceState) -> None:
        atomic_write_text(self.state_file, json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")


# --- credentials -----------------------------------------------------------------------------------


def s3_credentials(layout: Layout) -> tuple[str, str]:
    """The access key and secret of the state folder, generated on first use (file mode 0600)."""
    if not layout.s3_config.is_file():
        access_key = "longshort" + secrets.token_hex(6)
        secret_key = secrets.token_urlsafe(30)
        identity = {
            "name": "longshort",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        # atomic: a crash mid-write must not leave an empty file that every later start fails to parse
        atomic_write_text(layout.s3_config, json.dumps({"identities": [identity]}, indent=2), mode=0o600)
    cred = json.loads(layout.s3_config.read_text())["identities"][0]["credentials"][0]
    return cred["accessKey"], cred["secretKey"]


def client_env(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, str]:
    """Environment for a shell, a test or the worker: where MLflow, Prefect, S3 and the DVC remote are."""
    layout = Layout(state_dir)
    state = layout.load()
    access_key, secret_key = s3_credentials(layout)
    return {
        "MLFLOW_TRACKING_URI": state.mlflow_url,
        "PREFECT_API_URL": state.prefect_api_url,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "LONGSHORT_S3_ENDPOINT_URL": state.s3_endpoint_url,
        "LONGSHORT_DVC_REMOTE": DVC_REMOTE,
    }


# --- processes -------------------------------------------------------------------------------------


def _free_port(preferred: int | None, taken: set[int]) -> int:
    """``preferred`` (the port of the last start) when it is free, else any free loopback port."""
    for candidate in (preferred, 0, 0, 0):
        if candidate is None or candidate in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, candidate))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise ServiceError("no free port on 127.0.0.1")


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child that exited
    except ChildProcessError:
        pass
    proc_stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self").exists():
        try:
            return proc_stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def stop_process(name: str, pid: int, timeout_s: float) -> None:
    """Stop one service by its PID: its process group gets SIGTERM (PostgreSQL: SIGINT), then SIGKILL."""
    if not _alive(pid):
        # the leader died (crashed, killed by hand) but children of its group may live on holding ports: no process
        # has the PID, so a group of that id is the leftovers of ours (a new group takes the id of a live leader)
        _stop_group(pid)
        return
    cmd = _cmdline(pid)
    if cmd and CMDLINE_MARKER[name] not in cmd:
        log.warning("%s: PID %d now runs %r; leaving it alone", name, pid, cmd[:120])
        return
    try:
        if name == "postgres":
            os.kill(pid, signal.SIGINT)  # the postmaster shuts its backends down itself
        else:
            os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait(lambda: not _alive(pid), timeout_s):
        log.warning("%s (PID %d) still running %.0f s after the stop signal: sending SIGKILL", name, pid, timeout_s)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait(lambda: not _alive(pid), 10)
    # Children left in its group (uvicorn workers, flow-run processes): the group id is the leader's PID,
    # which Linux does not hand out again while the group has members.
    _stop_group(pid)


def _stop_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, to what is left in process group ``pgid`` (nothing when it is empty)."""
    try:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
            if not _wait(lambda: not _group_alive(pgid), 5):
                os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group emptied between the check and the signal
        pass


def _tail(path: Path, n_lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n_lines:])
    except OSError:
        return "(no log)"


def _spawn(
    layout: Layout,
    name: str,
    argv: list[str],
    env: Mapping[str, str],
    cwd: Path | None = None,
    user: pwd.struct_passwd | None = None,
) -> int:
    as_user: dict[str, Any] = {}
    if user is not None:
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with open(layout.log(name), "ab") as log_file:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=dict(env), cwd=cwd, start_new_session=True, **as_user,
        )  # fmt: skip
    atomic_write_text(layout.pid_file(name), f"{proc.pid}\n")
    log.info("%s: started, PID %d, log %s", name, proc.pid, layout.log(name))
    return proc.pid


def _wait_healthy(layout: Layout, name: str, check: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``check`` until it is true; fail naming the service and its log."""
    pid = layout.read_pid(name)
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        if pid is None or not _alive(pid):
            raise ServiceError(f"{name} exited while starting; see {layout.log(name)}:\n{_tail(layout.log(name))}")
        try:
            if check():
                log.info("%s: healthy", name)
                return
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not ready yet"
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise ServiceError(
                f"{name} was not healthy within {timeout_s:.0f} s (last probe error: {last_error or 'none'}); "
                f"see {layout.log(name)}:\n{_tail(layout.log(name))}"
            )
        time.sleep(0.5)


def _http(url: str, body: dict[str, Any] | None = None) -> bytes:
    """GET ``url`` (POST a JSON ``body`` when given); raises on a connection error or an HTTP error."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3) as response:
        return response.read()


def _port_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=2):
        return True


# --- PostgreSQL ------------------------------------------------------------------------------------


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: PATH, /usr/local/bin, or Debian's /usr/lib/postgresql/*/bin."""
    candidates = [Path(p).parent for p in (shutil.which("initdb"),) if p]
    candidates.append(Path("/usr/local/bin"))
    candidates += [Path(p) for p in sorted(glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "postgres").is_file()), None)


def _version_key(path: str) -> tuple[int, ...]:
    part = Path(path).parent.name
    return tuple(int(x) for x in part.split(".") if x.isdigit())


def _postgres_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: then it runs as ``postgres`` (or ``nobody``)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServiceError("running as root and neither user 'postgres' nor 'nobody' exists to run PostgreSQL")


def _traversable_by(path: Path, user: pwd.struct_passwd) -> bool:
    groups = {user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)}
    for folder in (path, *path.parents):
        st = folder.stat()
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _postgres_data_dir(layout: Layout, user: pwd.struct_passwd | None) -> Path:
    if user is None or _traversable_by(layout.root, user):
        return layout.root / "postgres"
    # e.g. pytest's 0700 temporary folders: the postgres user cannot reach them
    digest = hashlib.sha256(str(layout.root).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"longshort-pg-{digest}" / "data"


def _init_postgres(layout: Layout, pg_bin: Path, data: Path, user: pwd.struct_passwd | None) -> None:
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    if user is not None:
        os.chown(data, user.pw_uid, user.pw_gid)
    as_user: dict[str, Any] = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    argv = [str(pg_bin / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "--no-locale", "-E", "UTF8"]
    with open(layout.log("initdb"), "ab") as log_file:
        done = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                              timeout=300, check=False, **as_user)  # fmt: skip
    if done.returncode:
        raise ServiceError(f"initdb failed (exit {done.returncode}); see {layout.log('initdb')}")


def _postgres_ready(state: ServiceState) -> bool:
    import psycopg2  # noqa: PLC0415

    psycopg2.connect(host=HOST, port=state.ports["postgres"], user=DB_USER, dbname="postgres", connect_timeout=2).close()
    return True


def _create_databases(state: ServiceState, names: tuple[str, ...] = ("mlflow", "prefect")) -> None:
    import psycopg2  # noqa: PLC0415
    from psycopg2 import sql  # noqa: PLC0415

    conn = psycopg2.connect(host=HOST, port=state.ports["postgres"], user=DB_USER, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


# --- SeaweedFS, MLflow, Prefect --------------------------------------------------------------------


def _weed_argv(layout: Layout, ports: dict[str, int]) -> list[str]:
    weed = VENV_BIN / "weed" if (VENV_BIN / "weed").is_file() else Path(shutil.which("weed") or "weed")
    argv = [
        str(weed), "server", "-s3", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={layout.weed_dir}",
        f"-master.port={ports['weed_master']}", f"-master.port.grpc={ports['weed_master_grpc']}",
        f"-volume.port={ports['weed_volume']}", f"-volume.port.grpc={ports['weed_volume_grpc']}",
        f"-filer.port={ports['weed_filer']}", f"-filer.port.grpc={ports['weed_filer_grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={layout.s3_config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra catalog listeners we do not use
        "-master.telemetry=false", "-volume.preStopSeconds=1",
        "-master.volumeSizeLimitMB=1024", "-volume.max=32", f"-volume.minFreeSpace={WEED_MIN_FREE_MIB}MiB",
    ]  # fmt: skip
    sockets = {"filer": layout.weed_dir / "filer.sock", "s3": layout.weed_dir / "s3.sock"}
    if all(len(str(p)) < 100 for p in sockets.values()):  # unix socket paths are short
        argv += [f"-filer.localSocket={sockets['filer']}", f"-s3.localSocket={sockets['s3']}"]
    return argv


def s3_client(state: ServiceState, access_key: str, secret_key: str) -> Any:
    import boto3  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    return boto3.client(
        "s3", endpoint_url=state.s3_endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name=REGION, config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}),
    )  # fmt: skip


def _ensure_bucket(client: Any) -> bool:
    from botocore.exceptions import ClientError  # noqa: PLC0415

    try:
        client.head_bucket(Bucket=BUCKET)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        client.create_bucket(Bucket=BUCKET)
    return True


def _s3_writable(client: Any) -> bool:
    """The bucket exists and takes an object: a PUT needs a writable volume, which a bucket alone does not."""
    _ensure_bucket(client)
    key = "_health/probe"
    client.put_object(Bucket=BUCKET, Key=key, Body=b"ok")
    if client.get_object(Bucket=BUCKET, Key=key)["Body"].read() != b"ok":
        raise ServiceError("seaweedfs returned another body for the probe object")
    client.delete_object(Bucket=BUCKET, Key=key)
    return True


def _check_weed_disk(layout: Layout) -> None:
    free_mib = shutil.disk_usage(layout.weed_dir).free / 2**20
    if free_mib < WEED_MIN_FREE_MIB:
        raise ServiceError(
            f"seaweedfs: only {free_mib:.0f} MiB free on the disk of {layout.weed_dir}; below "
            f"{WEED_MIN_FREE_MIB} MiB it keeps its volumes read-only and S3 writes hang. Free some space first."
        )


def _mlflow_argv(state: ServiceState) -> list[str]:
    return [
        str(VENV_BIN / "mlflow"), "server", "--host", HOST, "--port", str(state.ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", state.postgres_url("mlflow", "postgresql+psycopg2"),  # SQLAlchemy 2.1 defaults to psycopg 3
        "--artifacts-destination", MLFLOW_ARTIFACTS, "--serve-artifacts",
    ]  # fmt: skip


def _default_process_template() -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker  # noqa: PLC0415

    return ProcessWorker.get_default_base_job_template()


def _ensure_work_pool(state: ServiceState) -> None:
    body = {"name": WORK_POOL, "type": "process", "base_job_template": _default_process_template()}
    try:
        _http(f"{state.prefect_api_url}/work_pools/", body)
        log.info("prefect: created work pool %r (process)", WORK_POOL)
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # 409: it exists already
            raise ServiceError(f"prefect: creating work pool {WORK_POOL!r} failed: HTTP {exc.code}") from exc


def _worker_online(state: ServiceState) -> bool:
    workers = json.loads(_http(f"{state.prefect_api_url}/work_pools/{WORK_POOL}/workers/filter", {}))
    return any(w["name"] == state.worker_name and w["status"] == "ONLINE" for w in workers)


# --- up / down / status ----------------------------------------------------------------------------


def _running(layout: Layout) -> dict[str, int]:
    return {n: pid for n in SERVICES if (pid := layout.read_pid(n)) is not None and _alive(pid)}


def up(
    state_dir: Path = DEFAULT_STATE_DIR,
    *,
    repo_dir: Path = REPO,
    worker_env: Mapping[str, str] | None = None,
    prefect_ui: bool = True,
    timeout_s: float = 180.0,
) -> ServiceState:
    """Start every service in ``state_dir``; on any failure stop what was started and raise ServiceError.

    ``repo_dir`` is the checkout the worker starts in (also exported to it as ``LONGSHORT_REPO_DIR``,
    the path ``prefect deploy`` / ``flows.deploy`` put in the deployment's pull step);
    ``worker_env`` adds to the worker's environment.
    """
    layout = Layout(state_dir)
    for folder in (layout.root, layout.logs, layout.pids, layout.weed_dir, layout.prefect_home):
        folder.mkdir(parents=True, exist_ok=True)
    if running := _running(layout):
        raise ServiceError(f"services already running in {layout.root}: {running} (run `down` first)")
    _check_weed_disk(layout)
    pg_bin = find_postgres_bin()
    if pg_bin is None:
        raise ServiceError("PostgreSQL binaries (initdb, postgres) not found: run infra/ensure-postgres.sh")
    previous = layout.load().ports if layout.state_file.is_file() else {}
    taken: set[int] = set()
    ports = {}
    for name in PORT_NAMES:
        ports[name] = _free_port(previous.get(name), taken)
        taken.add(ports[name])
    pg_user = _postgres_user()
    state = ServiceState(
        state_dir=str(layout.root),
        ports=ports,
        postgres_data=str(_postgres_data_dir(layout, pg_user)),
        repo_dir=str(Path(repo_dir).resolve()),
        worker_name=f"longshort-{socket.gethostname()}",
    )
    layout.save(state)
    access_key, secret_key = s3_credentials(layout)
    base_env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        base_env.pop(name, None)
    try:
        _init_postgres(layout, pg_bin, Path(state.postgres_data), pg_user)
        pg_argv = [
            str(pg_bin / "postgres"), "-D", state.postgres_data, "-p", str(ports["postgres"]),
            "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
        ]  # fmt: skip
        _spawn(layout, "postgres", pg_argv, base_env, cwd=Path(tempfile.gettempdir()), user=pg_user)
        _spawn(layout, "seaweedfs", _weed_argv(layout, ports), base_env, cwd=layout.weed_dir)
        _wait_healthy(layout, "postgres", lambda: _postgres_ready(state), timeout_s)
        _create_databases(state)

        server_s3_env = {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": state.s3_endpoint_url,
        }
        # job execution (GenAI scorers, trace rollups) would add seven huey worker processes we do not use
        mlflow_env = {**base_env, **server_s3_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        _spawn(layout, "mlflow", _mlflow_argv(state), mlflow_env, cwd=layout.root)
        prefect_env = {
            **base_env,
            "PREFECT_HOME": str(layout.prefect_home),
            "PREFECT_API_DATABASE_CONNECTION_URL": state.postgres_url("prefect", "postgresql+asyncpg"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true" if prefect_ui else "false",
        }
        prefect_argv = [str(VENV_BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(ports["prefect"])]
        _spawn(layout, "prefect", prefect_argv, prefect_env, cwd=layout.root)

        s3 = s3_client(state, access_key, secret_key)
        _wait_healthy(layout, "seaweedfs", lambda: _s3_writable(s3), timeout_s)
        _wait_healthy(layout, "mlflow", lambda: _http(f"{state.mlflow_url}/health") == b"OK", timeout_s)
        _wait_healthy(layout, "prefect", lambda: json.loads(_http(f"{state.prefect_api_url}/health")) is True, timeout_s)
        _ensure_work_pool(state)

        worker_env_full = {
            **prefect_env,
            **client_env(layout.root),
            "LONGSHORT_REPO_DIR": state.repo_dir,
            **(worker_env or {}),
        }
        for name in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_UI_ENABLED"):
            worker_env_full.pop(name, None)
        worker_argv = [
            str(VENV_BIN / "prefect"), "--no-prompt", "worker", "start", "--pool", WORK_POOL, "--type", "process",
            "--name", state.worker_name, "--limit", "1", "--install-policy", "never", "--no-create-pool-if-not-found",
        ]  # fmt: skip
        _spawn(layout, "worker", worker_argv, worker_env_full, cwd=Path(state.repo_dir))
        _wait_healthy(layout, "worker", lambda: _worker_online(state), timeout_s)
    except BaseException:
        down(layout.root)
        raise
    return state


def down(state_dir: Path = DEFAULT_STATE_DIR, *, purge: bool = False) -> None:
    """Stop every service recorded in ``state_dir`` by its PID.

    ``purge`` also deletes their data (databases, objects, Prefect home, S3 credentials); logs stay.
    """
    layout = Layout(state_dir)
    for name in reversed(SERVICES):
        pid = layout.read_pid(name)
        if pid is None:
            continue
        start = time.monotonic()
        stop_process(name, pid, STOP_TIMEOUT_S[name])
        layout.pid_file(name).unlink(missing_ok=True)
        log.info("%s: stopped (PID %d) in %.1f s", name, pid, time.monotonic() - start)
    if purge and layout.state_file.is_file():
        pg_data = Path(layout.load().postgres_data)
        outside = not pg_data.is_relative_to(layout.root)
        for folder in (pg_data.parent if outside else pg_data, layout.weed_dir, layout.prefect_home):
            shutil.rmtree(folder, ignore_errors=True)
        layout.s3_config.unlink(missing_ok=True)
        layout.state_file.unlink()


def status(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, dict[str, Any]]:
    """Per service: PID, whether it runs, whether it answers, and its log."""
    layout = Layout(state_dir)
    state = layout.load()
    probes: dict[str, Callable[[], bool]] = {
        "postgres": lambda: _postgres_ready(state),
        "seaweedfs": lambda: _port_open(state.ports["s3"]),
        "mlflow": lambda: _http(f"{state.mlflow_url}/health") == b"OK",
        "prefect": lambda: json.loads(_http(f"{state.prefect_api_url}/health")) is True,
        "worker": lambda: _worker_online(state),
    }
    report = {}
    for name in SERVICES:
        pid = layout.read_pid(name)
        running = pid is not None and _alive(pid)
        try:
            healthy = running and probes[name]()
        except Exception:  # noqa: BLE001 - a failed probe is the answer "unhealthy"
            healthy = False
        report[name] = {"pid": pid, "running": running, "healthy": healthy, "log": str(layout.log(name))}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="default: %(default)s")
    parser.add_argument("--repo-dir", type=Path, default=REPO, help="checkout the worker runs flows from (up)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds each service may take to start (up)")
    parser.add_argument("--purge", action="store_true", help="down: also delete databases, objects and credentials")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "up":
            state = up(args.state_dir, repo_dir=args.repo_dir, timeout_s=args.timeout)
            log.info(
                "MLflow %s | Prefect %s | S3 %s | work pool %r\nshell: eval \"$(%s -m infra.services env)\"",
                state.mlflow_url, state.prefect_api_url, state.s3_endpoint_url, WORK_POOL, sys.executable,
            )  # fmt: skip
        elif args.command == "down":
            down(args.state_dir, purge=args.purge)
        elif args.command == "status":
            report = status(args.state_dir)
            for name, row in report.items():
                sys.stdout.write(
                    f"{name:10s} pid={row['pid']!s:8s} running={row['running']!s:5s} "
                    f"healthy={row['healthy']!s:5s} log={row['log']}\n"
                )
            return 0 if all(row["healthy"] for row in report.values()) else 1
        else:
            for key, value in client_env(args.state_dir).items():
                sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
    except ServiceError as exc:
        log.error("error: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
