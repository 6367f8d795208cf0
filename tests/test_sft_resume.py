"""SFT survives ``kill -9``: a rerun resumes from the last checkpoint and ends where an uninterrupted run ends.

Each training run is a child process running this file as a script
(``python tests/test_sft_resume.py OUT_DIR [PAUSE]``), so the kill is a real SIGKILL of a real trainer and
the rerun starts from nothing but what is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tasks.sft import SFTResult

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 8
SAVE_STEPS = 2
CHILD_TIMEOUT_S = 120
# Where a child stops (and is then killed): after step 4's checkpoint is saved (its on_save callbacks included),
# i.e. between checkpoints; or inside the save of step 6, after its weights and before its optimizer/RNG/trainer state.
AFTER_SAVE_4 = "after-save-4"
INSIDE_SAVE_6 = "inside-save-6"


def _train(out_dir: Path, pause: str | None, **sft: object) -> SFTResult:
    """Child body: build tokenizer, tiny model and examples from fixed seeds, then run ``train_sft``.

    Also called in the test process, where ``sft`` overrides settings of the SFT config."""
    import torch

    from longshort.config import DemoTaskConfig, SFTConfig, TinyModelConfig
    from models.factory import build_tiny_model
    from models.tokenizer import build_tokenizer
    from tasks.base_model import base_sft_examples, tokenizer_corpus
    from tasks.demo import demo_rows
    from tasks.sft import train_sft

    torch.set_num_threads(1)
    if pause is not None:
        _pause_at(out_dir, pause)
    train, _ = demo_rows(DemoTaskConfig(n_train=32, n_heldout=4, seed=5, min_ops=2, max_ops=2, max_value=12,
                                        max_operand=5, verify_rate=0.3, detour_rate=0.3))  # fmt: skip
    tokenizer = build_tokenizer(tokenizer_corpus(train), vocab_size=400)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=512), tokenizer, seed=0)  # fmt: skip
    cfg = SFTConfig(**{**dict(max_steps=MAX_STEPS, save_steps=SAVE_STEPS, batch_size=4, learning_rate=3e-3,
                              logging_steps=1, epochs=1), **sft})  # fmt: skip
    return train_sft(base_sft_examples(tokenizer, train), model, tokenizer, cfg, out_dir, seed=0)


def _pause_at(out_dir: Path, pause: str) -> None:
    """Make the child wait (for its SIGKILL) at a known point of the transformers Trainer.

    A kill timed from outside by polling the checkpoint folder races the next checkpoint write (a tiny model
    trains two steps in milliseconds), so the child marks the point it reached and waits there. The wrapped
    transformers methods still run in full; nothing of ours is replaced.
    """
    from transformers import Trainer

    where, step = pause.rsplit("-", 1)
    # after-save: after the step's log/save/evaluate, i.e. its checkpoint saved, flushed and marked (on_save)
    name = {"after-save": "_maybe_log_save_evaluate", "inside-save": "_save_optimizer_and_scheduler"}[where]
    original = getattr(Trainer, name)

    def run_then_wait(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if where == "after-save":
            original(self, *args, **kwargs)
        if self.state.global_step == int(step):
            (out_dir / f"paused-{pause}").write_text(str(os.getpid()))
            time.sleep(CHILD_TIMEOUT_S)
            raise RuntimeError("the parent test did not kill this child")
        if where == "inside-save":
            original(self, *args, **kwargs)

    setattr(Trainer, name, run_then_wait)


def _child(out_dir: Path, pause: str | None = None) -> subprocess.Popen:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out_dir)] + ([pause] if pause else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    with open(out_dir.parent / f"{out_dir.name}.log", "a") as log:
        # its own process group, so that a timeout kills the trainer and anything it started together
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log_tail(out_dir: Path) -> str:
    return (out_dir.parent / f"{out_dir.name}.log").read_text()[-3000:]


def _wait_ok(proc: subprocess.Popen, out_dir: Path) -> dict:
    try:
        rc = proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:  # timed out: do not leave a trainer running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, f"SFT child for {out_dir} exited with {rc}:\n{_log_tail(out_dir)}"
    return json.loads((out_dir / "sft_result.json").read_text())


def _kill_when_paused(proc: subprocess.Popen, out_dir: Path, pause: str) -> None:
    marker = out_dir / f"paused-{pause}"
    deadline = time.time() + CHILD_TIMEOUT_S
    try:
        while not marker.exists():
            assert proc.poll() is None, f"child exited with {proc.returncode} before {pause}:\n{_log_tail(out_dir)}"
            assert time.time() < deadline, f"child did not reach {pause} within {CHILD_TIMEOUT_S} s"
            time.sleep(0.05)
    finally:
        if not marker.exists() and proc.poll() is None:  # failed waiting: leave no trainer running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    os.kill(proc.pid, signal.SIGKILL)  # the fault under test: the trainer dies mid-run
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    (path,) = model_dir.glob("*.safetensors")
    return load_file(path)


@dataclass(frozen=True)
class Runs:
    straight: Path  # uninterrupted run, finished
    killed_between: Path  # SIGKILLed after checkpoint-4 was complete
    killed_inside: Path  # SIGKILLed while writing checkpoint-6
    straight_result: dict


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The three first runs, side by side (two cores): one to the end, two killed with SIGKILL."""
    root = tmp_path_factory.mktemp("sft-resume")
    straight, between, inside = root / "straight", root / "killed-between", root / "killed-inside"
    procs = {between: _child(between, AFTER_SAVE_4), inside: _child(inside, INSIDE_SAVE_6)}
    straight_proc = _child(straight)
    try:
        _kill_when_paused(procs[between], between, AFTER_SAVE_4)
        _kill_when_paused(procs[inside], inside, INSIDE_SAVE_6)
        straight_result = _wait_ok(straight_proc, straight)
    finally:
        for proc in [*procs.values(), straight_proc]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Runs(straight, between, inside, straight_result)


def _assert_resumed_equals_straight(runs: Runs, out_dir: Path, checkpoint: str, resumed: dict) -> None:
    import torch

    assert resumed["resumed_from"] == str(out_dir / "checkpoints" / checkpoint)
    assert resumed["steps"] == MAX_STEPS
    # Exact equality (torch.equal, i.e. atol=0): same data order (the resumed dataloader skips the consumed
    # batches), restored optimizer/scheduler/RNG state and one thread, so every float must match bit for bit.
    a, b = _weights(runs.straight / "model"), _weights(out_dir / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name] - b[name]).abs().max().item():.3g}"
    # The resumed process logs only the steps it ran, with the uninterrupted run's losses at those steps.
    start = int(checkpoint.rsplit("-", 1)[1])
    losses_a = json.loads((runs.straight / "loss_history.json").read_text())
    losses_b = json.loads((out_dir / "loss_history.json").read_text())
    assert [h["step"] for h in losses_b] == list(range(start + 1, MAX_STEPS + 1))
    assert losses_b == [h for h in losses_a if h["step"] > start]
    # train_loss is the whole run's mean, read from the Trainer's history, which a resumed Trainer loads
    # from the checkpoint: the interrupted run reports the uninterrupted run's number.
    assert runs.straight_result["train_loss"] == pytest.approx(sum(h["loss"] for h in losses_a) / MAX_STEPS)
    assert resumed["train_loss"] == pytest.approx(runs.straight_result["train_loss"])


@pytest.mark.slow
def test_sft_killed_between_checkpoints_resumes_and_matches_an_uninterrupted_run(runs: Runs, tmp_path: Path):
    import torch

    assert runs.straight_result["resumed_from"] is None and runs.straight_result["steps"] == MAX_STEPS
    out_dir = tmp_path / "killed-between"
    shutil.copytree(runs.killed_between, out_dir)
    ckpts = out_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (ckpts / "checkpoint-4" / "trainer_state.json").exists()
    assert not (out_dir / "model").exists() and not (out_dir / "sft_result.json").exists()
    at_kill = _weights(ckpts / "checkpoint-4")  # read now: a finished run deletes its checkpoints

    resumed = _wait_ok(_child(out_dir), out_dir)

    _assert_resumed_equals_straight(runs, out_dir, "checkpoint-4", resumed)
    final = _weights(out_dir / "model")
    assert final.keys() == at_kill.keys()
    assert not all(torch.equal(final[k], at_kill[k]) for k in final), "the rerun did not train past step 4"


@pytest.mark.slow
def test_sft_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(runs: Runs, tmp_path: Path):
    out_dir = tmp_path / "killed-inside"
    shutil.copytree(runs.killed_inside, out_dir)
    ckpts = out_dir / "checkpoints"
    assert (ckpts / "checkpoint-6" / "model.safetensors").exists()  # the write had started...
    assert not (ckpts / "checkpoint-6" / "trainer_state.json").exists()  # ...and was killed before the end
    assert (ckpts / "checkpoint-4" / "trainer_state.json").exists()

    resumed = _wait_ok(_child(out_dir), out_dir)

    _assert_resumed_equals_straight(runs, out_dir, "checkpoint-4", resumed)


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its modification time and bytes."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.mark.slow
def test_a_rerun_after_the_run_finished_trains_nothing_and_returns_the_same_result(
    runs: Runs, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A kill after ``train_sft`` returned and before the stage saved its record leaves the model, the result
    and the loss history but no checkpoints (they were removed): the rerun must not train from step 0."""
    from tasks.sft import SFTResult

    out_dir = tmp_path / "finished"
    shutil.copytree(runs.straight, out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["loss_history.json", "model", "sft_result.json"]
    before = _files(out_dir)

    with caplog.at_level("INFO", logger="tasks.sft"):
        again = _train(out_dir, None)

    expected = {**runs.straight_result, "model_dir": str(out_dir / "model")}  # the copy's own model folder
    assert again == SFTResult(**{k: v for k, v in expected.items() if k != "inputs"})
    assert _files(out_dir) == before  # nothing rewritten: no model saved, no loss logged, no checkpoint made
    assert "reusing the finished SFT run" in caplog.text

    # The same folder with other settings (a manual `longshort stage sft_base` after a settings change, in
    # its fixed folder): the stored result is not taken for theirs.
    other = _train(out_dir, None, learning_rate=1e-3)
    assert other.steps == MAX_STEPS and other.resumed_from is None
    assert other.train_loss != pytest.approx(runs.straight_result["train_loss"])
    assert "was written from other inputs" in caplog.text


@pytest.mark.slow
def test_a_checkpoint_that_lost_its_optimizer_state_is_skipped_for_the_earlier_complete_one(
    runs: Runs, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """transformers would resume from checkpoint-4 without its optimizer.pt, silently with a fresh optimizer;
    it is skipped with a warning, the run resumes from checkpoint-2 and ends bit for bit where the
    uninterrupted run ended."""
    out_dir = tmp_path / "half-deleted"
    shutil.copytree(runs.killed_between, out_dir)
    (out_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt").unlink()  # what a kill mid-rmtree can leave

    with caplog.at_level("WARNING", logger="tasks.sft"):
        resumed = _train(out_dir, None)

    assert "checkpoint-4 (missing optimizer.pt)" in caplog.text
    _assert_resumed_equals_straight(runs, out_dir, "checkpoint-2", asdict(resumed))


def test_every_checkpoint_is_flushed_and_marked_before_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each checkpoint-N is fsynced, every file and folder of it, and marked (.durable, itself flushed) at its own
    save, before the next training step and so before the next save's rotation can remove the one before it
    (transformers itself writes checkpoints without a flush)."""
    from longshort import io as lsio
    from tasks.sft import DURABLE_MARK

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    at_step: dict[int, tuple[set[str], list[str]]] = {}  # step about to train: (newest checkpoint's files, synced)

    from transformers import Trainer

    real_step = Trainer.training_step

    def training_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
        ckpts = sorted((tmp_path / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if ckpts:
            at_step[self.state.global_step + 1] = ({str(p) for p in ckpts[-1].rglob("*")} | {str(ckpts[-1])},
                                                   list(synced))  # fmt: skip
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(lsio.os, "fsync", fsync)
    monkeypatch.setattr(Trainer, "training_step", training_step)
    _train(tmp_path, None, max_steps=6, save_steps=2)

    assert sorted(at_step) == [3, 4, 5, 6]
    for step, ckpt in ((3, "checkpoint-2"), (5, "checkpoint-4")):  # the step right after each save
        files, order = at_step[step]
        names = {Path(p).name for p in files}
        assert ckpt in names and DURABLE_MARK in names
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
        folder = str(tmp_path / "checkpoints" / ckpt)
        saved = files - {f"{folder}/{DURABLE_MARK}"}  # the mark was flushed under its temporary name, then renamed
        assert saved <= set(order), sorted(saved - set(order))
        mark = max(i for i, p in enumerate(order) if p.startswith(f"{folder}/.{DURABLE_MARK}."))
        assert all(order.index(p) < mark for p in saved)  # marked only once the whole folder was flushed
        assert folder in order[mark + 1 :] and str(tmp_path / "checkpoints") in order[mark + 1 :]


def test_a_failed_sft_releases_its_trainer_and_keeps_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A training that fails still hands the accelerator back (a Prefect retry runs in the same process), keeps
    the checkpoints it wrote, and raises its own error, also when the release itself fails."""
    from transformers import Trainer

    import tasks.sft as sft

    real_step = Trainer.training_step

    def training_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self.state.global_step == 3:
            raise RuntimeError("CUDA out of memory (simulated at step 4)")
        return real_step(self, *args, **kwargs)

    released: list[object] = []
    real_release = sft.release_trainer

    def release(trainer: Trainer) -> None:
        released.append(trainer)
        real_release(trainer)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    monkeypatch.setattr(sft, "release_trainer", release)
    with pytest.raises(RuntimeError, match="simulated at step 4"):
        _train(tmp_path / "a", None, max_steps=6, save_steps=2)
    assert len(released) == 1 and released[0].accelerator._models == []  # free_memory dropped the prepared model
    assert [p.name for p in (tmp_path / "a" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]

    def failing_release(trainer: Trainer) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sft, "release_trainer", failing_release)
    with caplog.at_level("WARNING", logger="tasks.sft"), pytest.raises(RuntimeError, match="simulated at step 4"):
        _train(tmp_path / "b", None, max_steps=6, save_steps=2)
    assert "could not release the SFT trainer" in caplog.text and "illegal memory access" in caplog.text


def test_release_drops_what_deepspeed_zero3_keeps_of_a_destroyed_engine(monkeypatch: pytest.MonkeyPatch):
    """DeepSpeed 0.19.8 keeps a ZeRO-3 model alive after its engine's destroy(): on its module stack and in a method's
    lru_cache (see tasks.sft._forget_zero3_module). The two places, laid out as in that release (the cache behind
    its NVTX wrapper), are emptied of the model, and nothing else of the stack goes."""
    import functools
    import gc
    import types
    import weakref

    import torch

    from tasks.sft import _forget_zero3_module

    def instrument_w_nvtx(func):  # noqa: ANN001, ANN202 - deepspeed.utils.nvtx's wrapper: no functools.wraps
        def wrapped_fn(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return func(*args, **kwargs)

        return wrapped_fn

    class PartitionedParameterCoordinator:
        @instrument_w_nvtx
        @functools.lru_cache(maxsize=None)  # noqa: B019 - the leak under test
        def __params_to_release(self, submodule: torch.nn.Module, step_id: int) -> set[int]:
            return {id(p) for p in submodule.parameters()}

        def release(self, submodule: torch.nn.Module, step_id: int) -> set[int]:
            return self.__params_to_release(submodule, step_id)

    model, other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), torch.nn.Linear(3, 3)
    offload = types.ModuleType("deepspeed.runtime.zero.parameter_offload")
    offload.FWD_MODULE_STACK = [other, model, model[0]]  # model[0]: left by a forward that raised
    coordinator = types.ModuleType("deepspeed.runtime.zero.partitioned_param_coordinator")
    coordinator.PartitionedParameterCoordinator = PartitionedParameterCoordinator
    monkeypatch.setitem(sys.modules, offload.__name__, offload)
    monkeypatch.setitem(sys.modules, coordinator.__name__, coordinator)
    PartitionedParameterCoordinator().release(model, 0)
    alive = weakref.ref(model)

    _forget_zero3_module(model, None)
    del model
    gc.collect()
    assert alive() is None
    assert offload.FWD_MODULE_STACK == [other]
    _forget_zero3_module()  # no DeepSpeed imported, or nothing of ours left: nothing happens

    # release_trainer drops them also when the engine's destroy raises (a sticky CUDA error), and the error stands
    from tasks.sft import release_trainer

    def destroy_fails() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    ref = torch.nn.Linear(4, 4)  # TRL's GRPO reference engine under ZeRO-3
    offload.FWD_MODULE_STACK[:] = [other, ref]
    trainer = types.SimpleNamespace(model=other, model_wrapped=None, ref_model=ref,
                                    accelerator=types.SimpleNamespace(free_memory=destroy_fails))  # fmt: skip
    with pytest.raises(RuntimeError, match="illegal memory access"):
        release_trainer(trainer)
    assert offload.FWD_MODULE_STACK == []
    monkeypatch.delitem(sys.modules, offload.__name__)
    _forget_zero3_module(other)


def test_the_deepspeed_installed_keeps_zero3_models_where_release_looks():
    """Where DeepSpeed is installed (the GPU extra), its ZeRO-3 internals are still where the release clears them:
    a DeepSpeed upgrade that moves them fails here instead of leaking a model per SFT stage."""
    pytest.importorskip("deepspeed")
    import importlib

    from tasks.sft import _zero3_holders

    offload = importlib.import_module("deepspeed.runtime.zero.parameter_offload")
    importlib.import_module("deepspeed.runtime.zero.partitioned_param_coordinator")
    stack, cache_clear = _zero3_holders()
    assert stack is offload.FWD_MODULE_STACK
    assert cache_clear is not None


if __name__ == "__main__":
    _train(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)


RESUME_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def _checkpoint(
    folder: Path, files: tuple[str, ...] = RESUME_FILES, state: str | None = '{"global_step": 1}', durable: bool = True
) -> Path:
    """A checkpoint folder laid out as transformers writes it, with DurableCheckpoints' mark (the files' contents
    are not read)."""
    from tasks.sft import DURABLE_MARK

    folder.mkdir(parents=True)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    if durable:
        (folder / DURABLE_MARK).write_text("")
    return folder


def test_only_whole_checkpoints_are_resumed_from(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A folder without a trainer state, with one cut short, or without a file the resume loads is skipped with
    a warning and removed; the newest whole one is picked."""
    from tasks.sft import last_complete_checkpoint

    for step, state in ((100, '{"global_step": 100}'), (200, '{"global_step": 2'), (300, None), (150, "[]")):
        _checkpoint(tmp_path / f"checkpoint-{step}", state=state)
    _checkpoint(tmp_path / "checkpoint-400", ("model.safetensors", "scheduler.pt", "rng_state.pth"))
    _checkpoint(tmp_path / "checkpoint-500", ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_2.pth"))
    _checkpoint(tmp_path / "checkpoint-600", durable=False)  # every file, but a machine crash came before the flush
    with caplog.at_level("WARNING", logger="tasks.sft"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-100")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100"]
    assert "checkpoint-600 (no .durable mark: its save was not flushed to the disk to the end)" in caplog.text
    assert "checkpoint-400 (missing optimizer.pt)" in caplog.text
    assert "checkpoint-500 (missing model weights" in caplog.text and "rng_state_<rank>.pth of ranks [1]" in caplog.text
    # none complete: start from scratch
    _checkpoint(tmp_path / "x" / "checkpoint-7", ("model.safetensors", "optimizer.pt", "rng_state.pth"))
    assert last_complete_checkpoint(tmp_path / "x") is None


def test_what_a_checkpoint_needs_depends_on_how_it_was_saved(tmp_path: Path):
    """LoRA adapters, sharded weights, model-only saves and DeepSpeed engine states, as transformers and
    DeepSpeed lay them out; a DeepSpeed checkpoint has no optimizer.pt and must not be rejected for it."""
    from tasks.sft import checkpoint_problem

    lora = _checkpoint(tmp_path / "lora", ("adapter_model.safetensors", *RESUME_FILES[1:]))
    assert checkpoint_problem(lora) is None
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    sharded = _checkpoint(tmp_path / "sharded", (shards[0], *RESUME_FILES[1:]))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    assert checkpoint_problem(sharded) == f"missing {shards[1]}"
    (sharded / shards[1]).write_bytes(b"x")
    assert checkpoint_problem(sharded) is None
    model_only = _checkpoint(tmp_path / "model-only", ("model.safetensors",))
    assert checkpoint_problem(model_only, optimizer_state=False) is None
    assert checkpoint_problem(model_only) == "missing optimizer.pt, scheduler.pt, rng_state.pth"

    # ZeRO-3 over two processes (DeepSpeedEngine.save_checkpoint): 'latest' names global_step4/, one model and
    # one optimizer state file per data-parallel rank; weights gathered to model.safetensors are not needed.
    ds_files = ("latest", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
                *(f"global_step4/{p}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                  for r in (0, 1) for p, kind in (("", "model"), ("bf16_", "optim"))))  # fmt: skip
    ds = _checkpoint(tmp_path / "ds", ds_files)
    (ds / "latest").write_text("global_step4")
    zero3 = {"zero_optimization": {"stage": 3}}
    assert checkpoint_problem(ds, deepspeed=zero3) is None
    assert checkpoint_problem(ds).startswith("missing model weights")  # not a checkpoint a plain Trainer resumes
    (ds / "global_step4" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    lost_rank = "missing global_step4/*zero_pp_rank_<rank>_optim_states.pt (found ranks [0] of 2)"
    assert checkpoint_problem(ds, deepspeed=zero3) == lost_rank
    (ds / "scheduler.pt").unlink()
    (ds / "latest").unlink()
    assert checkpoint_problem(ds, deepspeed=zero3) == "missing DeepSpeed 'latest' file, scheduler.pt"
    # a DeepSpeed config with its own scheduler keeps it in the engine's states: no scheduler.pt then
    ds_file = tmp_path / "zero2.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}))
    (ds / "latest").write_text("global_step4\n")
    assert checkpoint_problem(ds, deepspeed=str(ds_file)) == lost_rank
    # so does one with its own optimizer and no scheduler (the profiles' zero3_offload.json): transformers hands
    # its scheduler to the engine, and no scheduler.pt is written (seen on an H200: every such checkpoint was
    # taken for incomplete and removed, so a killed SFT started over)
    offload = json.loads((REPO / "infra" / "deepspeed" / "zero3_offload.json").read_text())
    assert "optimizer" in offload and "scheduler" not in offload
    (ds / "global_step4" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert checkpoint_problem(ds, deepspeed=offload) is None
    assert checkpoint_problem(ds, deepspeed=zero3) == "missing scheduler.pt"


def test_the_run_loss_weights_each_logged_window_by_the_steps_it_covers():
    from tasks.sft import run_train_loss

    history = [
        {"loss": 2.0, "step": 10, "learning_rate": 1e-3},
        {"loss": 1.0, "step": 20},
        {"eval_loss": 7.0, "step": 20},  # not a training loss
        {"loss": 4.0, "step": 25},  # a last, shorter window
        {"train_loss": 9.0, "step": 25},  # the Trainer's own summary entry
    ]
    assert run_train_loss(history) == pytest.approx((2.0 * 10 + 1.0 * 10 + 4.0 * 5) / 25)
    assert run_train_loss([{"train_loss": 9.0, "step": 3}]) is None
