"""DVC versioning (tasks/versioning.py) with the real `dvc`: which runs it versions, and that it pushes
only the bytes the run itself used."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import yaml

from longshort.config import load_profile
from tasks.versioning import DVCError, Remote, run_dvc, unversioned_reason, version_stages

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_profile_is_what_dvc_versions():
    assert unversioned_reason(load_profile("demo").section_dump("data"), REPO) is None


def test_other_data_are_not_versioned_and_the_reason_names_what_differs():
    smoke = load_profile("smoke").section_dump("data")
    assert unversioned_reason(smoke, REPO) == (
        "data.demo.max_operand, data.demo.max_ops, data.demo.max_value, data.demo.min_ops, data.demo.n_heldout, "
        f"data.demo.n_train, data.demo.seed differ from {REPO / 'params.yaml'}'s 'demo' section"
    )
    traces = {"source": "traces", "path": "traces.jsonl"}
    assert unversioned_reason(traces, REPO) == "data.source is 'traces': dvc.yaml versions only the demo task's splits"


def test_a_project_without_params_is_not_versioned(tmp_path):
    (tmp_path / ".dvc").mkdir()
    reason = unversioned_reason(load_profile("demo").section_dump("data"), tmp_path)
    assert reason is not None and reason.startswith(f"{tmp_path / 'params.yaml'} has no valid 'demo' section")


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """A DVC project (no git) with one stage writing out.txt, and a local folder as its remote."""
    repo, store = tmp_path / "repo", tmp_path / "store"
    repo.mkdir()
    run_dvc(repo, "init", "--no-scm", "-q")
    script = "import pathlib; pathlib.Path('out.txt').write_text('hello\\n')"
    stage = {"cmd": f"{sys.executable} -c \"{script}\"", "outs": ["out.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    return repo, store


def test_pushes_the_stage_when_its_bytes_are_the_runs(project, tmp_path):
    repo, store = project
    run_file = tmp_path / "run-out.txt"
    run_file.write_text("hello\n")
    digests = version_stages(["make"], Remote(url=str(store)), repo, expect={"out.txt": run_file})
    md5 = hashlib.md5(b"hello\n").hexdigest()
    assert digests == {"out.txt": md5}
    assert (store / "files/md5" / md5[:2] / md5[2:]).read_bytes() == b"hello\n"


def test_refuses_to_push_bytes_the_run_did_not_use(project, tmp_path):
    repo, store = project
    run_file = tmp_path / "run-out.txt"
    run_file.write_text("something else\n")
    with pytest.raises(DVCError) as err:
        version_stages(["make"], Remote(url=str(store)), repo, expect={"out.txt": run_file})
    assert str(err.value) == f"{repo / 'out.txt'} (dvc repro) differs from the run's {run_file}: not pushing it"
    assert not store.exists()  # nothing pushed


def test_a_run_waits_for_another_runs_dvc_lock_instead_of_failing(project):
    """Two runs in one checkout: the second's `dvc repro` finds the first's lock on the repo (DVC gives up after
    about 3 s by default) and waits for it."""
    import threading
    import time

    import zc.lockfile

    repo, _ = project
    lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))  # the other run's dvc, mid-repro or push
    threading.Timer(5.0, lock.close).start()
    start = time.monotonic()
    run_dvc(repo, "repro", "make")
    assert time.monotonic() - start >= 5.0 and (repo / "out.txt").read_text() == "hello\n"
