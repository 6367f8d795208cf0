"""The pipeline under ``kill -9`` and under concurrent runs, on the smoke profile.

Every pipeline run here is a child process (``python tests/test_faults.py PROFILE WORKSPACE SUMMARY [SET ...]``)
that runs ``flows.pipeline`` against the session's Prefect server and writes its summary to SUMMARY.

Faults: the child SIGKILLs itself at a named point (``LONGSHORT_FAULT_AFTER``, ``longshort.io.fault_point``):
a real ``kill -9`` — no ``finally``, no atexit — at a deterministic place, where a kill timed from outside by
polling would race the next write (the smoke stages take milliseconds to a second). One workspace goes through
three kills and a final rerun:

1. ``write:heldout.jsonl``  — synthesis, after the held-out split's temporary file is written, before its rename;
2. ``record:score_shard``   — scoring, right after the first score shard's record.json is saved;
3. ``rl-checkpoint:1``      — RL, right after the checkpoint of step 1 (of 2) is saved;
4. no fault                 — runs to the end.

Its final datasets, models and metrics must equal those of an uninterrupted run in another workspace.

Concurrency: three runs started at once on one fresh workspace, two of the smoke profile and one of a second
profile (another ``cold_start.theta``, so it shares the stages up to scoring and has its own from cold_start on).
They, and the uninterrupted reference run, start with the module and run beside the kill chain.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

CHILD_TIMEOUT_S = 300
SMOKE = "smoke"
NO_REGISTRY = "tracking.register_models=false"
# Measurements of the machine (wall clock, speed, memory) differ between any two runs; every other metric
# must match exactly.
MEASUREMENT_SUFFIXES = ("runtime_s", "_per_s", "time_s", "duration_s", "rss_mb", "_time")
# The stages whose jsonl outputs hold no measurement, and must be equal byte for byte; the rows of any other
# stage's jsonl (e.g. a trainer's log with its step times) are compared without their measurements.
BYTE_EXACT = {"synthesize", "evaluate_base", "chunk", "score_shard", "merge_scores", "cold_start", "rl", "evaluate"}


def _outcomes(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith(MEASUREMENT_SUFFIXES)}


def _assert_same_jsonl(stage: str, name: str, ours: bytes, theirs: bytes) -> None:
    if stage in BYTE_EXACT:
        assert ours == theirs, f"{stage}/{name} differs"
    else:
        rows = [[_outcomes(json.loads(line)) for line in data.splitlines()] for data in (ours, theirs)]
        assert rows[0] == rows[1], f"{stage}/{name} differs"


@dataclass(frozen=True)
class Run:
    rc: int
    log: str
    summary: dict | None  # None when the child was killed

    @property
    def metrics(self) -> dict[str, float]:
        assert self.summary is not None
        return _outcomes(self.summary["metrics"])


def _start(
    root: Path, name: str, workspace: Path, profile: str = SMOKE, fault: str | None = None, *overrides: str
) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PREFECT_HOME": str(root / "prefect-home"), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
    assert env.get("PREFECT_API_URL"), "the prefect_server fixture sets PREFECT_API_URL for the children"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LONGSHORT_FAULT_AFTER", None)
    if fault is not None:
        env["LONGSHORT_FAULT_AFTER"] = fault
    summary = root / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), profile, str(workspace), str(summary), *overrides]
    with open(root / f"{name}.log", "w") as log:
        # its own process group: a timeout kills the pipeline and whatever it started (dvc, workers) together
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(root: Path, name: str, proc: subprocess.Popen) -> Run:
    try:
        rc = proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:  # timed out: leave no pipeline running, nor anything it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    summary_path = root / f"{name}.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return Run(rc, (root / f"{name}.log").read_text(), summary)


def _run(root: Path, name: str, workspace: Path, fault: str | None = None) -> Run:
    """A smoke run without model registration (the concurrency tests register; these need not)."""
    run = _finish(root, name, _start(root, name, workspace, SMOKE, fault, NO_REGISTRY))
    if fault is None:
        assert run.rc == 0, f"{name} exited with {run.rc}:\n{run.log[-4000:]}"
    else:
        assert run.rc == -signal.SIGKILL, f"{name} was not killed at {fault}: rc {run.rc}:\n{run.log[-4000:]}"
        assert run.summary is None
    return run


def _workspace_of(run: Run) -> Path:
    assert run.summary is not None
    return Path(run.summary["stage_dirs"]["synthesize"]).parents[2]  # <ws>/artifacts/synthesize/<key>


def _artifacts(workspace: Path) -> Path:
    return workspace / "artifacts"


def _stage_dirs(workspace: Path, stage: str) -> list[Path]:
    return sorted(p for p in (_artifacts(workspace) / stage).glob("*") if p.is_dir())


def _jsonl_by_stage(workspace: Path) -> dict[tuple[str, str], bytes]:
    """``{(stage, file): bytes}`` of every jsonl output of a workspace that ran one profile (one folder per
    stage; the score shards, whose keys hold the workspace's paths, numbered in the order of their bytes)."""
    out: dict[tuple[str, str], bytes] = {}
    for stage_dir in sorted(p for p in _artifacts(workspace).iterdir() if p.is_dir()):
        if stage_dir.name == "score_shard":
            shards = sorted(f.read_bytes() for f in stage_dir.glob("*/scored.jsonl"))
            out |= {(stage_dir.name, f"scored.jsonl#{i}"): data for i, data in enumerate(shards)}
        else:
            (folder,) = _stage_dirs(workspace, stage_dir.name)
            out |= {(stage_dir.name, f.name): f.read_bytes() for f in sorted(folder.glob("*.jsonl"))}
    return out


def _record(folder: Path) -> dict:
    return json.loads((folder / "record.json").read_text())


def _leftovers(workspace: Path) -> list[str]:
    """Anything a cut-short write leaves: temporary files and folders, unfinished stage folders."""
    arts = _artifacts(workspace)
    bad = [p for p in arts.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    bad += [p for stage in arts.iterdir() if stage.is_dir() for p in stage.iterdir()
            if p.is_dir() and not (p / "record.json").is_file()]  # fmt: skip
    return sorted(str(p.relative_to(arts)) for p in bad)


def _assert_records_match_their_files(workspace: Path) -> None:
    """Every finished folder holds the files its record names, with the content digests it recorded."""
    from longshort.io import file_digest, tree_digest

    for rec_path in _artifacts(workspace).glob("*/*/record.json"):
        rec = json.loads(rec_path.read_text())
        assert Path(rec["path"]) == rec_path.parent
        for name, path in rec["outputs"].items():
            assert Path(path).exists(), f"{rec['stage']}: output {name} missing: {path}"
        for name, digest in rec["digests"].items():
            if name.endswith("_md5"):
                assert file_digest(Path(rec["outputs"][name.removesuffix("_md5")]), "md5") == digest, (rec["stage"], name)
            else:
                assert tree_digest(Path(rec["outputs"][name])) == digest, (rec["stage"], name)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def launched(prefect_server: str, root: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """The runs that need no kill, all started at once when the module starts, beside the kill chain (the
    children spend much of their time starting up and talking to the Prefect server, not computing):

    * ``reference``: the smoke profile, alone and uninterrupted, in its own workspace;
    * ``same-a``, ``same-b``, ``other-profile``: three runs at once on one fresh workspace, two of the smoke
      profile and one of a second profile (another ``cold_start.theta``).
    """
    other = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    other["run"]["name"] = "smoke-theta"
    other["cold_start"]["theta"] = 0.3
    (root / "smoke-theta.yaml").write_text(yaml.safe_dump(other))
    ws = root / "ws-concurrent"
    procs = {"reference": _start(root, "reference", root / "ws-reference", SMOKE, None, NO_REGISTRY)}
    procs |= {name: _start(root, name, ws) for name in ("same-a", "same-b")}
    # its models are not registered: the registry's concurrency is the two smoke runs' part
    procs["other-profile"] = _start(root, "other-profile", ws, str(root / "smoke-theta.yaml"), None, NO_REGISTRY)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(root: Path, launched: dict[str, subprocess.Popen]) -> Run:
    run = _finish(root, "reference", launched["reference"])
    assert run.rc == 0, f"the reference run exited with {run.rc}:\n{run.log[-4000:]}"
    return run


# ---------------------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Chain:
    workspace: Path
    after_synth_kill: dict[str, list[str]]  # the synthesize folder's files after kill 1
    shard_records_after_kill: int  # finished score shards after kill 2
    first_shard: dict  # its record after kill 2
    rl_checkpoints_after_kill: list[list[str]]  # of each rl folder, after kill 3
    runs: dict[str, Run]


@pytest.fixture(scope="module")
def chain(prefect_server: str, root: Path, launched: dict[str, subprocess.Popen]) -> Chain:
    ws = root / "ws-faults"
    runs: dict[str, Run] = {}

    runs["synth"] = _run(root, "kill-synthesis", ws, fault="write:heldout.jsonl")
    after_synth = {p.name: sorted(f.name for f in p.iterdir()) for p in _stage_dirs(ws, "synthesize")}

    runs["score"] = _run(root, "kill-scoring", ws, fault="record:score_shard")
    shards = [p for p in _stage_dirs(ws, "score_shard") if (p / "record.json").is_file()]
    first_shard = _record(shards[0]) if shards else {}

    runs["rl"] = _run(root, "kill-rl", ws, fault="rl-checkpoint:1")
    ckpts = [sorted(p.name for p in (d / "checkpoints").iterdir()) for d in _stage_dirs(ws, "rl")]

    runs["final"] = _run(root, "rerun", ws)
    return Chain(ws, after_synth, len(shards), first_shard, ckpts, runs)


@pytest.mark.slow
def test_kill_during_synthesis_leaves_no_partial_split(chain: Chain, reference: Run):
    # the kill came between the held-out split's temporary write and its rename: train.jsonl is whole,
    # heldout.jsonl does not exist (only the temporary file does), and there is no record
    ((_, files),) = chain.after_synth_kill.items()
    assert "train.jsonl" in files and "heldout.jsonl" not in files and "record.json" not in files
    temporary = [f for f in files if f.endswith(".tmp")]
    assert len(temporary) == 1 and temporary[0].startswith(".heldout.jsonl.")
    # the next run removed the temporary file and wrote the splits byte for byte as the reference did
    assert "left by an interrupted write" in chain.runs["score"].log
    ws_ref = Path(reference.summary["stage_dirs"]["synthesize"])
    (synth,) = _stage_dirs(chain.workspace, "synthesize")
    assert sorted(f.name for f in synth.iterdir()) == sorted(f.name for f in ws_ref.iterdir())
    for split in ("train.jsonl", "heldout.jsonl"):
        assert (synth / split).read_bytes() == (ws_ref / split).read_bytes()


@pytest.mark.slow
def test_kill_during_scoring_keeps_the_finished_shard(chain: Chain):
    # three shards (two of 16 train traces, one of 8 held-out); the kill came right after the first finished
    assert chain.shard_records_after_kill == 1
    first = chain.first_shard
    records = {p.name: _record(p) for p in _stage_dirs(chain.workspace, "score_shard")}
    assert len(records) == 3
    # the rerun reused the finished shard (its record still names the killed run's flow run) and scored the others
    assert records[Path(first["path"]).name] == first
    assert f"score_shard: reusing finished artifacts in {first['path']}" in chain.runs["rl"].log
    others = {r["flow_run_id"] for r in records.values() if r["path"] != first["path"]}
    assert len(others) == 1 and first["flow_run_id"] not in others


@pytest.mark.slow
def test_kill_during_rl_resumes_from_its_checkpoint(chain: Chain, reference: Run):
    assert chain.rl_checkpoints_after_kill == [["step-000001"]]
    final = chain.runs["final"]
    # only rl (resumed at step 1 of 2) and the stages after it ran again; everything before came from the cache
    order = list(reference.summary["stage_dirs"])  # the pipeline's records, in the order they run
    after_rl = order[order.index("rl") :]
    assert final.summary["recomputed"] == sorted(after_rl)
    assert final.summary["cache_hits"] == final.summary["n_stages"] - len(after_rl)
    assert final.summary["n_stages"] == reference.summary["n_stages"]
    assert "RL: resuming from" in final.log and "step-000001 (step 1 of 2)" in final.log
    (rl,) = _stage_dirs(chain.workspace, "rl")
    assert [json.loads(line)["step"] for line in (rl / "history.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_after_the_kills_results_equal_an_uninterrupted_run(chain: Chain, reference: Run):
    final = chain.runs["final"]
    assert final.metrics == reference.metrics
    ours, theirs = _jsonl_by_stage(chain.workspace), _jsonl_by_stage(_workspace_of(reference))
    assert ours.keys() == theirs.keys()
    assert {("synthesize", "train.jsonl"), ("score_shard", "scored.jsonl#2"), ("merge_scores", "scored_train.jsonl"),
            ("cold_start", "d_long.jsonl"), ("rl", "history.jsonl"),
            ("evaluate", "records.jsonl")} <= ours.keys()  # fmt: skip
    for stage, name in ours:
        _assert_same_jsonl(stage, name, ours[stage, name], theirs[stage, name])
    # models: the same weights and tokenizer files (the records' content digests)
    for stage in ("sft_base", "sft_long", "sft_short", "rl"):
        a = _record(Path(final.summary["stage_dirs"][stage]))["digests"]
        b = _record(Path(reference.summary["stage_dirs"][stage]))["digests"]
        assert a == b, stage
    assert _leftovers(chain.workspace) == []
    _assert_records_match_their_files(chain.workspace)


# ----------------------------------------------------------------------------------------- concurrency


@pytest.fixture(scope="module")
def concurrent(root: Path, launched: dict[str, subprocess.Popen]) -> tuple[Path, dict[str, Run]]:
    """Two smoke runs and one run of a second profile, started together on one fresh workspace."""
    runs = {}
    for name, log in (("a", "same-a"), ("b", "same-b"), ("theta", "other-profile")):
        runs[name] = _finish(root, log, launched[log])
    for name, run in runs.items():
        assert run.rc == 0, f"concurrent run {name} exited with {run.rc}:\n{run.log[-4000:]}"
    return root / "ws-concurrent", runs


@pytest.mark.slow
def test_same_inputs_at_once_compute_each_stage_once_and_agree(concurrent, reference: Run):
    ws, runs = concurrent
    a, b = runs["a"].summary, runs["b"].summary
    assert a["base_model_version"] and a["pair_version"]
    assert a["stage_dirs"] == b["stage_dirs"]
    assert runs["a"].metrics == runs["b"].metrics == reference.metrics
    # each stage folder was computed by exactly one of the three runs: the others waited on its lock and
    # reused its record (and a record counts as computed only by the flow run that wrote it)
    computed = sum(r.summary["n_stages"] - r.summary["cache_hits"] for r in runs.values())
    assert computed == len(list(_artifacts(ws).glob("*/*/record.json")))
    # the same models were registered once, as one version each, whichever run logged first
    assert a["base_model_version"] == b["base_model_version"] == "1"
    assert (a["long_version"], a["short_version"]) == (b["long_version"], b["short_version"]) == ("1", "1")
    # the same pair measured the same: one version, which the second run to log finds and records (also_run.<id>)
    assert a["pair_version"] == b["pair_version"] == "1"
    assert a["mlflow_run_id"] != b["mlflow_run_id"]
    # the outputs equal those of the smoke profile run alone
    for stage, folder in a["stage_dirs"].items():
        ref = Path(reference.summary["stage_dirs"][stage])
        assert sorted(f.name for f in Path(folder).glob("*.jsonl")) == sorted(f.name for f in ref.glob("*.jsonl"))
        for f in sorted(Path(folder).glob("*.jsonl")):
            _assert_same_jsonl(stage, f.name, f.read_bytes(), (ref / f.name).read_bytes())
        assert _record(Path(folder))["digests"] == _record(ref)["digests"], stage


@pytest.mark.slow
def test_a_second_profile_at_once_gets_its_own_folders(concurrent):
    ws, runs = concurrent
    smoke, theta = runs["a"].summary, runs["theta"].summary
    assert theta["profile"] == "smoke-theta"
    upstream = ("synthesize", "sft_base", "evaluate_base", "chunk", "merge_scores")
    downstream = ("cold_start", "sft_long", "sft_short", "rl", "evaluate")
    assert all(theta["stage_dirs"][s] == smoke["stage_dirs"][s] for s in upstream)  # same inputs, shared
    assert all(theta["stage_dirs"][s] != smoke["stage_dirs"][s] for s in downstream)  # own folders
    assert {k: v for k, v in theta["metrics"].items() if k.startswith(("n_", "chunk_", "score_"))} == {
        k: v for k, v in smoke["metrics"].items() if k.startswith(("n_", "chunk_", "score_"))
    }
    # nothing half-written or clobbered: every record's files exist with the digests it recorded
    assert _leftovers(ws) == []
    _assert_records_match_their_files(ws)
    (cold_a,), (cold_t,) = ([Path(r["stage_dirs"]["cold_start"])] for r in (smoke, theta))
    for cold, summary in ((cold_a, smoke), (cold_t, theta)):
        recorded = _outcomes(_record(cold)["metrics"])
        assert recorded and recorded == {k: v for k, v in _outcomes(summary["metrics"]).items() if k in recorded}


# ------------------------------------------------------------------------------- the pieces, in-process


def test_fault_point_kills_only_at_the_named_event():
    from longshort.io import FAULT_ENV, fault_point

    fault_point("write:anything")  # not set here: a no-op
    code = "from longshort.io import fault_point as f; f('a'); print('after a'); f('b'); print('after b')"
    env = {**os.environ, FAULT_ENV: "b"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and done.stdout == "after a\n"


def test_a_stage_folder_has_one_writer_and_the_other_reuses_its_record(tmp_path: Path):
    from flows.stages import _run_stage, stage_lock_path
    from longshort.io import write_jsonl

    calls: list[Path] = []
    inside, contended = threading.Event(), threading.Event()
    waited: list[bool] = []

    def body(folder: Path) -> dict:
        calls.append(folder)
        inside.set()
        # the first writer finishes only once the second caller has found the lock taken and said so
        waited.append(contended.wait(30))
        write_jsonl(folder / "out.jsonl", [{"n": len(calls)}])
        return {"outputs": {"out": str(folder / "out.jsonl")}, "metrics": {"n": float(len(calls))}}

    out = tmp_path / "artifacts" / "demo" / "0123456789abcdef"
    messages: list[str] = []

    def emit(record: logging.LogRecord) -> None:
        messages.append(record.getMessage())
        if "another run is writing" in messages[-1]:
            contended.set()

    handler = logging.Handler(logging.INFO)
    handler.emit = emit  # type: ignore[method-assign]
    logger = logging.getLogger("longshort.stages")  # the stage logger outside a Prefect run
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # not `logger.level = ...`: that keeps isEnabledFor's cached answers
    try:
        with ThreadPoolExecutor(2) as pool:  # flock also excludes another open file description in one process
            first = pool.submit(_run_stage, "demo", "key", str(out), body)
            assert inside.wait(10)
            second = pool.submit(_run_stage, "demo", "key", str(out), body)
            a, b = first.result(timeout=30), second.result(timeout=30)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert calls == [out] and waited == [True] and a == b and a.metrics["n"] == 1.0
    assert any("another run is writing" in m for m in messages)
    assert any("reusing finished artifacts" in m for m in messages)
    assert stage_lock_path(out) == out.parent / "0123456789abcdef.lock" and stage_lock_path(out).is_file()


def test_a_rerun_removes_what_a_killed_atomic_write_left(tmp_path: Path):
    from flows.stages import _run_stage

    out = tmp_path / "stage"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "weights.bin").write_bytes(b"kept")  # a checkpoint to resume from
    (out / ".train.jsonl.k3j2x.tmp").write_text('{"half": ')  # the temporary file of a killed write
    (out / "checkpoints" / ".state.json.0a1b.tmp").write_text("{")
    seen: list[list[str]] = []

    def body(folder: Path) -> dict:
        seen.append(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
        return {}

    _run_stage("demo", "key", str(out), body)
    assert seen == [["checkpoints/step-1/weights.bin"]]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["record.json", "weights.bin"]


def test_what_a_stage_left_in_reference_cycles_is_freed_before_the_next_stage_starts(tmp_path: Path, monkeypatch):
    """The stages share one process; on a GPU the next one may start a vLLM engine, which refuses to start unless
    its share is free. A trainer's objects form reference cycles (callbacks, hooks) that only a collection frees:
    the stage runner collects (and empties the CUDA cache) as each stage ends, failed ones included. A process
    that never started CUDA skips the collection (it only costs time there)."""
    import gc
    import weakref

    from flows.stages import _run_stage
    from longshort import memory

    class Trained:  # stands for a model held in a cycle with its trainer
        pass

    left: list[weakref.ref] = []

    def body(folder: Path) -> dict:
        model = Trained()
        model.trainer = {"model": model}  # a cycle: dropping the names does not free it
        left.append(weakref.ref(model))
        return {}

    def failing(folder: Path) -> dict:
        body(folder)
        raise RuntimeError("out of memory")

    gc.disable()  # no automatic collection: only the runner's
    try:
        _run_stage("demo", "key", str(tmp_path / "cpu"), body)
        assert left[0]() is not None  # this machine never started CUDA: nothing collected
        monkeypatch.setattr(memory, "_accelerator_in_use", lambda: True)  # as after a stage trained on a GPU
        _run_stage("demo", "key", str(tmp_path / "ok"), body)
        assert left[0]() is None and left[1]() is None
        with pytest.raises(RuntimeError):
            _run_stage("demo", "key", str(tmp_path / "failed"), failing)
        assert left[2]() is None
    finally:
        gc.enable()


def _main(profile: str, workspace: str, summary_path: str, *overrides: str) -> None:
    """Child body: one pipeline run with its workspace in ``workspace``; the summary as JSON."""
    import torch

    torch.set_num_threads(1)
    from flows.pipeline import pipeline

    handler = logging.StreamHandler()  # the stage functions' own log lines ("RL: resuming from ...")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(name)s | %(message)s"))
    logging.getLogger("tasks").addHandler(handler)
    logging.getLogger("tasks").setLevel(logging.INFO)

    start = time.time()
    summary = pipeline(profile=profile, overrides=[f"run.workspace={workspace}", *overrides])
    summary["child_wall_s"] = round(time.time() - start, 2)
    Path(summary_path).write_text(json.dumps(summary, default=str, indent=1))


if __name__ == "__main__":
    _main(*sys.argv[1:])


def test_a_checkpoint_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, tiny_model, demo_tokenizer, monkeypatch):
    """save_checkpoint fsyncs every file it wrote, and their folders, while they still have their temporary
    names, then the folder that gains the new name: after a power cut the name points at whole files or is absent."""
    import torch

    from longshort import io as lsio
    from tasks import rl_checkpoint

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(lsio.os, "fsync", fsync)
    monkeypatch.setattr(lsio.os, "replace", replace)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    final = rl_checkpoint.save_checkpoint(
        tmp_path, 3, {"long": tiny_model}, {"long": demo_tokenizer}, {"long": opt}, {"step": 3}, keep=2
    )
    tmp = final.with_name(".tmp-step-000003")
    renamed = events.index(("replace", str(tmp)))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    written = {str(tmp / p.relative_to(final)) for p in final.rglob("*")} | {str(tmp)}
    assert written <= synced, sorted(written - synced)
    assert {"state.json", "optim.pt", "model.safetensors"} <= {p.name for p in final.rglob("*")}
    assert ("fsync", str(final.parent)) in events[renamed:]


def test_a_filesystem_that_cannot_flush_folders_still_saves_but_a_failed_file_flush_is_an_error(
    tmp_path, tiny_model, demo_tokenizer, monkeypatch, caplog
):
    """fsync of a folder is EINVAL on some filesystems (CIFS before Linux 4.17; ENOTSUP on macOS SMB shares): the
    save goes on with one warning per filesystem. A file that cannot be flushed (EIO) fails the save, as before."""
    import errno
    import stat

    import torch

    from longshort import io as lsio
    from tasks import rl_checkpoint

    real_fsync = os.fsync
    fail = {"folder": errno.EINVAL, "file": None}

    def fsync(fd: int) -> None:
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        if fail[kind] is not None:
            raise OSError(fail[kind], os.strerror(fail[kind]))
        real_fsync(fd)

    monkeypatch.setattr(lsio.os, "fsync", fsync)
    monkeypatch.setattr(lsio, "_folder_sync_warned", set())
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    models, toks, opts = {"long": tiny_model}, {"long": demo_tokenizer}, {"long": opt}
    with caplog.at_level(logging.WARNING, logger="longshort.io"):
        rl_checkpoint.save_checkpoint(tmp_path, 1, models, toks, opts, {"step": 1}, keep=3)
        rl_checkpoint.save_checkpoint(tmp_path, 2, models, toks, opts, {"step": 2}, keep=3)
    assert rl_checkpoint.last_checkpoint(tmp_path).name == "step-000002"
    assert sum("cannot flush folders" in r.getMessage() for r in caplog.records) == 1  # once per filesystem
    fail.update(folder=errno.EIO)  # a real I/O error on a folder is not "unsupported"
    with pytest.raises(OSError, match="Input/output error"):
        rl_checkpoint.save_checkpoint(tmp_path, 3, models, toks, opts, {"step": 3}, keep=3)
    fail.update(folder=None, file=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        rl_checkpoint.save_checkpoint(tmp_path, 4, models, toks, opts, {"step": 4}, keep=3)
    assert rl_checkpoint.last_checkpoint(tmp_path).name == "step-000002"  # the failed saves left no checkpoint
