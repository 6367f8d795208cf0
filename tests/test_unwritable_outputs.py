"""Outputs that cannot be written: a clear error naming the path, and no partial or temporary files.

Tests run as root, so a read-only folder would not stop them: "unwritable" is a file where a folder
is expected (real, no fake), and "disk full" is ENOSPC raised by ``os.fsync`` (a fake, for something
outside our control: filling a real disk is not an option in a test).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from longshort.cli import app
from longshort.config import DemoTaskConfig, load_profile
from longshort.io import OutputError, atomic_write_text, iter_jsonl, write_jsonl
from tasks.synthesize import synthesize_demo

SMALL = DemoTaskConfig(n_train=8, n_heldout=4, seed=3)


def _disk_full(monkeypatch, after: int = 0) -> None:
    """``os.fsync`` succeeds ``after`` times, then fails as a full disk does."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_file_in_the_way_of_the_output_folder(tmp_path):
    (tmp_path / "ws").write_text("not a folder")
    target = tmp_path / "ws" / "artifacts" / "out.jsonl"
    with pytest.raises(OutputError) as err:
        write_jsonl(target, [{"a": 1}])
    assert str(err.value) == f"cannot write {target.parent}: {tmp_path / 'ws'} is a file, not a folder"
    assert isinstance(err.value, OSError) and _files(tmp_path) == ["ws"]


def test_disk_full_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out" / "rows.jsonl"
    write_jsonl(target, [{"v": 1}])
    _disk_full(monkeypatch)
    with pytest.raises(OutputError, match=rf"^cannot write {target}: No space left on device$") as err:
        write_jsonl(target, [{"v": 2}] * 1000)
    assert err.value.errno == errno.ENOSPC
    assert [r for _, r in iter_jsonl(target)] == [{"v": 1}]  # unchanged, not truncated
    assert _files(tmp_path) == ["out", "out/rows.jsonl"]  # no .rows.jsonl.*.tmp


def test_rename_onto_a_folder_fails_cleanly(tmp_path):
    (tmp_path / "report.md").mkdir()
    with pytest.raises(OutputError, match=rf"^cannot write {tmp_path / 'report.md'}: Is a directory$"):
        atomic_write_text(tmp_path / "report.md", "# results")
    assert _files(tmp_path) == ["report.md"]


def test_dataset_splits_are_written_both_or_neither(tmp_path, monkeypatch):
    out = tmp_path / "synthesize"
    _disk_full(monkeypatch, after=1)  # train.jsonl is written, heldout.jsonl hits a full disk
    with pytest.raises(OutputError, match=rf"cannot write {out / 'heldout.jsonl'}: No space left on device"):
        synthesize_demo(SMALL, out)
    assert _files(tmp_path) == ["synthesize"]  # train.jsonl removed again, no temp files
    monkeypatch.undo()
    files = synthesize_demo(SMALL, out)  # and a rerun with space writes both
    assert (files.n_train, files.n_heldout) == (8, 4) and _files(out) == ["heldout.jsonl", "train.jsonl"]


runner = CliRunner()


def test_cli_synthesize_into_a_file_is_one_line(tmp_path, in_tmp_repo):
    (tmp_path / "data").write_text("a file, not the data folder")
    result = runner.invoke(app, ["synthesize", "--out", str(tmp_path / "data" / "demo")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: cannot write {tmp_path / 'data' / 'demo'}: {tmp_path / 'data'} is a file, not a folder"
    )


def _data_folder(root: Path) -> Path:
    """SMALL's splits, and a params.yaml whose `demo` is the smoke profile's, which `longshort stage` requires."""
    data = root / "data"
    synthesize_demo(SMALL, data)
    (root / "params.yaml").write_text(yaml.safe_dump({"profile": "smoke", "demo": load_profile("smoke").data.demo.model_dump(mode="json")}))
    return data


def test_stage_into_an_unwritable_folder_names_it(in_tmp_repo):
    from flows.dvc_stages import run_data_stage

    data = _data_folder(in_tmp_repo)
    (data / "chunk").write_text("a file where the stage folder goes")
    with pytest.raises(OutputError, match=rf"^cannot write {data / 'chunk'}: {data / 'chunk'} is a file, not a folder$"):
        run_data_stage("chunk", load_profile("smoke"), data)
    result = runner.invoke(app, ["stage", "chunk", "-p", "smoke", "--data", str(data)])
    assert result.exit_code == 2 and result.stderr.strip().startswith(f"error: cannot write {data / 'chunk'}")


def test_stage_on_a_full_disk_leaves_no_partial_output(in_tmp_repo, monkeypatch):
    from flows.dvc_stages import run_data_stage

    data = _data_folder(in_tmp_repo)
    _disk_full(monkeypatch)
    with pytest.raises(OutputError, match=rf"cannot write {data / 'chunk' / 'chunks_train.jsonl'}: No space left"):
        run_data_stage("chunk", load_profile("smoke"), data)
    assert not (data / "chunk").exists()  # nothing was written, so the stage folder is gone too
    assert not list(data.rglob("*.tmp"))
    monkeypatch.undo()
    record = run_data_stage("chunk", load_profile("smoke"), data)  # the rerun is unaffected
    assert sorted(record.outputs) == ["heldout", "train"] and (data / "chunk" / "record.json").is_file()


def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path):
    """mkstemp makes 0600 files; outputs in a shared workspace must stay readable by others."""
    import longshort.io as io

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "out.txt", "x")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    mode = (tmp_path / "out.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == io._FILE_MODE == 0o666 & ~mask
    files = synthesize_demo(SMALL, tmp_path / "splits")  # both splits go through io.write_temp too
    assert {Path(f).stat().st_mode & 0o777 for f in (files.train, files.heldout)} == {mode}


def test_the_services_secret_is_written_whole_and_private(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # infra/ is not an installed package
    from infra.services import Layout, s3_credentials

    layout = Layout(tmp_path / "state")
    layout.s3_config.parent.mkdir(parents=True, exist_ok=True)
    first = s3_credentials(layout)
    assert layout.s3_config.stat().st_mode & 0o777 == 0o600
    assert s3_credentials(layout) == first and len(first[1]) >= 30  # generated once, read back after
    assert [p.name for p in layout.s3_config.parent.iterdir() if p.name.endswith(".tmp")] == []
