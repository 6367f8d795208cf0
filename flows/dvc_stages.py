"""The data stages as DVC runs them: ``longshort stage NAME --profile P --data DIR``.

``dvc.yaml`` calls this for sft_base, chunk, score and cold_start. Each call runs
the very function the Prefect task runs (the task's ``.fn``, no Prefect engine),
with the same inputs, into ``DIR/<stage>/``; so ``dvc repro`` and the flow write
byte-identical datasets. The synthesize stage is ``longshort synthesize`` (it reads
``params.yaml``'s ``demo`` section, which a test keeps equal to the demo profile).

These stages read only the splits that synthesize wrote, so ``longshort stage`` refuses a profile whose
``data`` section describes other data (``require_dvc_data``): another source, or demo settings other
than ``params.yaml``'s. Such a profile runs with ``longshort run``.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path

from flows import stages as st
from flows.caching import stage_key
from longshort.config import ConfigError, Profile
from longshort.io import file_digest
from longshort.records import StageRecord

DATA_STAGES = ("sft_base", "chunk", "score", "cold_start")
# Each dvc.yaml stage's code stages (flows/caching.py STAGE_MODULES keys): dvc.yaml lists the files of their
# modules as the stage's deps, with this module, flows/stages.py, what they import and longshort/cli.py, so an
# edit of any of them reruns the stage (tests/test_dvc_stages.py checks the lists). The first one names the
# code in the stage folder's key.
CODE_STAGES: dict[str, tuple[str, ...]] = {
    "synthesize": ("synthesize",), "sft_base": ("sft_base",), "chunk": ("chunk",),
    "score": ("score_shard", "merge_scores"), "cold_start": ("cold_start",),
}  # fmt: skip

log = logging.getLogger(__name__)


def _record(data: Path, stage: str) -> StageRecord:
    record = StageRecord.load(data / stage)
    if record is None:
        raise FileNotFoundError(f"{data / stage}: no finished '{stage}' stage; run `dvc repro` from the start")
    return record


def _inputs_key(name: str, cfg: Profile, data: Path) -> str:
    """What a stage folder under ``data`` is made from: the profile, the splits' bytes, the local files the
    stage reads by path (``flows.stages.file_digests``), the upstream folders' keys and the stage's code. A
    folder of other inputs is recomputed, not reused (``dvc repro`` removes its outputs first anyway; a manual
    ``longshort stage`` after a settings change or an edit of such a file does not)."""
    upstream = {s: r.key for s in DATA_STAGES[: DATA_STAGES.index(name)] if (r := StageRecord.load(data / s))}
    splits = {n: file_digest(data / n) for n in ("train.jsonl", "heldout.jsonl") if (data / n).is_file()}
    code = CODE_STAGES[name][0]
    inputs = {"profile": cfg.model_dump(mode="json"), "splits": splits, "upstream": upstream}
    if files := st.file_digests(cfg, [name]).get(name):  # sft_base: its DeepSpeed file, a local base model folder
        inputs["files"] = files
    return stage_key(code, inputs)


def require_dvc_data(cfg: Profile, params_file: Path, profile: str, overrides: Sequence[str] = ()) -> None:
    """Raise ConfigError, in one line with what to do instead, when the splits that ``dvc repro`` synthesizes
    from ``params_file`` are not the data profile ``cfg`` describes (``tasks.versioning.demo_params_mismatch``).

    The data stages read ``DIR/train.jsonl`` whatever the profile says: a profile of other data would train,
    chunk and score the demo's arithmetic traces (a 7B model's included) and ``dvc.lock`` would record them.
    """
    from tasks.versioning import demo_params_mismatch  # noqa: PLC0415

    reason = demo_params_mismatch(cfg.data, params_file)
    if reason is None:
        return
    sets = "".join(f" -s {shlex.quote(item)}" for item in overrides)  # the --set items that made ``cfg``
    instead = f"run `longshort run -p {shlex.quote(profile)}{sets}` instead"
    if cfg.data.source == "demo":
        instead += f", or set {params_file}'s 'demo' section to the profile's data.demo"
    raise ConfigError(
        f"profile '{profile}': {reason}; `longshort stage` (dvc repro) reads only the splits that dvc.yaml's "
        f"synthesize stage writes from {params_file}'s 'demo' section: {instead}"
    )


def _require_known(name: str) -> None:
    if name not in DATA_STAGES:
        raise ValueError(f"unknown data stage '{name}'; known: {', '.join(DATA_STAGES)}")


def require_splits(name: str, data: Path, params_file: Path) -> None:
    """Raise FileNotFoundError, saying how to make them, when the splits stage ``name`` reads are not in ``data``."""
    _require_known(name)
    # score reads chunk's folder, but its key holds the splits' digests (as every data stage's): keep them there
    needed = ("train.jsonl", "heldout.jsonl") if name == "chunk" else ("train.jsonl",)
    if missing := [n for n in needed if not (Path(data) / n).is_file()]:
        params = "" if Path(params_file) == Path("params.yaml") else f" --params {shlex.quote(str(params_file))}"
        raise FileNotFoundError(
            f"{data}: no {' or '.join(missing)}, the splits dvc.yaml's synthesize stage writes; run `dvc repro "
            f"synthesize` (or `longshort synthesize{params} --out {shlex.quote(str(data))}`) first, or point "
            "--data at them"
        )


def run_data_stage(name: str, cfg: Profile, data: Path) -> StageRecord:
    """Run one data stage for profile ``cfg``, reading upstream outputs from ``data``."""
    data = Path(data)
    _require_known(name)
    seed, base_model = cfg.run.seed, cfg.section_dump("base_model")
    train, heldout = str(data / "train.jsonl"), str(data / "heldout.jsonl")
    out = str(data / name)
    key = _inputs_key(name, cfg, data)
    if name == "sft_base":
        return st.sft_base_task.fn(
            key=key, out_dir=out, train_path=train, base_model=base_model,
            tokenizer=cfg.section_dump("tokenizer"), sft=cfg.section_dump("sft_base"), seed=seed,
        )  # fmt: skip
    if name == "chunk":
        return st.chunk_task.fn(
            key=key, out_dir=out, train_path=train, heldout_path=heldout, chunk=cfg.section_dump("chunk"),
            n_train=cfg.score.n_train_traces, n_heldout=cfg.score.n_heldout_traces, seed=seed,
            llm=st.chunk_llm(cfg, _record(data, "sft_base").outputs["model"]) if cfg.chunk.method == "llm" else None,
        )  # fmt: skip
    if name == "score":
        # the shards live inside the merge's folder: a folder of other inputs goes first, or the merge would
        # find its old record after the shards were recomputed and remove them with it
        st.finished_record("merge_scores", key, data / "score", log)
        shards, shared = st.score_shards(cfg, _record(data, "chunk"), _record(data, "sft_base"))
        scored: dict[str, list[str]] = {}
        with st.shared_shard_backends():  # the shards run one after another: one model load for all
            for i, (split, rows) in enumerate(shards):
                shard = st.score_shard_task.fn(
                    key=key, out_dir=str(data / "score" / "shards" / f"{i:04d}"), rows=rows, shard_no=i, **shared
                )
                scored.setdefault(split, []).append(shard.outputs["scored"])
        return st.merge_scores_task.fn(key=key, out_dir=out, shards=scored)
    if name == "cold_start":
        return st.cold_start_task.fn(
            key=key, out_dir=out, scored_path=_record(data, "score").outputs["train"], train_path=train,
            model_dir=_record(data, "sft_base").outputs["model"], base_model=base_model,
            generation=cfg.section_dump("generation"), cold_start=cfg.section_dump("cold_start"), seed=seed,
            **st.cold_start_limits(cfg),
        )  # fmt: skip
    raise ValueError(f"unknown data stage '{name}'; known: {', '.join(DATA_STAGES)}")
