"""GPU check: the demo's SFT, pair RL and truncation-baseline training on CUDA (bf16 where supported), timed.

    python bench/gpu_check.py --base DIR --d-long FILE --long-model DIR --short-model DIR --train FILE
    .venv/bin/python bench/gpu_check.py --device cpu --quick ...   # the same code path, tiny step counts

Three stages, each with the demo profile's settings (configs/demo.yaml) unless a flag says otherwise:

1. ``sft``: ``tasks.sft.train_sft`` (TRL SFTTrainer) of the long-thought model from the demo base
   model on D_long for ``--sft-steps`` steps, ``SFTConfig.bf16=True`` (mixed precision on CUDA only),
   after a 2-step warm-up run. Reports non-padding tokens/s (TRL's ``num_tokens`` over the Trainer's
   ``train_runtime``), ms/step and the final logged loss.
2. ``rl[DTYPE]``: one round of ``tasks.rl.train_pair_rl`` (long model, then short model, each for
   ``--rl-steps-per-round`` steps) from the given SFT pair. ``tasks.rl`` has no autocast: its precision
   is the weights' dtype, ``base_model.dtype`` (the GPU profiles set ``bfloat16``), so each DTYPE of
   ``--rl-dtypes`` is one run with the pair loaded in that dtype; a half-precision one trains fp32 LoRA
   adapters (r=16 unless the profile sets ``rl.lora``), as a profile with such weights must. The rollouts run on
   ``--backend`` (``auto``: vLLM engines when CUDA and vllm are there, as the pipeline's ``generation.backend``
   default; ``transformers``: the models on CUDA through ``models.generation.TransformersBackend``). Reports seconds per step and each
   step's logged reward, accuracy and tokens. ``--rl-kl-coef`` > 0 adds the KL term and its reference models
   (a frozen copy next to each full-weight model, the adapters switched off for a LoRA one).
3. ``baseline``: ``--baseline-steps`` steps of ``tasks.baseline.train_truncation_baseline`` (TRL
   GRPOTrainer) from the base model, bf16 on CUDA, on the first ``baseline.n_problems`` training problems
   *without* the easy filter (it would cost a sampling pass). Its rollouts come from TRL's colocated vLLM
   engine when ``--backend`` resolves to ``vllm``, else from ``model.generate``. Reports seconds per step and
   the logged reward and completion length.

4. ``episodes`` (asked for with ``--stages ...,episodes``): the SFT pair's Long⊗Short episodes on the first
   ``--episode-problems`` training problems, once per backend of ``--episode-backends`` (default
   ``transformers,vllm``), as the evaluate stage plays them (``tasks.evaluate.pair_records``): greedy, then
   ``--episode-samples`` samples per problem at the RL temperature. Reports, per backend, accuracy, mean tokens
   (long, short), well-formed share, turns and seconds (engine start-up apart), and for the greedy episodes
   how many transcripts are the same, token for token, under every backend.

5. ``deepspeed[CONFIG]`` (asked for with ``--stages ...,deepspeed``): the ``sft`` stage's training under each
   DeepSpeed config of ``--deepspeed-configs`` (default: ``infra/deepspeed/zero3_offload.json``, the one the
   real profiles name), in this process, as a Prefect worker runs it (``tasks.sft.deepspeed_config`` sets up a
   one-process group). Each config runs ``--ds-steps`` steps three times: stopped by an exception right after
   the checkpoint at half the steps (a dying worker), then run again (it must resume from that checkpoint),
   then once without a stop. Reports where it resumed, whether the saved model is whole (ZeRO-3 gathers its
   shards on save) and finite, and how far the resumed weights are from the uninterrupted ones.

After each stage, the pipeline's clean-up between stages runs (garbage collection, the CUDA cache emptied) and
what the stage left allocated on the GPU is recorded (``left_allocated_mib`` and the largest live CUDA tensors):
stages share one process in a worker, so a stage that leaves memory behind takes it from the next.
Every stage runs even if an earlier one failed (its error is recorded). With ``--budget-s`` a stage
that would start after that many seconds of the script is skipped. The results go, as JSON, to
``--json`` (default ``$OUT/gpu_check.json`` when ``OUT`` is set), rewritten after every stage.
Step 1 of every stage includes one-time costs (CUDA kernels, allocator), so the per-step means are
also given without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

T0 = time.perf_counter()


def _versions() -> dict[str, str]:
    import importlib.metadata as md  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "pydantic", "pyarrow",
                 "huggingface_hub", "tokenizers", "safetensors", "math-verify", "vllm", "deepspeed"):  # fmt: skip
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _step_times(times: list[float]) -> dict[str, Any]:
    """Seconds per step, their mean, and the mean without the first (warm-up) step."""
    return {
        "s_per_step": [round(t, 3) for t in times],
        "mean_s_per_step": round(_mean(times), 3) if times else None,
        "mean_s_per_step_after_first": round(_mean(times[1:]), 3) if len(times) > 1 else None,
    }


class Report:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            os.replace(tmp, self.path)


def _cuda_memory(torch) -> dict[str, float]:  # noqa: ANN001
    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def _left_allocated(torch) -> dict[str, Any]:  # noqa: ANN001
    """What a finished stage left on the GPU once the pipeline's own clean-up between stages has run
    (``longshort.memory.free_accelerator_memory``): the memory still allocated, and the largest CUDA tensors
    the garbage collector still sees (what holds them is for a debugger; this says whether anything does)."""
    if not torch.cuda.is_available():
        return {}
    import gc  # noqa: PLC0415

    from longshort.memory import free_accelerator_memory  # noqa: PLC0415

    free_accelerator_memory()
    live: list[tuple[int, Any]] = []  # (bytes of its storage, tensor)
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.is_cuda:
                live.append((obj.untyped_storage().nbytes(), obj))
        except Exception:  # noqa: BLE001, S112 - a proxy that fails the checks, or a tensor without a storage (sparse)
            continue
    live.sort(key=lambda item: item[0], reverse=True)
    return {
        "left_allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
        "left_reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1),
        "left_cuda_tensors": len(live),
        "left_largest": [
            f"{type(t).__name__}{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} {size / 2**20:.1f} MiB"
            for size, t in live[:5]
        ],
    }


def _brief(stage: dict[str, Any]) -> str:
    if "left_error" in stage:
        return f"not read: {stage['left_error']}"
    if "left_allocated_mib" not in stage:
        return "no CUDA"
    return (f"{stage['left_allocated_mib']} MiB allocated in {stage['left_cuda_tensors']} tensors the collector sees, "
            f"largest {stage['left_largest'][:3]}")  # fmt: skip


def stage_sft(args, profile, torch, work: Path) -> dict[str, Any]:  # noqa: ANN001
    from models.factory import load_model  # noqa: PLC0415
    from tasks import sft as sft_module  # noqa: PLC0415
    from tasks.cold_start import pair_sft_examples  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    # TRL logs ``num_tokens`` (attention-mask tokens trained so far) with each loss; train_sft keeps
    # only the loss, so catch it as it is logged (as bench/sft.py does).
    logged: dict[int, dict[str, float]] = {}
    on_log = sft_module._LossHistory.on_log

    def on_log_with_tokens(self, a, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "loss" in logs:
            logged[state.global_step] = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        return on_log(self, a, state, control, logs=logs, **kwargs)

    sft_module._LossHistory.on_log = on_log_with_tokens
    cfg = profile.sft_long.model_copy(
        update={"max_steps": args.sft_steps, "save_steps": 10**6, "logging_steps": args.sft_logging_steps, "bf16": True}
    )
    model, tokenizer = load_model(profile.base_model, path=args.base)
    examples = pair_sft_examples(tokenizer, read_split(args.d_long), "long")
    plain = sft_module._use_plain_loss(model, cfg)
    bf16 = cfg.bf16 and torch.cuda.is_available()  # train_sft's rule
    print(
        f"[sft] {len(examples)} D_long examples, {model.num_parameters():,} parameters, batch {cfg.batch_size}, "
        f"max_length {cfg.max_length}, lr {cfg.learning_rate}, {args.sft_steps} steps, bf16 autocast {bf16}, "
        f"loss {'plain (full logits)' if plain else 'TRL fused'}",
        flush=True,
    )
    if not args.quick:  # the first Trainer run pays one-time costs (kernels, cuBLAS handles)
        warm = cfg.model_copy(update={"max_steps": 2, "logging_steps": 1})
        wm, _ = load_model(profile.base_model, path=args.base)
        sft_module.train_sft(examples[:64], wm.train(), tokenizer, warm, work / "sft-warmup", seed=0)
        del wm
    logged.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = sft_module.train_sft(examples, model.train(), tokenizer, cfg, work / "sft", seed=0)
    wall = time.perf_counter() - start
    last_step = max(logged) if logged else None
    tokens = int(logged[last_step]["num_tokens"]) if last_step and "num_tokens" in logged[last_step] else None
    out = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "bf16_autocast": bf16,
        "loss_path": "plain" if plain else "fused",
        "steps": result.steps,
        "batch_size": cfg.batch_size,
        "train_runtime_s": round(result.train_runtime_s, 3),
        "ms_per_step": round(1000 * result.train_runtime_s / max(1, result.steps), 2),
        "train_sft_wall_s": round(wall, 2),
        "trained_tokens": tokens,
        "tokens_per_s": round(tokens / result.train_runtime_s, 1) if tokens and result.train_runtime_s else None,
        "final_loss": logged[last_step]["loss"] if last_step else None,
        "mean_train_loss": result.train_loss,
        "loss_history": [{"step": s, "loss": v["loss"]} for s, v in sorted(logged.items())],
        **_cuda_memory(torch),
    }
    print(
        f"[sft] {out['steps']} steps in {out['train_runtime_s']} s ({out['ms_per_step']} ms/step), "
        f"{tokens} tokens -> {out['tokens_per_s']} tokens/s; final loss {out['final_loss']}, "
        f"mean loss {out['mean_train_loss']:.4f}",
        flush=True,
    )
    return out


class _Interrupted(RuntimeError):
    """Raised after a checkpoint is saved: the run dies there, as a killed worker would."""


def stage_deepspeed(args, profile, torch, work: Path, config: str) -> dict[str, Any]:  # noqa: ANN001
    from safetensors.torch import load_file  # noqa: PLC0415

    from models.factory import load_model  # noqa: PLC0415
    from tasks import sft as sft_module  # noqa: PLC0415
    from tasks.cold_start import pair_sft_examples  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    half = max(1, args.ds_steps // 2)
    cfg = profile.sft_long.model_copy(update={"max_steps": 2 * half, "save_steps": half, "logging_steps": 1,
                                              "bf16": True, "deepspeed": config})  # fmt: skip
    base = load_file(str(Path(args.base) / "model.safetensors"))
    out: dict[str, Any] = {"config": config, "deepspeed_active": sft_module.deepspeed_config(config) is not None,
                           "steps": 2 * half, "interrupted_after_step": half}  # without CUDA: a plain Trainer

    def run(name: str, interrupt: bool) -> Any:  # noqa: ANN401
        model, tokenizer = load_model(profile.base_model, path=args.base)
        examples = pair_sft_examples(tokenizer, read_split(args.d_long), "long")

        durable = sft_module.DurableCheckpoints.on_save

        def on_save(self, a, state, control, **kwargs):  # noqa: ANN001 - once the checkpoint is whole and marked
            durable(self, a, state, control, **kwargs)
            raise _Interrupted(f"stopped after the checkpoint of step {state.global_step}")

        if interrupt:
            sft_module.DurableCheckpoints.on_save = on_save
        try:
            return sft_module.train_sft(examples, model.train(), tokenizer, cfg, work / name, seed=0)
        finally:
            if interrupt:
                sft_module.DurableCheckpoints.on_save = durable

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        run("resumed", interrupt=True)
        out["interruption"] = "none: the run finished"
    except _Interrupted as exc:
        out["interruption"] = str(exc)
    out["interrupted_run_s"] = round(time.perf_counter() - start, 2)
    out["checkpoints_left"] = sorted(p.name for p in (work / "resumed" / "checkpoints").glob("checkpoint-*"))
    start = time.perf_counter()
    resumed = run("resumed", interrupt=False)
    out["resumed_run_s"] = round(time.perf_counter() - start, 2)
    if resumed.resumed_from is None or Path(resumed.resumed_from).name != f"checkpoint-{half}":
        # a run from scratch with the same seed would end with the same weights: it must not pass for a resume
        raise RuntimeError(f"the rerun did not resume from checkpoint-{half}: resumed_from={resumed.resumed_from}")
    start = time.perf_counter()
    whole = run("uninterrupted", interrupt=False)
    out["uninterrupted_run_s"] = round(time.perf_counter() - start, 2)
    a = load_file(str(Path(resumed.model_dir) / "model.safetensors"))
    b = load_file(str(Path(whole.model_dir) / "model.safetensors"))
    out |= {
        "resumed_from": resumed.resumed_from and Path(resumed.resumed_from).name,
        "steps_done": [resumed.steps, whole.steps],
        "mean_loss": [round(resumed.train_loss, 5), round(whole.train_loss, 5)],
        "saved_keys_match_base": sorted(a) == sorted(base) and all(a[k].shape == base[k].shape for k in base),
        "saved_extra_keys": sorted(set(a) - set(base)), "saved_missing_keys": sorted(set(base) - set(a)),
        "saved_shape_mismatches": {k: [list(a[k].shape), list(base[k].shape)] for k in base
                                   if k in a and a[k].shape != base[k].shape},
        "saved_dtypes": sorted({str(t.dtype) for t in a.values()}), "base_dtypes": sorted({str(t.dtype) for t in base.values()}),
        "saved_all_finite": all(bool(torch.isfinite(t).all()) for t in a.values()),
        "tensors_changed_from_base": sum(k in a and not torch.equal(a[k], base[k]) for k in base),
        "tensors": len(base),
        "max_abs_diff_resumed_vs_uninterrupted": max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
        "loss_history_uninterrupted": json.loads((Path(whole.model_dir).parent / "loss_history.json").read_text()),
        **_cuda_memory(torch),
    }  # fmt: skip
    print(f"[deepspeed {config}] {out}", flush=True)
    return out


def stage_rl(args, profile, torch, work: Path, dtype: str) -> dict[str, Any]:  # noqa: ANN001
    from longshort.config import RLConfig  # noqa: PLC0415
    from tasks.rl import train_pair_rl  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    cfg = RLConfig.model_validate(
        {
            **profile.rl.model_dump(),
            "rounds": 1,
            "steps_per_round": args.rl_steps_per_round,
            "prompts_per_step": args.rl_prompts,
            "group_size": args.rl_group,
            "checkpoint_every": 10**6,  # only the final checkpoint
            "kl_coef": profile.rl.kl_coef if args.rl_kl_coef is None else args.rl_kl_coef,
            # as a profile must: half-precision weights train fp32 LoRA adapters (AdamW would round updates away)
            "lora": profile.rl.lora or ({"r": 16, "alpha": 32, "dropout": 0.0} if dtype != "float32" else None),
        }
    )
    model_cfg = profile.base_model.model_copy(update={"dtype": dtype})
    problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in read_split(args.train)]
    problems = problems[: cfg.n_problems]
    print(
        f"[rl {dtype}] {len(problems)} problems, {2 * cfg.steps_per_round} steps (long then short), "
        f"{cfg.prompts_per_step} prompts x {cfg.group_size} episodes per step, weights {dtype}, "
        f"max_turns {profile.protocol.max_turns}, rollouts on {_rollout_backend(args, profile)}",
        flush=True,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(m: dict[str, Any]) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        print(
            f"[rl {dtype}] step {m['step']} ({m['role']}): {times[-1]:.2f} s, reward {m['reward/total']:.3f}, "
            f"accuracy {m['accuracy']:.3f}, tokens/total {m['tokens/total']:.1f} (long {m['tokens/long']:.1f}, "
            f"short {m['tokens/short']:.1f}), turns {m['turns']:.2f}, trained_tokens {m['trained_tokens']:.0f}, "
            f"loss {m['loss']:.4f}",
            flush=True,
        )

    start = time.perf_counter()
    result = train_pair_rl(
        args.long_model, args.short_model, problems, cfg, work / f"rl-{dtype}", on_step,
        protocol=profile.protocol, model_cfg=model_cfg, generation=_generation(args, profile),
    )  # fmt: skip
    wall = time.perf_counter() - start
    keys = ("step", "role", "reward/total", "reward/correctness", "reward/format", "reward/efficiency", "accuracy",
            "tokens/total", "tokens/long", "tokens/short", "turns", "trained_tokens", "loss", "kl", "grad_norm",
            "is_ratio")  # fmt: skip
    out = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "weights_dtype": dtype,
        "rollouts": _rollout_backend(args, profile),
        "lora": cfg.lora.model_dump() if cfg.lora else None,
        "kl_coef": cfg.kl_coef,
        "steps": result.steps,
        **_step_times(times),
        "runtime_s": round(result.runtime_s, 2),
        "wall_s": round(wall, 2),
        "history": [{k: h[k] for k in keys if k in h} for h in result.history],
        **_cuda_memory(torch),
    }
    print(
        f"[rl {dtype}] {result.steps} steps in {out['runtime_s']} s (load + save included); "
        f"mean {out['mean_s_per_step']} s/step, {out['mean_s_per_step_after_first']} s/step after the first",
        flush=True,
    )
    return out


def stage_baseline(args, profile, torch, work: Path) -> dict[str, Any]:  # noqa: ANN001
    from longshort.config import BaselineConfig  # noqa: PLC0415
    from models.factory import load_model  # noqa: PLC0415
    from tasks.baseline import train_truncation_baseline  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    cfg = BaselineConfig.model_validate(
        {
            **profile.baseline.model_dump(),
            "steps": args.baseline_steps,
            "prompts_per_step": args.baseline_prompts,
            "group_size": args.baseline_group,
            "checkpoint_every": 10**6,
            "bf16": True,
        }
    )
    problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in read_split(args.train)]
    problems = problems[: cfg.n_problems]
    model, tokenizer = load_model(profile.base_model, path=args.base)
    bf16 = cfg.bf16 and torch.cuda.is_available()
    use_vllm = _rollout_backend(args, profile) == "vllm"
    print(
        f"[baseline] {len(problems)} problems (no easy filter), {cfg.steps} steps, {cfg.prompts_per_step} prompts x "
        f"{cfg.group_size} completions, L_T = L_R = {cfg.length_target}, bf16 autocast {bf16}, "
        f"rollouts on {'TRL colocated vLLM' if use_vllm else 'model.generate'}",
        flush=True,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    rows: list[dict[str, Any]] = []
    last = [time.perf_counter()]

    def on_step(m: dict[str, Any]) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        rows.append(m)
        print(
            f"[baseline] step {m['step']}: {times[-1]:.2f} s, reward {m.get('reward', float('nan')):.3f}, "
            f"mean length {m.get('completions/mean_length', float('nan')):.1f}, "
            f"clipped ratio {m.get('completions/clipped_ratio', float('nan')):.3f}",
            flush=True,
        )

    start = time.perf_counter()
    result = train_truncation_baseline(model, tokenizer, problems, cfg, work / "baseline", use_vllm=use_vllm,
                                       on_step=on_step)  # fmt: skip
    wall = time.perf_counter() - start
    keys = ("step", "reward", "reward_std", "completions/mean_length", "completions/clipped_ratio", "loss",
            "entropy", "grad_norm", "step_time")  # fmt: skip
    out = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "bf16_autocast": bf16,
        "vllm": use_vllm,
        "steps": result.steps,
        **_step_times(times),
        "runtime_s": result.runtime_s,
        "wall_s": round(wall, 2),
        "history": [{k: h[k] for k in keys if k in h} for h in result.history],
        **_cuda_memory(torch),
    }
    print(
        f"[baseline] {result.steps} steps in {out['runtime_s']} s; mean {out['mean_s_per_step']} s/step, "
        f"{out['mean_s_per_step_after_first']} s/step after the first",
        flush=True,
    )
    return out


def _generation(args, profile, backend: str | None = None):  # noqa: ANN001, ANN202
    """The profile's generation settings with the backend this check asks for."""
    return profile.generation.model_copy(update={"backend": backend or args.backend})


def _rollout_backend(args, profile) -> str:  # noqa: ANN001
    from models.generation import resolve_backend  # noqa: PLC0415

    return resolve_backend(_generation(args, profile))


def _episode_summary(records: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """The evaluate stage's summary of one backend's episodes (``tasks.metrics.summarize``), in brief."""
    from tasks.metrics import summarize  # noqa: PLC0415

    (s,) = summarize(records, k)  # one benchmark and system
    return {
        "episodes": s["n_episodes"],
        "accuracy": round(s["mean_at_k"], 4),
        "well_formed": round(s["well_formed"], 4),
        "tokens_long": round(s["mean_tokens_long"], 2),
        "tokens_short": round(s["mean_tokens_short"], 2),
        "tokens_total": round(s["mean_tokens"], 2),
        "turns": round(s["turns"]["mean"], 3),
    }


def _play_episodes(args, profile, rows: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], list[str]]:  # noqa: ANN001
    """One backend's greedy and sampled episodes of the SFT pair: its summary and the greedy transcripts."""
    from models.generation import close_backend, make_pair_backends, resolve_backend  # noqa: PLC0415
    from tasks.evaluate import pair_records  # noqa: PLC0415

    gen = _generation(args, profile, name)
    resolved = resolve_backend(gen)  # a ConfigError when vllm is asked for without CUDA or the package
    start = time.perf_counter()
    long, short = make_pair_backends(args.long_model, args.short_model, profile.base_model, gen, profile.run.seed,
                                     same=False)  # fmt: skip
    loaded = time.perf_counter()
    try:
        play = dict(benchmark="train", system=f"sft-pair[{resolved}]")
        greedy, episodes = pair_records(long, short, rows, profile.protocol, **play)
        played = time.perf_counter()
        sampled: list[dict[str, Any]] = []
        if args.episode_samples:
            sampled, _ = pair_records(long, short, rows, profile.protocol, **play, k=args.episode_samples,
                                      temperature=profile.rl.temperature, seed=profile.run.seed)  # fmt: skip
        done = time.perf_counter()
    finally:
        close_backend(long)
        close_backend(short)
    summary = {
        "resolved": resolved,
        "load_s": round(loaded - start, 2),
        "greedy_s": round(played - loaded, 2),
        "sampled_s": round(done - played, 2),
        "greedy": _episode_summary(greedy, 1),
        "sampled": _episode_summary(sampled, args.episode_samples) if sampled else None,
    }
    return summary, [e.transcript for e in episodes]


def stage_episodes(args, profile, torch, work: Path) -> dict[str, Any]:  # noqa: ANN001, ARG001
    from tasks.synthesize import read_split  # noqa: PLC0415

    rows = read_split(args.train)[: args.episode_problems]
    backends = [b.strip() for b in args.episode_backends.split(",") if b.strip()]
    out: dict[str, Any] = {"problems": len(rows), "samples": args.episode_samples,
                           "temperature": profile.rl.temperature, "backends": {}}  # fmt: skip
    transcripts: dict[str, list[str]] = {}
    for name in backends:
        try:  # a backend that fails (no vLLM here, an engine that does not start) must not lose the others' results
            out["backends"][name], transcripts[name] = _play_episodes(args, profile, rows, name)
        except Exception as exc:  # noqa: BLE001 - recorded; the script exits 1 (main reads "errors")
            traceback.print_exc()
            out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            out["backends"][name] = {"error": out["errors"][name]}
        print(f"[episodes] {name}: {out['backends'][name]}", flush=True)
    if len(transcripts) > 1:
        first, *rest = transcripts.values()
        same = [all(t[i] == first[i] for t in rest) for i in range(len(first))]
        out["greedy_same_transcripts"] = sum(same)
        print(f"[episodes] greedy transcripts the same under {', '.join(transcripts)}: {sum(same)} of {len(same)}",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny step counts, a check that everything runs")
    ap.add_argument("--base", required=True, help="the demo base model directory (sft_base/*/model)")
    ap.add_argument("--d-long", required=True, help="cold_start/*/d_long.jsonl")
    ap.add_argument("--long-model", required=True, help="the SFT long model the RL starts from (sft_long/*/model)")
    ap.add_argument("--short-model", required=True, help="the SFT short model (sft_short/*/model)")
    ap.add_argument("--train", required=True, help="training problems (synthesize/*/train.jsonl)")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--stages", default="sft,rl,baseline",
                    help="comma-separated: sft, rl, baseline, episodes, deepspeed; they run in the order sft, rl "
                    "(first dtype), deepspeed, baseline, episodes, rl (other dtypes), whatever the order given")
    ap.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                    help="rollouts of the rl and baseline stages (auto: vLLM when CUDA and vllm are there)")
    ap.add_argument("--episode-problems", type=int, default=64)
    ap.add_argument("--episode-samples", type=int, default=4, help="sampled episodes per problem (episodes stage)")
    ap.add_argument("--episode-backends", default="transformers,vllm")
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--sft-logging-steps", type=int, default=10)
    ap.add_argument("--rl-steps-per-round", type=int, default=4)
    ap.add_argument("--rl-prompts", type=int, default=8)
    ap.add_argument("--rl-group", type=int, default=4)
    ap.add_argument("--rl-dtypes", default=None, help="comma-separated weight dtypes for RL runs "
                    "(default: bfloat16,float32 on CUDA, float32 on CPU); runs after the first go last")
    ap.add_argument("--rl-kl-coef", type=float, default=None, help="the RL's KL coefficient (default: the "
                    "profile's; > 0 adds the reference models: frozen copies, or the adapters switched off)")
    ap.add_argument("--baseline-steps", type=int, default=4)
    ap.add_argument("--baseline-prompts", type=int, default=8)
    ap.add_argument("--baseline-group", type=int, default=4)
    ap.add_argument("--deepspeed-configs", default="infra/deepspeed/zero3_offload.json",
                    help="comma-separated DeepSpeed configs for the deepspeed stage (CUDA only)")
    ap.add_argument("--ds-steps", type=int, default=20, help="SFT steps per deepspeed run (interrupted at half)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip a stage that would start later than this")
    ap.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu_check.json when OUT is set")
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs write (default: a temp dir)")
    args = ap.parse_args()
    if args.episode_problems < 1 or args.episode_samples < 0:
        ap.error("--episode-problems must be at least 1 and --episode-samples at least 0")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the code picks cuda when it sees one
    if args.quick:
        args.sft_steps, args.sft_logging_steps = 4, 2
        args.rl_steps_per_round, args.rl_prompts, args.rl_group = 1, 2, 2
        args.baseline_steps, args.baseline_prompts, args.baseline_group = 1, 2, 2
        args.ds_steps = 4
        args.episode_problems, args.episode_samples = 4, 2
    if args.json is None and os.environ.get("OUT"):
        args.json = Path(os.environ["OUT"]) / "gpu_check.json"

    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from longshort.config import load_profile  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    cuda = torch.cuda.is_available()
    rl_dtypes = [d.strip() for d in (args.rl_dtypes or ("bfloat16,float32" if cuda else "float32")).split(",") if d.strip()]
    report = Report(args.json)
    import trl  # noqa: PLC0415

    versions = _versions()
    # what is imported (a carried package shadows the machine's own when it comes first on sys.path)
    versions |= {"torch (imported)": torch.__version__, "transformers (imported)": transformers.__version__,
                 "trl (imported)": trl.__version__, "transformers path": str(Path(transformers.__file__).parent)}  # fmt: skip
    info = {
        "versions": versions,
        "cuda": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine()),
        "cuda_runtime": torch.version.cuda,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    report.data["info"] = info
    report.save()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), flush=True)
    print(
        f"device: {info['device_name']} (cuda {cuda}, CUDA runtime {info['cuda_runtime']}, bf16 supported "
        f"{info['bf16_supported']}); {info['cpu_count']} CPUs, torch threads {info['torch_threads']}",
        flush=True,
    )
    profile = load_profile(args.profile)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    plan: list[tuple[str, Any]] = []
    if "sft" in wanted:
        plan.append(("sft", lambda w: stage_sft(args, profile, torch, w)))
    if "rl" in wanted and rl_dtypes:
        plan.append((f"rl[{rl_dtypes[0]}]", lambda w, d=rl_dtypes[0]: stage_rl(args, profile, torch, w, d)))
    if "deepspeed" in wanted:  # before the baseline: shutting TRL's colocated engine down ends the process group
        for c in [c.strip() for c in args.deepspeed_configs.split(",") if c.strip()]:
            plan.append((f"deepspeed[{Path(c).stem}]", lambda w, c=c: stage_deepspeed(args, profile, torch, w, c)))
    if "baseline" in wanted:
        plan.append(("baseline", lambda w: stage_baseline(args, profile, torch, w)))
    if "episodes" in wanted:
        plan.append(("episodes", lambda w: stage_episodes(args, profile, torch, w)))
    if "rl" in wanted:
        for d in rl_dtypes[1:]:
            plan.append((f"rl[{d}]", lambda w, d=d: stage_rl(args, profile, torch, w, d)))

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="gpu-check-")
    root = args.workdir or Path(tmp.name)
    failed = False
    try:
        for name, run in plan:
            elapsed = time.perf_counter() - T0
            if args.budget_s and elapsed > args.budget_s:
                print(f"[{name}] skipped: {elapsed:.0f} s elapsed > --budget-s {args.budget_s:.0f}", flush=True)
                report.data["stages"][name] = {"skipped": f"time budget ({elapsed:.0f} s elapsed)"}
                report.save()
                continue
            start = time.perf_counter()
            try:
                report.data["stages"][name] = run(root / name.replace("[", "-").replace("]", ""))
                failed = failed or bool(report.data["stages"][name].get("errors"))
            except Exception as exc:  # noqa: BLE001 - record it, run the next stage
                failed = True
                traceback.print_exc()
                report.data["stages"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            report.data["stages"][name]["stage_wall_s"] = round(time.perf_counter() - start, 2)
            try:
                report.data["stages"][name] |= _left_allocated(torch)
            except Exception as exc:  # noqa: BLE001 - a reading, not a stage: record why it is missing
                report.data["stages"][name]["left_error"] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] left on the GPU after clean-up: {_brief(report.data['stages'][name])}", flush=True)
            report.save()
    finally:
        if tmp is not None:
            tmp.cleanup()
    report.data["total_wall_s"] = round(time.perf_counter() - T0, 2)
    report.save()
    print("\nsummary:", flush=True)
    for name, s in report.data["stages"].items():
        if "error" in s or "skipped" in s:
            print(f"  {name}: {s.get('error') or s.get('skipped')}")
        elif name.startswith("deepspeed"):
            print(f"  {name}: resumed from {s['resumed_from']}, steps {s['steps_done']}, whole weights "
                  f"{s['saved_keys_match_base'] and s['saved_all_finite']}, resumed vs uninterrupted max |diff| "
                  f"{s['max_abs_diff_resumed_vs_uninterrupted']:.3g}")  # fmt: skip
        elif name == "episodes":
            for b, r in s["backends"].items():
                if "error" in r:
                    print(f"  episodes[{b}]: {r['error']}")
                    continue
                sampled = r["sampled"] or {"accuracy": None, "tokens_total": None}
                print(f"  episodes[{b}]: greedy accuracy {r['greedy']['accuracy']} at {r['greedy']['tokens_total']} "
                      f"tokens in {r['greedy_s']} s, sampled {sampled['accuracy']} at "
                      f"{sampled['tokens_total']} in {r['sampled_s']} s (start-up {r['load_s']} s)")  # fmt: skip
            if "greedy_same_transcripts" in s:
                print(f"  episodes: {s['greedy_same_transcripts']} of {s['problems']} greedy transcripts the same")
        elif name == "sft":
            print(f"  sft: {s['tokens_per_s']} tokens/s, {s['ms_per_step']} ms/step, final loss {s['final_loss']}, "
                  f"bf16 {s['bf16_autocast']}, on {s['device']}")  # fmt: skip
        else:
            print(f"  {name}: {s['mean_s_per_step']} s/step ({s['mean_s_per_step_after_first']} after the first), on {s['device']}")
    print(f"total {report.data['total_wall_s']} s", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
