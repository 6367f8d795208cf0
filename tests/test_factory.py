"""A model folder transformers cannot load: one ModelLoadError naming the folder and the part that failed,
in ``load_pretrained`` and, through ``longshort solve``, after the option (--long / --short) that named it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longshort.cli import app
from models.factory import TOKENIZER_FILES, ModelLoadError, load_pretrained

runner = CliRunner()


def _without_tokenizer(folder: Path) -> Path:
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    return folder


def _with_model_type(folder: Path, model_type: str) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return folder


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_folder_without_tokenizer_files_is_named(saved_tiny):
    _without_tokenizer(saved_tiny)
    with pytest.raises(ModelLoadError, match=rf"^{saved_tiny}: cannot load the tokenizer: the folder has none of "
                                             r"tokenizer.json, tokenizer_config.json") as caught:  # fmt: skip
        load_pretrained(saved_tiny)
    assert caught.value.path == saved_tiny and isinstance(caught.value.__cause__, ValueError)


def test_unknown_model_type_is_named_in_one_line(saved_tiny):
    _with_model_type(saved_tiny, "bogus")
    with pytest.raises(ModelLoadError, match=rf"^{saved_tiny}: cannot load the model: .*model type `bogus`") as caught:
        load_pretrained(saved_tiny)
    assert "\n" not in str(caught.value)


def test_unreadable_tokenizer_and_bad_hub_id_keep_transformers_reason(saved_tiny):
    (saved_tiny / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=rf"^{saved_tiny}: cannot load the tokenizer: Expecting property name"):
        load_pretrained(saved_tiny)
    # an OSError from the hub client (checked before any download): the id is named
    with pytest.raises(ModelLoadError, match=r"^no/such/hub-id: cannot load the tokenizer: Repo id must be") as caught:
        load_pretrained("no/such/hub-id")
    assert isinstance(caught.value.__cause__, OSError)


def _solve_error(long: Path, short: Path) -> str:
    """``longshort solve`` failed with exit 2 and one ``error: …`` line, last, no traceback; that line.

    (Loading the other, good model may have drawn transformers' progress bar on stderr before it.)"""
    result = runner.invoke(app, ["solve", "Start with 3.", "--long", str(long), "--short", str(short), "-p", "smoke",
                                 "-s", "protocol.max_turns=2"])  # fmt: skip
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("error: ")] == lines[-1:], result.stderr
    return lines[-1]


def test_solve_names_the_option_whose_folder_fails(saved_tiny, tmp_path):
    no_tokenizer = _without_tokenizer(_copy(saved_tiny, tmp_path / "no-tokenizer"))
    bogus = _with_model_type(_copy(saved_tiny, tmp_path / "bogus"), "bogus")
    line = _solve_error(saved_tiny, no_tokenizer)
    assert line.startswith(f"error: --short {no_tokenizer}: cannot load the tokenizer: the folder has none of "), line
    line = _solve_error(bogus, saved_tiny)
    assert line.startswith(f"error: --long {bogus}: cannot load the model: "), line
    assert "model type `bogus`" in line
    # one folder for both roles: both options are named
    line = _solve_error(no_tokenizer, no_tokenizer)
    assert line.startswith(f"error: --long and --short {no_tokenizer}: cannot load the tokenizer: "), line


@pytest.mark.parametrize(
    "weights",
    [
        b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 2000000\n",  # a Git-LFS pointer
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1",  # cut off inside its header
    ],
    ids=["lfs-pointer", "truncated"],
)
def test_weights_safetensors_cannot_read_are_named_in_one_line(saved_tiny, tmp_path, weights):
    """safetensors' own error is not a ValueError or OSError: it used to escape as a traceback (exit 1)."""
    broken = _copy(saved_tiny, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(weights)
    with pytest.raises(ModelLoadError, match=rf"^{broken}: cannot load the model: "):
        load_pretrained(broken)
    line = _solve_error(saved_tiny, broken)
    assert line.startswith(f"error: --short {broken}: cannot load the model: "), line
