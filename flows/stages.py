"""Prefect tasks: each wraps one plain stage function with caching, logging and a record.

A task receives JSON-able config sections and upstream paths, plus ``key`` and
``out_dir`` computed by ``flows.caching``; it returns a small StageRecord.
Nothing here implements an algorithm: that lives in ``tasks/``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.caching import STAGE_CACHE
from longshort.config import (
    BaselineConfig,
    ChunkConfig,
    ColdStartConfig,
    DataConfig,
    EvaluateConfig,
    GenerationConfig,
    ModelConfig,
    Profile,
    ProtocolConfig,
    RLConfig,
    ScoreConfig,
    SFTConfig,
    TokenizerConfig,
    repo_file,
)
from longshort.memory import PeakRSS, free_accelerator_memory
from longshort.io import ensure_dir, fault_point, file_lock, json_digest, remove_stale_temps, tree_digest, write_jsonl
from longshort.records import StageRecord


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow; a plain logger when DVC runs a stage's ``.fn`` directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("longshort.stages")


def stage_lock_path(out_dir: Path) -> Path:
    """``artifacts/<stage>/<key>.lock``, next to the folder it guards (a lock inside would be deleted with it)."""
    return out_dir.parent / f"{out_dir.name}.lock"


def _run_stage(stage: str, key: str, out_dir: str, body: Callable[[Path], dict[str, Any]]) -> StageRecord:
    """Reuse a finished folder, else run ``body`` and save its record last.

    The folder is written by one process at a time: ``body`` runs under an exclusive file lock, so two
    pipeline runs with the same inputs (the same key) never write the same folder at once; the second
    waits, then finds the first one's record and reuses it. A run killed mid-stage releases the lock with
    its death and leaves no record, so the next run redoes the stage, resuming from the checkpoints that
    ``body`` wrote there (SFT, RL), after deleting the temporary files of writes that were cut short.
    """
    logger = _logger()
    folder = Path(out_dir)
    done = finished_record(stage, key, folder, logger)
    if done is None:
        def waiting() -> None:
            logger.info("%s: another run is writing %s; waiting for it", stage, out_dir)

        with file_lock(stage_lock_path(folder), on_wait=waiting):
            done = finished_record(stage, key, folder, logger)  # the run we waited for may have finished it
            if done is None:
                return _run_body(stage, key, folder, body, logger)
    logger.info("%s: reusing finished artifacts in %s", stage, out_dir)
    return done


def finished_record(stage: str, key: str, folder: Path, logger: logging.Logger | logging.LoggerAdapter) -> StageRecord | None:
    """The folder's record when it was made from these inputs (``key``). A record of other inputs (a folder
    that `longshort stage` fills again after a settings change) is stale: the folder is removed, checkpoints
    included, since they belong to the other inputs."""
    done = StageRecord.load(folder)
    if done is not None and done.key != key:
        logger.warning("%s: %s holds results of other inputs (key %s, now %s); recomputing", stage, folder,
                       done.key[:16], key[:16])  # fmt: skip
        shutil.rmtree(folder)
        return None
    return done


def _run_body(
    stage: str, key: str, folder: Path, body: Callable[[Path], dict[str, Any]],
    logger: logging.Logger | logging.LoggerAdapter,
) -> StageRecord:  # fmt: skip
    created = not folder.exists()
    ensure_dir(folder)
    for stale in remove_stale_temps(folder):
        logger.warning("%s: removed %s, left by an interrupted write", stage, stale)
    start = time.perf_counter()
    try:
        with PeakRSS() as rss:  # the stage's peak_rss_mb metric (an output: not part of any cache key)
            fields = body(folder)
    except Exception:
        if created:  # failed before writing anything (bad input): leave no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty; checkpoints stay for the rerun
        raise
    finally:  # the stages share one process: what this one trained must not hold the GPU for the next one's engines
        free_accelerator_memory()
    if rss.peak_mb is not None:
        fields = {**fields, "metrics": {**fields.get("metrics", {}), "peak_rss_mb": rss.peak_mb}}
    record = StageRecord(
        stage=stage,
        key=key,
        path=str(folder),
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        duration_s=round(time.perf_counter() - start, 3),
        **fields,
    )
    record.save()
    fault_point(f"record:{stage}")
    logger.info("%s: done in %.1f s; metrics %s", stage, record.duration_s, record.metrics)
    return record


@task(name="synthesize", cache_policy=STAGE_CACHE, persist_result=True)
def synthesize_task(
    key: str, out_dir: str, data: dict, generation: dict, base_model: dict, seed: int
) -> StageRecord:
    from tasks.synthesize import synthesize  # noqa: PLC0415 - keep flow import light

    def body(folder: Path) -> dict[str, Any]:
        files = synthesize(
            DataConfig.model_validate(data),
            folder,
            GenerationConfig.model_validate(generation),
            ModelConfig.model_validate(base_model),
            seed=seed,
        )
        return {
            "outputs": {"train": files.train, "heldout": files.heldout},
            "digests": {"train_md5": files.train_md5, "heldout_md5": files.heldout_md5},
            "metrics": {"n_train": files.n_train, "n_heldout": files.n_heldout},
        }

    return _run_stage("synthesize", key, out_dir, body)


@task(name="sft_base", cache_policy=STAGE_CACHE, persist_result=True)
def sft_base_task(
    key: str, out_dir: str, train_path: str, base_model: dict, tokenizer: dict, sft: dict, seed: int
) -> StageRecord:
    from tasks.base_model import train_base_model  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        result = train_base_model(
            read_split(train_path),
            ModelConfig.model_validate(base_model),
            TokenizerConfig.model_validate(tokenizer),
            SFTConfig.model_validate(sft),
            folder,
            seed=seed,
        )
        return {
            "outputs": {"model": result.model_dir},
            "digests": {"model": tree_digest(Path(result.model_dir))},
            "metrics": {
                "train_loss": result.train_loss,
                "train_steps": result.steps,
                "train_runtime_s": result.train_runtime_s,
                "train_tokens_per_s": result.train_tokens / max(result.train_runtime_s, 1e-9),
            },
        }

    return _run_stage("sft_base", key, out_dir, body)


@task(name="evaluate_base", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_base_task(
    key: str,
    out_dir: str,
    model_dir: str,
    heldout_path: str,
    base_model: dict,
    generation: dict,
    evaluate: dict,
    protocol: dict,
    seed: int,
) -> StageRecord:
    """The base alone, thinking and forced to answer at once, sampled as the evaluate stage samples.

    The forced answer is one ``<answer>`` turn, so it gets the pair's answer-turn cap
    (``protocol.max_new_tokens_short``).
    """
    from models.generation import close_backend, make_backend  # noqa: PLC0415
    from tasks.evaluate import evaluate_single_model  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        cfg = EvaluateConfig.model_validate(evaluate)
        answer_cap = ProtocolConfig.model_validate(protocol).max_new_tokens_short
        rows = read_split(heldout_path)[: cfg.n_problems]
        backend = make_backend(
            model_dir, ModelConfig.model_validate(base_model), GenerationConfig.model_validate(generation), seed
        )
        try:
            sampling = dict(k=cfg.k, temperature=cfg.temperature, seed=seed)
            think, think_records = evaluate_single_model(
                backend, rows, think=True, max_new_tokens=cfg.max_new_tokens, **sampling
            )
            direct, direct_records = evaluate_single_model(
                backend, rows, think=False, max_new_tokens=answer_cap, **sampling
            )
        finally:
            close_backend(backend)  # frees a vLLM engine's GPU memory for the next stage
        write_jsonl(folder / "episodes_think.jsonl", think_records)
        write_jsonl(folder / "episodes_nothink.jsonl", direct_records)
        return {
            "outputs": {"think": str(folder / "episodes_think.jsonl"), "nothink": str(folder / "episodes_nothink.jsonl")},
            "metrics": {**think.metrics("base_"), **direct.metrics("base_nothink_")},
        }

    return _run_stage("evaluate_base", key, out_dir, body)


@task(name="track", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30)  # a tracking server restarting
def track_task(profile: dict, records: list[StageRecord], flow_time_s: float, cache_hits: int) -> dict[str, Any]:
    """Log the run to MLflow and register the base model (idempotent by model digest)."""
    from longshort import tracking  # noqa: PLC0415

    cfg = Profile.model_validate(profile)
    return tracking.log_pipeline(cfg, records, flow_time_s=flow_time_s, cache_hits=cache_hits)


@task(name="version_data", cache_policy=NO_CACHE)
def version_data_task(stages: list[str], expect: dict[str, str] | None = None) -> dict[str, str]:
    """Reproduce the DVC data stages in this checkout and push them to LONGSHORT_DVC_REMOTE (a side effect);
    ``expect`` maps DVC outputs to the run's own files, which must have the same bytes."""
    from tasks import versioning  # noqa: PLC0415

    remote = versioning.Remote.from_env()
    if remote is None:
        raise versioning.DVCError(f"{versioning.REMOTE_ENV} is not set: no DVC remote to push to")
    digests = versioning.version_stages(stages, remote, expect=expect)
    get_run_logger().info("dvc: pushed %s to %s: %s", stages, remote.url, digests)
    return digests


def _local_dir_digest(name_or_path: str | None) -> dict[str, str]:
    """``{"files": digest}`` of a model named by a local path (the rule ``load_pretrained`` uses: the path
    exists), else nothing: a hub id is keyed by its config entry, the id and its ``revision``. Hashing reads
    every byte, about 1 GB/s with a warm page cache (a 7B folder: 15-30 s per run); logged when slow."""
    if not name_or_path or not Path(name_or_path).exists():
        return {}
    start = time.perf_counter()
    digest = tree_digest(Path(name_or_path))
    if (took := time.perf_counter() - start) > 5:
        _logger().info("cache key: hashed the local model %s in %.0f s", name_or_path, took)
    return {"files": digest}


def file_digests(cfg: Profile, stages: Collection[str] | None = None) -> dict[str, dict[str, str]]:
    """Per stage, digests of the local files it reads by path, for its cache key (the flow's ``key_extra``, the
    DVC stages' input keys): editing such a file in place recomputes what read it (and, through the upstream
    paths in their keys, what follows). These are data.path and a local data.teacher model folder (synthesize), a
    local base_model.name_or_path folder (sft_base, the one stage that loads it; later stages load sft_base's model),
    local benchmark files or folders (evaluate) and the DeepSpeed config of sft_base, sft_long, sft_short and
    baseline (the file the path names, resolved as the trainer resolves it). A hub dataset or model is keyed by
    its config entry alone, the id and its ``revision`` (data.teacher has none): pin a commit if it may change.
    ``stages`` limits the work to those (a DVC stage hashes only its own files); others are left out."""
    from tasks.benchmarks import is_local_source  # noqa: PLC0415

    def deepspeed(path: str | None) -> dict[str, str]:
        return {"deepspeed_file": tree_digest(Path(repo_file(path)))} if path else {}

    def synthesize() -> dict[str, str]:
        data = {}
        if cfg.data.path and Path(cfg.data.path).exists():  # the profile's paths come with ~ expanded
            data["data_file"] = tree_digest(Path(cfg.data.path))
        if cfg.data.source == "teacher":
            data.update({f"teacher_{k}": v for k, v in _local_dir_digest(cfg.data.teacher).items()})
        return data

    def sft_base() -> dict[str, str]:
        base = _local_dir_digest(cfg.base_model.name_or_path) if cfg.base_model.source == "pretrained" else {}
        return {**deepspeed(cfg.sft_base.deepspeed), **{f"base_model_{k}": v for k, v in base.items()}}

    def evaluate() -> dict[str, str]:
        return {
            f"benchmark_file:{b.source}": tree_digest(Path(b.source).expanduser())
            for b in cfg.evaluate.benchmarks
            if is_local_source(b.source) and Path(b.source).expanduser().exists()
        }

    parts: dict[str, Callable[[], dict[str, str]]] = {
        "synthesize": synthesize,
        "evaluate": evaluate,
        "sft_base": sft_base,
        "sft_long": lambda: deepspeed(cfg.sft_long.deepspeed),
        "sft_short": lambda: deepspeed(cfg.sft_short.deepspeed),
        "baseline": lambda: deepspeed(cfg.baseline.deepspeed),
    }
    return {stage: digest() for stage, digest in parts.items() if stages is None or stage in stages}


def chunk_llm(cfg: Profile, model_dir: str) -> dict[str, Any]:
    """``chunk_task``'s ``llm`` input for ``chunk.method: llm``: the model to prompt and how to load and run it."""
    return {"model_dir": model_dir, "base_model": cfg.section_dump("base_model"), "generation": cfg.section_dump("generation")}


@task(name="chunk", cache_policy=STAGE_CACHE, persist_result=True)
def chunk_task(
    key: str, out_dir: str, train_path: str, heldout_path: str, chunk: dict, n_train: int, n_heldout: int, seed: int,
    llm: dict | None = None,
) -> StageRecord:  # fmt: skip
    """Thoughts of the first ``n_train`` training traces and ``n_heldout`` held-out traces (those with one:
    ``data.source: teacher`` writes none for held-out problems, which only evaluation reads). ``chunk.method: llm``
    needs ``llm`` = ``{model_dir, base_model, generation}``: the model that is prompted for the blocks."""
    from tasks.chunking import chunk_rows  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        cfg = ChunkConfig.model_validate(chunk)
        from models.generation import close_backend, make_backend  # noqa: PLC0415

        backend = None
        if cfg.method == "llm":
            if not llm:
                raise ValueError("chunk.method is 'llm' but no model was given to prompt")
            backend = make_backend(
                llm["model_dir"], ModelConfig.model_validate(llm["base_model"]),
                GenerationConfig.model_validate(llm["generation"]), seed,
            )  # fmt: skip
        outputs, metrics = {}, {}
        try:
            for split, path, n in (("train", train_path, n_train), ("heldout", heldout_path, n_heldout)):
                rows = read_split(path)
                if split == "heldout":  # a teacher answers the training problems only: held-out rows may have no trace
                    rows = [r for r in rows if "response" in r]
                rows = chunk_rows(rows[:n], cfg, backend, seed=seed)
                write_jsonl(folder / f"chunks_{split}.jsonl", rows)
                outputs[split] = str(folder / f"chunks_{split}.jsonl")
                metrics[f"chunk_{split}_traces"] = len(rows)
                metrics[f"chunk_{split}_thoughts_per_trace"] = sum(len(r["thoughts"]) for r in rows) / max(len(rows), 1)
                if cfg.method == "llm":  # a run whose model answers were all rejected is rules in disguise
                    asked = [r for r in rows if r["chunk_method"] != "rules"]  # rules: under two steps, never asked
                    fallback = sum(r["chunk_method"] == "fallback" for r in asked)
                    metrics[f"chunk_{split}_llm_fallback_share"] = fallback / max(len(asked), 1)
                    if fallback:
                        _logger().warning(
                            "chunk: %d of %d %s traces fell back to the rules (every model answer rejected; "
                            "tasks.chunking's log says why)", fallback, len(asked), split,
                        )  # fmt: skip
        finally:
            close_backend(backend)
        return {"outputs": outputs, "metrics": metrics}

    return _run_stage("chunk", key, out_dir, body)


def score_shards(cfg: Profile, chunks: StageRecord, model: StageRecord) -> tuple[list[tuple[str, list[dict]]], dict]:
    """The chunked traces of each split cut into shards of ``score.shard_size``, and the inputs every
    shard shares; the flow maps ``score_shard_task`` over them, ``longshort stage score`` loops."""
    from tasks.synthesize import read_split  # noqa: PLC0415

    shared = dict(model_dir=model.outputs["model"], base_model=cfg.section_dump("base_model"),
                  generation=cfg.section_dump("generation"), score=cfg.section_dump("score"))  # fmt: skip
    size = cfg.score.shard_size
    shards = []
    for split in ("train", "heldout"):
        rows = read_split(chunks.outputs[split])
        shards += [(split, rows[i : i + size]) for i in range(0, len(rows), size)]
    return shards, shared


# Score shards that run one after another in one process share one backend per model and settings (a vLLM engine
# start is model loading, memory profiling and CUDA graph capture: about a minute for a 7B model, and the GPU
# profiles cut 2,100 traces into 33 shards). ``shared_shard_backends`` opens a pool for one run's shards: a
# ContextVar, which Prefect's thread runner copies into the threads it runs them on, so the shards of another run
# in the same process do not see it; a shard on a Dask/Ray worker, another process, builds and closes its own.
class _BackendPool:
    """The shared backends of one ``shared_shard_backends`` block. A backend is closed by whoever leaves it last:
    the block's end, or a shard still running on it then (a failed shard's successor may have started)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, Any] = {}
        self._users: Counter[int] = Counter()  # shards running on each backend, by id
        self._open = True

    def acquire(self, key: str, build: Callable[[], Any]) -> tuple[Any, bool]:
        """The backend for ``key`` and whether it is the pool's (else the caller's own, to close)."""
        with self._lock:
            if not self._open:  # a shard that starts after the block ended
                return build(), False
            if key not in self._backends:
                self._backends[key] = build()
            backend = self._backends[key]
            self._users[id(backend)] += 1
            return backend, True

    def release(self, key: str, backend: Any, failed: bool) -> None:
        """A shard is done with ``backend``. One that failed takes it out of the pool, so that its retry starts a
        fresh one; a backend out of the pool is closed when its last shard is done."""
        from models.generation import close_backend  # noqa: PLC0415

        with self._lock:
            self._users[id(backend)] -= 1
            idle = self._users[id(backend)] == 0
            if self._backends.get(key) is backend and (failed or (idle and not self._open)):
                del self._backends[key]
            close = idle and self._backends.get(key) is not backend
            if idle:
                del self._users[id(backend)]
        if close:
            close_backend(backend)

    def close(self) -> None:
        """The block's end: close the backends nobody runs on; the others close when their shard is done."""
        from models.generation import close_backend  # noqa: PLC0415

        with self._lock:
            self._open = False
            idle = [k for k, b in self._backends.items() if self._users[id(b)] == 0]
            backends = [self._backends.pop(k) for k in idle]
        for backend in backends:
            close_backend(backend)


_SHARD_POOL: ContextVar[_BackendPool | None] = ContextVar("longshort_shard_backends", default=None)


@contextlib.contextmanager
def shared_shard_backends(enabled: bool = True) -> Iterator[None]:
    """Within, the score shards this context starts reuse the backend the first one built; closed at the end.

    Only for shards that run one at a time (``run.max_workers`` 1 on the thread runner, the DVC loop): a backend
    is one engine, not safe to call from two threads. ``enabled=False`` keeps an enclosing pool from them too."""
    pool = _BackendPool() if enabled else None
    token = _SHARD_POOL.set(pool)
    try:
        yield
    finally:
        _SHARD_POOL.reset(token)
        if pool is not None:
            pool.close()


@contextlib.contextmanager
def _shard_backend(model_dir: str, base_model: dict, generation: dict, seed: int) -> Iterator[Any]:
    """The backend a score shard samples with: its run's shared one inside ``shared_shard_backends``, else its
    own, closed after it."""
    from models.generation import close_backend, make_backend  # noqa: PLC0415

    def build() -> Any:
        return make_backend(
            model_dir, ModelConfig.model_validate(base_model), GenerationConfig.model_validate(generation), seed
        )

    pool = _SHARD_POOL.get()
    key = json_digest([model_dir, base_model, generation, seed])
    backend, pooled = pool.acquire(key, build) if pool is not None else (build(), False)
    failed = False
    try:
        yield backend
    except BaseException:
        failed = True
        raise
    finally:
        if pooled:
            pool.release(key, backend, failed)
        else:
            close_backend(backend)


@task(name="score_shard", cache_policy=STAGE_CACHE, persist_result=True, retries=1)
def score_shard_task(
    key: str, out_dir: str, rows: list[dict], model_dir: str, base_model: dict, generation: dict, score: dict,
    shard_no: int = 0,
) -> StageRecord:
    """Monte Carlo importance for shard ``shard_no`` of the traces (mapped; a failed shard is retried alone;
    the index seeds its rollouts, ``tasks.importance.score_traces``)."""
    from tasks.importance import score_rows  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        cfg = ScoreConfig.model_validate(score)
        with _shard_backend(model_dir, base_model, generation, cfg.seed) as backend:
            scored = score_rows(backend, rows, cfg, first_shard=shard_no)
        write_jsonl(folder / "scored.jsonl", scored)
        return {"outputs": {"scored": str(folder / "scored.jsonl")}, "metrics": {"n_traces": len(scored)}}

    return _run_stage("score_shard", key, out_dir, body)


@task(name="merge_scores", cache_policy=STAGE_CACHE, persist_result=True)
def merge_scores_task(key: str, out_dir: str, shards: dict[str, list[str]]) -> StageRecord:
    """Concatenate the shards of each split, in order, and summarise acc_0 / acc_n."""
    from tasks.importance import score_summary  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        outputs, metrics = {}, {}
        for split, paths in shards.items():
            rows = [row for p in paths for row in read_split(p)]
            write_jsonl(folder / f"scored_{split}.jsonl", rows)
            outputs[split] = str(folder / f"scored_{split}.jsonl")
            metrics.update({f"score_{split}_{k}": v for k, v in score_summary(rows).items()})
        return {"outputs": outputs, "metrics": metrics}

    return _run_stage("merge_scores", key, out_dir, body)


def cold_start_limits(cfg: Profile) -> dict[str, Any]:
    """``cold_start_task``'s protocol inputs: the turn cap and each role's per-turn token cap (long, short)."""
    p = cfg.protocol
    return {"max_turns": p.max_turns, "max_turn_tokens": [p.max_new_tokens_long, p.max_new_tokens_short]}


@task(name="cold_start", cache_policy=STAGE_CACHE, persist_result=True)
def cold_start_task(
    key: str, out_dir: str, scored_path: str, train_path: str, model_dir: str, base_model: dict,
    generation: dict, cold_start: dict, seed: int, max_turns: int | None = None,
    max_turn_tokens: list[int] | None = None,
) -> StageRecord:  # fmt: skip
    """D_long and D_short from the scored traces (``max_turns``, ``max_turn_tokens``: the protocol's caps,
    ``tasks.cold_start.build_cold_start``)."""
    from models.generation import close_backend, make_backend  # noqa: PLC0415
    from tasks.cold_start import build_cold_start, make_compressor, write_cold_start  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        cfg = ColdStartConfig.model_validate(cold_start)
        backend = make_backend(
            model_dir, ModelConfig.model_validate(base_model), GenerationConfig.model_validate(generation), seed
        )
        teacher_rows = read_split(train_path) if cfg.compressor == "demo_terse" else None
        try:
            compressor = make_compressor(cfg, rows=teacher_rows, backend=backend, seed=seed)
            d_long, d_short, stats = build_cold_start(
                read_split(scored_path), cfg, compressor, backend.count_tokens, max_turns=max_turns,
                max_turn_tokens=tuple(max_turn_tokens) if max_turn_tokens else None,
            )
        finally:
            close_backend(backend)
        path_long, path_short = write_cold_start(folder, d_long, d_short)
        numeric = {f"cold_start_{k}": float(v) for k, v in stats.as_dict().items() if isinstance(v, (int, float))}
        return {"outputs": {"long": str(path_long), "short": str(path_short)}, "metrics": numeric}

    return _run_stage("cold_start", key, out_dir, body)


@task(name="sft_role", cache_policy=STAGE_CACHE, persist_result=True)
def sft_role_task(
    key: str, out_dir: str, role: str, data_path: str, model_dir: str, base_model: dict, sft: dict, seed: int
) -> StageRecord:
    """SFT of the long-thought or short-thought model from the base model on D_long / D_short."""
    from models.factory import load_model  # noqa: PLC0415
    from tasks.cold_start import pair_sft_examples  # noqa: PLC0415
    from tasks.sft import train_sft  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        model, tokenizer = load_model(ModelConfig.model_validate(base_model), path=model_dir)
        examples = pair_sft_examples(tokenizer, read_split(data_path), role)
        result = train_sft(examples, model.train(), tokenizer, SFTConfig.model_validate(sft), folder, seed=seed)
        return {
            "outputs": {"model": result.model_dir},
            "digests": {"model": tree_digest(Path(result.model_dir))},
            "metrics": {f"sft_{role}_train_loss": result.train_loss, f"sft_{role}_steps": result.steps},
        }

    return _run_stage(f"sft_{role}", key, out_dir, body)


@task(name="rl", cache_policy=STAGE_CACHE, persist_result=True)
def rl_task(
    key: str, out_dir: str, long_dir: str, short_dir: str, train_path: str, base_model: dict, protocol: dict,
    rl: dict, n_problems: int, generation: dict,
) -> StageRecord:  # fmt: skip
    """Synergizing multi-turn GRPO of the pair; resumes from its own checkpoints after a crash.
    Rollouts run on vLLM engines when ``generation`` resolves to vLLM (CUDA and the package), else on the models."""
    from tasks.rl import probe_gain, quarter_means, train_pair_rl  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    logger = _logger()

    def body(folder: Path) -> dict[str, Any]:
        problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in read_split(train_path)]
        cfg = RLConfig.model_validate(rl)
        probe_rows = problems[n_problems : n_problems + cfg.probe_problems]
        if len(probe_rows) < cfg.probe_problems:
            logger.warning("rl: %d probe problems asked for, %d training problems left after rl.n_problems = %d",
                           cfg.probe_problems, len(probe_rows), n_problems)  # fmt: skip
        result = train_pair_rl(
            long_dir, short_dir, problems[:n_problems], cfg, folder,
            model_cfg=ModelConfig.model_validate(base_model), protocol=ProtocolConfig.model_validate(protocol),
            on_step=lambda m: logger.info("rl step %s: %s", m.get("step"), _brief(m)),
            probe_problems=probe_rows, generation=GenerationConfig.model_validate(generation),
        )  # fmt: skip
        write_jsonl(folder / "history.jsonl", result.history)
        outputs = {"long": result.long_dir, "short": result.short_dir, "history": str(folder / "history.jsonl")}
        probe_metrics: dict[str, float] = {}
        if result.probes:
            write_jsonl(folder / "probes.jsonl", result.probes)
            outputs["probes"] = str(folder / "probes.jsonl")
            for name in ("reward", "accuracy", "tokens"):
                probe_metrics[f"rl_probe_{name}_start"] = result.probes[0][name]
                probe_metrics[f"rl_probe_{name}_end"] = result.probes[-1][name]
            probe_metrics |= probe_gain(result.probes, cfg.seed)
        first, last = result.history[0], result.history[-1]
        return {
            "outputs": outputs,
            "digests": {"long": tree_digest(Path(result.long_dir)), "short": tree_digest(Path(result.short_dir))},
            "metrics": {
                "rl_steps": result.steps,
                "rl_first_reward": first["reward/total"],
                "rl_last_reward": last["reward/total"],
                **quarter_means(result.history, {"reward": "reward/total", "accuracy": "accuracy", "tokens": "tokens/total"}),
                **probe_metrics,
                "rl_runtime_s": result.runtime_s,
            },
        }

    return _run_stage("rl", key, out_dir, body)


@task(name="baseline", cache_policy=STAGE_CACHE, persist_result=True)
def baseline_task(
    key: str, out_dir: str, model_dir: str, train_path: str, base_model: dict, generation: dict, baseline: dict,
) -> StageRecord:  # fmt: skip
    """The single-model baseline: GRPO of the long-CoT base with the truncation recipe (tasks/baseline.py)."""
    from models.factory import load_model  # noqa: PLC0415
    from models.generation import close_backend, make_backend, resolve_backend  # noqa: PLC0415
    from tasks.baseline import easy_problems, easy_problems_once, train_truncation_baseline  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    logger = _logger()
    cfg, model_cfg, gen_cfg = (
        BaselineConfig.model_validate(baseline), ModelConfig.model_validate(base_model),
        GenerationConfig.model_validate(generation),
    )  # fmt: skip

    def body(folder: Path) -> dict[str, Any]:
        rows = read_split(train_path)[: cfg.n_problems]
        problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in rows]
        rates: dict[str, float] = {}
        if cfg.easy_filter:
            def draw(todo: list[dict]) -> tuple[list, dict[str, float]]:
                backend = make_backend(model_dir, model_cfg, gen_cfg, cfg.seed)
                try:  # under the rollout cap L_R = L_T that training uses: solved only past it earns no reward
                    return easy_problems(
                        backend, todo, samples=cfg.easy_samples, temperature=cfg.temperature,
                        max_new_tokens=cfg.length_target, seed=cfg.seed,
                    )  # fmt: skip
                finally:
                    close_backend(backend)  # TRL starts its own vLLM engine next

            problems, rates, reused = easy_problems_once(folder, problems, draw)
            if reused:
                logger.info("baseline: the easy filter's pass rates from the interrupted run in %s", folder)
            logger.info("baseline: %d of %d problems are easy (base pass rate > 0.5 within L_T = %d tokens)",
                        len(problems), len(rows), cfg.length_target)  # fmt: skip
        model, tokenizer = load_model(model_cfg, path=model_dir)
        result = train_truncation_baseline(
            model, tokenizer, problems, cfg, folder,
            use_vllm=resolve_backend(gen_cfg) == "vllm",
            on_step=lambda m: logger.info("baseline step %s: %s", m.get("step"), _brief(m)),
        )  # fmt: skip
        write_jsonl(folder / "history.jsonl", result.history)
        first, last = result.history[0], result.history[-1]
        return {
            "outputs": {"model": result.model_dir, "history": str(folder / "history.jsonl")},
            "digests": {"model": tree_digest(Path(result.model_dir))},
            "metrics": {
                "baseline_steps": result.steps,
                "baseline_problems": result.n_problems,
                "baseline_easy_fraction": result.n_problems / max(1, len(rows)),
                "baseline_first_reward": first["reward"],
                "baseline_last_reward": last["reward"],
                "baseline_first_length": first["completions/mean_length"],
                "baseline_last_length": last["completions/mean_length"],
                "baseline_runtime_s": result.runtime_s,
                **({"baseline_mean_pass_rate": sum(rates.values()) / len(rates)} if rates else {}),
            },
        }

    return _run_stage("baseline", key, out_dir, body)


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("role", "reward/total", "reward", "accuracy", "tokens/total", "completions/mean_length")
    return ", ".join(f"{k}={metrics[k]:.3g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys if k in metrics)


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_task(
    key: str, out_dir: str, systems: dict[str, dict[str, str]], heldout_path: str, scored_heldout: str,
    base_model: dict, generation: dict, protocol: dict, evaluate: dict, seed: int, reference: str | None = None,
) -> StageRecord:  # fmt: skip
    """Every system on the same held-out problems and seeds; tables, plots and the importance AUROC.
    Each system is compared with ``reference`` (the long-CoT base) with paired bootstrap intervals."""
    from tasks.report import evaluate_systems  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        report = evaluate_systems(
            systems, heldout_path, scored_heldout, ModelConfig.model_validate(base_model),
            GenerationConfig.model_validate(generation), ProtocolConfig.model_validate(protocol),
            EvaluateConfig.model_validate(evaluate), folder, seed, reference,
        )  # fmt: skip
        return {"outputs": report.outputs, "metrics": report.metrics}

    return _run_stage("evaluate", key, out_dir, body)
