"""DVC versioning of the data stages (DESIGN §4): an S3 remote from the environment, repro, push, pull.

Credentials never reach DVC's config files or our logs: DVC's S3 client reads
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the environment itself,
and ``.dvc/config.local`` (git-ignored by ``dvc init``) holds only the remote's
URL and endpoint. Each step runs the venv's ``dvc`` in a subprocess and raises
DVCError, with DVC's own message, when it fails.

The environment (``python -m infra.services env`` prints it for the local services):

* ``LONGSHORT_DVC_REMOTE``: the remote URL, e.g. ``s3://longshort/dvc``;
* ``LONGSHORT_S3_ENDPOINT_URL``: an S3 endpoint other than AWS (SeaweedFS, MinIO), optional;
* ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (or any other source boto3 knows).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from longshort.config import DataConfig, DemoTaskConfig, load_yaml
from longshort.endpoints import require_reachable
from longshort.io import file_digest

log = logging.getLogger(__name__)

REMOTE_ENV = "LONGSHORT_DVC_REMOTE"
ENDPOINT_ENV = "LONGSHORT_S3_ENDPOINT_URL"
REMOTE_NAME = "storage"
# Values of these variables are blanked out of any DVC output we repeat.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class DVCError(RuntimeError):
    """A DVC command that failed; the message has the command, the folder and DVC's error."""


@dataclass(frozen=True)
class Remote:
    url: str
    endpoint_url: str | None = None
    name: str = REMOTE_NAME

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Remote | None:
        """The remote that ``LONGSHORT_DVC_REMOTE`` names, or None when it is not set."""
        url = environ.get(REMOTE_ENV, "").strip()
        if not url:
            return None
        return cls(url=url, endpoint_url=environ.get(ENDPOINT_ENV, "").strip() or None)


def dvc_executable() -> str:
    beside = Path(sys.executable).parent / "dvc"
    found = str(beside) if beside.is_file() else shutil.which("dvc")
    if not found:
        raise DVCError(f"no `dvc` next to {sys.executable} or on PATH (pip install 'dvc[s3]')")
    return found


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) that holds ``.dvc/``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise DVCError(f"{here} is not inside a DVC project (no .dvc/ folder above it)")


def _redact(text: str) -> str:
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return text


def run_dvc(repo: Path, *args: str, timeout_s: float = 900) -> str:
    """Run ``dvc ARGS`` in ``repo``; return its stdout, or raise DVCError with its stderr."""
    exe = dvc_executable()
    # dvc.yaml's commands (e.g. `longshort synthesize`) live next to dvc in the venv
    env = {**os.environ, "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    command = f"dvc {' '.join(args)}"
    log.info("%s (in %s)", command, repo)
    try:
        done = subprocess.run(  # another run's dvc may hold the repo lock: wait for it (DVC gives up after ~3 s)
            [exe, "--wait-for-lock", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise DVCError(f"`{command}` in {repo} did not finish within {timeout_s:.0f} s") from exc
    if done.returncode:
        detail = _redact((done.stderr.strip() or done.stdout.strip())[-4000:])
        raise DVCError(f"`{command}` failed in {repo} (exit {done.returncode}):\n{detail}")
    return done.stdout


def configure_remote(repo: Path, remote: Remote) -> None:
    """Make ``remote`` the project's default in ``.dvc/config.local``: its URL and endpoint, no credentials."""
    run_dvc(repo, "remote", "add", "--local", "--force", "--default", remote.name, remote.url)
    if remote.endpoint_url:
        run_dvc(repo, "remote", "modify", "--local", remote.name, "endpointurl", remote.endpoint_url)


def repro(repo: Path, stages: Sequence[str] = ()) -> None:
    """``dvc repro`` of the given stages (all when empty); unchanged stages are skipped by DVC."""
    run_dvc(repo, "repro", *stages)


def push(repo: Path, targets: Sequence[str] = (), remote: str | None = None) -> None:
    run_dvc(repo, "push", *(["--remote", remote] if remote else []), *targets)


def pull(repo: Path, targets: Sequence[str] = (), remote: str | None = None) -> None:
    run_dvc(repo, "pull", *(["--remote", remote] if remote else []), *targets)


def lock_digests(repo: Path, stages: Sequence[str] = ()) -> dict[str, str]:
    """``{output path: md5}`` from ``dvc.lock`` for the given stages (all when empty)."""
    lock_file = Path(repo) / "dvc.lock"
    if not lock_file.is_file():
        raise DVCError(f"{lock_file} does not exist: run `dvc repro` first")
    lock = yaml.safe_load(lock_file.read_text()) or {}
    return {
        out["path"]: out["md5"]
        for name, stage in (lock.get("stages") or {}).items()
        if not stages or name in stages
        for out in stage.get("outs", [])
    }


def require_remote(remote: Remote) -> None:
    """The remote's S3 endpoint must answer (retried as ``longshort.endpoints`` says), else ServiceUnavailable.

    DVC's own S3 client would retry a dead endpoint for minutes and then fail with a long traceback.
    Without an endpoint (AWS itself) there is nothing to probe.
    """
    if remote.endpoint_url:
        require_reachable(remote.endpoint_url, f"S3 endpoint of DVC remote {remote.url}")


def read_params_demo(params_file: Path) -> DemoTaskConfig:
    """``params_file``'s ``demo`` section, the settings dvc.yaml's ``synthesize`` stage writes the splits from.
    A file that cannot be read raises OSError; anything else wrong, a ValueError naming the file (and the field)."""
    from pydantic import ValidationError  # noqa: PLC0415

    from longshort.config import format_validation_error, yaml_error  # noqa: PLC0415

    params_file = Path(params_file)
    try:
        data = load_yaml(params_file.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict) or not isinstance(data.get("demo", {}), dict):
            raise ValueError(f"{params_file}: expected a mapping with a 'demo' section")
        return DemoTaskConfig.model_validate(data.get("demo", {}))
    except ValidationError as exc:
        raise ValueError(format_validation_error(params_file, exc, section="demo")) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{params_file}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ValueError(yaml_error(params_file, exc)) from None


def demo_params_mismatch(data: DataConfig, params_file: Path) -> str | None:
    """Why the splits dvc.yaml's ``synthesize`` stage writes (``params_file``'s ``demo`` section, as
    ``longshort synthesize`` reads it) are not the data ``data`` describes, naming the fields; None when they are."""
    if data.source != "demo":
        return f"data.source is '{data.source}', not 'demo'"
    params_file = Path(params_file)
    try:
        synthesized = read_params_demo(params_file)
    except (OSError, ValueError) as exc:
        return f"{params_file} has no valid 'demo' section ({str(exc).splitlines()[0]})"
    if synthesized != data.demo:
        theirs = synthesized.model_dump()
        changed = sorted(f"data.demo.{k}" for k, v in data.demo.model_dump().items() if theirs[k] != v)
        return f"{', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} from {params_file}'s 'demo' section"
    return None


def unversioned_reason(data: Mapping, repo: Path | None = None) -> str | None:
    """Why dvc.yaml's ``synthesize`` stage would not write the data a run with this ``data`` section uses,
    or None when it would.

    That stage synthesizes params.yaml's ``demo`` section; pushing it for a run whose data come from a file,
    a hub id, a teacher or other demo settings would version data the run never saw.
    """
    cfg = DataConfig.model_validate(data)
    if cfg.source != "demo":
        return f"data.source is '{cfg.source}': dvc.yaml versions only the demo task's splits"
    return demo_params_mismatch(cfg, project_root(repo) / "params.yaml")


def version_stages(
    stages: Sequence[str], remote: Remote, repo: Path | None = None, expect: Mapping[str, str | Path] | None = None
) -> dict[str, str]:
    """Reproduce ``stages`` and push their outputs to ``remote``; return the pushed outputs' digests.

    ``expect`` maps a DVC output path to the file the run itself wrote: when their bytes differ, DVCError is
    raised before anything is pushed. An S3 endpoint that does not answer raises ServiceUnavailable before
    anything runs.
    """
    require_remote(remote)
    root = project_root(repo)
    configure_remote(root, remote)
    repro(root, stages)
    digests = lock_digests(root, stages)
    for out, run_file in (expect or {}).items():
        if out not in digests:
            raise DVCError(f"dvc.lock has no output {out} in stages {list(stages)}")
        if file_digest(Path(run_file), "md5") != digests[out]:
            raise DVCError(f"{root / out} (dvc repro) differs from the run's {run_file}: not pushing it")
    push(root, stages)
    return digests
