"""The single-model efficient-reasoning baseline: GRPO with the truncation recipe.

"The Art of Efficient Reasoning" (arXiv 2602.20945) trains one long-CoT model to
think less with GRPO and the simplest length reward: an answer earns 1 only if it
is correct *and* at most ``L_T`` tokens long (``tasks.rewards.truncation_reward``).
Its recipe: train on *easy* prompts (problems the starting model solves more than
half the time), cap rollouts at ``L_R = L_T`` tokens so an over-long answer is cut
and scores 0, and stay on-policy. Long⊗Short is compared against it on the same
problems and seeds (``tasks.report.evaluate_systems``).

This is plain single-model GRPO, so TRL's ``GRPOTrainer`` runs it (vLLM colocated
with training on GPU profiles, ``model.generate`` on CPU); only the reward and the
easy-prompt filter are ours. Checkpoints go to ``out_dir/checkpoints`` and a
rerun after an interruption resumes from the last complete one; a rerun after the
model and ``baseline_result.json`` were written returns the stored result.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    StoppingCriteriaList,
    StopStringCriteria,
    TrainerCallback,
)

from longshort.config import BaselineConfig, ConfigError
from longshort.io import atomic_write_text, restore_environ
from models.generation import (
    GenerationBackend,
    cut_at_stop,
    end_ids_and_string_stops,
    model_end_ids,
    shutdown_vllm,
    stop_end,
    vllm_available,
)
from models.protocol import STOP_STRINGS, SYSTEM_PROMPTS
from tasks.answers import check_answer
from tasks.evaluate import response_answer, single_model_records
from tasks.rewards import truncation_reward
from tasks.sft import (
    DurableCheckpoints,
    cleanup_step,
    deepspeed_scope,
    finished_run,
    inputs_digest,
    last_complete_checkpoint,
    release_trainer,
    retire_checkpoints,
    save_trained,
)

log = logging.getLogger(__name__)

RESULT_FILE = "baseline_result.json"


@dataclass(frozen=True)
class BaselineResult:
    model_dir: str
    steps: int
    n_problems: int  # training problems after the easy filter
    history: list[dict[str, Any]]  # one row per GRPO step (TRL's logged metrics)
    runtime_s: float
    resumed_from: str | None


def response_correct(text: str, reference: str, kind: str = "math") -> bool:
    """A long-CoT response is correct when it is well formed and its boxed answer checks."""
    answer, well_formed = response_answer(text)
    return well_formed and check_answer(answer, kind, reference)


def _upto_stop(text: str) -> str:
    """``text`` up to and with the first of the base model's stop strings (all of it when there is none)."""
    end = stop_end(text, STOP_STRINGS["base"])
    return text if end is None else text[:end]


def make_truncation_reward(length_target: int, eos_token_id: int | None = None) -> Callable[..., list[float]]:
    """A TRL reward function: 1 for a correct response of at most ``length_target`` tokens, else 0.

    TRL passes the dataset's columns as keyword lists (``answer`` here) and the
    completion token ids; a trailing ``eos_token_id`` is not counted. That is the
    tokenizer's end-of-sequence token only: a rollout that stops on a one-token
    ``</answer>`` counts it, as the evaluation counts the stop string it generated.

    The text is read up to its first ``</answer>``, as the evaluation's backends cut it: the token that completes a
    multi-token stop can carry more text (Qwen2.5's ``>.``), and ``…</answer>.`` would otherwise be malformed.
    """

    def truncation(completions: list[Any], completion_ids: list[list[int]], answer: list[str], **_: Any) -> list[float]:
        texts = [_upto_stop(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
        lengths = [len(ids) - (1 if ids and ids[-1] == eos_token_id else 0) for ids in completion_ids]
        correct = [response_correct(t, ref) for t, ref in zip(texts, answer, strict=True)]
        return truncation_reward(correct, lengths, length_target)

    return truncation


def keep_easy(
    problems: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], dict[str, float]]:
    """The problems whose pass rate over their sampled records is above one half, and every rate."""
    solved: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        solved[r["problem_id"]].append(bool(r["correct"]))
    rates = {pid: sum(v) / len(v) for pid, v in solved.items()}
    return [p for p in problems if rates.get(p["id"], 0.0) > 0.5], rates


def easy_problems(
    backend: GenerationBackend,
    problems: Sequence[Mapping[str, Any]],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
) -> tuple[list[Mapping[str, Any]], dict[str, float]]:
    """The problems the model solves more than half the time over ``samples`` draws (``keep_easy``)."""
    records = single_model_records(
        backend, [dict(p) for p in problems], benchmark="train", system="base", k=samples,
        temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
    )  # fmt: skip
    return keep_easy(problems, records)


EASY_FILTER_FILE = "easy_filter.json"


def easy_problems_once(
    folder: Path,
    problems: Sequence[Mapping[str, Any]],
    draw: Callable[[Sequence[Mapping[str, Any]]], tuple[list[Mapping[str, Any]], dict[str, float]]],
) -> tuple[list[Mapping[str, Any]], dict[str, float], bool]:
    """``draw(problems)`` (:func:`easy_problems`) once per stage folder: its pass rates are kept in
    ``folder/easy_filter.json``, and a rerun over the same problems (a run resumed after a kill) reuses
    them. Drawn again, vLLM's samples (not reproducible) could move a rate near one half across it, and the
    resumed run would train on other problems than its checkpoint. Returns (easy, rates, reused)."""
    path, asked = Path(folder) / EASY_FILTER_FILE, [p["id"] for p in problems]
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if earlier.get("asked") == asked:
        rates = {k: float(v) for k, v in earlier["rates"].items()}
        return [p for p in problems if rates.get(p["id"], 0.0) > 0.5], rates, True
    easy, rates = draw(problems)
    atomic_write_text(path, json.dumps({"asked": asked, "rates": rates}))
    return easy, rates, False


# What TRL's colocated vLLM engine sets in os.environ for the whole process: its rank variables, and vLLM's
# in-process mode, which ``distributed_executor_backend="external_launcher"`` turns on and nothing turns off.
_COLOCATE_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


def close_colocated_vllm(trainer: Any, env_before: Mapping[str, str | None]) -> None:
    """Shut down the vLLM engine TRL colocates with a GRPO trainer (``vllm_mode="colocate"``), which TRL never does,
    and put back the environment it changed (``env_before``: :data:`_COLOCATE_ENV` before the trainer was made).

    That engine runs inside this process and froze the garbage collector's view of every object alive when it
    started (vLLM's ``gc.freeze``), the policy model included: until its ``shutdown`` (which unfreezes, tears down
    vLLM's distributed state and empties the CUDA cache) none of that memory comes back, and the evaluation's
    engines, started next in this process, would also run in-process. Nothing to shut down without vLLM
    (``trainer`` None: the trainer was never made; the environment is put back all the same).

    vLLM's teardown also destroys torch's default process group, which it shares with accelerate and DeepSpeed
    (they made it first): call this after the training's last collective (``save_trained``'s barrier). A
    DeepSpeed training started later in the same process would find accelerate's state saying "distributed"
    with no group behind it; in the pipeline only evaluate (vLLM in its own processes) and the MLflow run
    follow the baseline."""
    generation = getattr(trainer, "vllm_generation", None)
    llm = getattr(generation, "llm", None)
    if llm is not None:
        shutdown_vllm(llm)
        generation.llm = None
    restore_environ(env_before)


class _History(TrainerCallback):
    def __init__(self, on_step: Callable[[dict[str, Any]], None] | None) -> None:
        self.on_step = on_step

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.on_step and logs and "reward" in logs:
            self.on_step(history_row(state.global_step, logs))


def history_row(step: int, logs: Mapping[str, Any]) -> dict[str, Any]:
    """One GRPO step's logged numbers (reward, completion lengths, loss, ...) as a history row."""
    return {"step": step, "role": "baseline", **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "step"}}


def _prompt(problem: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPTS["base"]}, {"role": "user", "content": problem["problem"]}]


def stopping_at(trainer_cls: type, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> type:
    """``trainer_cls`` (TRL's ``GRPOTrainer``) whose ``model.generate`` rollouts stop at the multi-token ``stops``
    and whose completions end after the first of them, as the evaluation's and vLLM's do.

    TRL's transformers path stops at end ids only (``generate`` builds a stop-string criterion only when handed the
    tokenizer, which TRL does not pass). With a tokenizer that splits ``</answer>`` (Qwen2.5, Llama-3.1: ``</``,
    ``answer``, ``>``) a rollout went on past its answer up to L_R, and that text after the answer made the
    response malformed: a correct answer scored 0. The criterion is built once (it reads the whole vocabulary).

    A completion cut there ends without an end token, so TRL logs it as clipped (``completions/clipped_ratio``,
    ``completions/mean_terminated_length``), as it does on its vLLM path: read ``completions/mean_length``
    against L_R instead, and leave ``mask_truncated_completions`` off (it would drop every such completion)."""
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, list(stops))])

    class StopAtAnswer(trainer_cls):  # type: ignore[misc, valid-type]
        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> tuple[list[list[int]], Any]:
            model = self.accelerator.unwrap_model(self.model_wrapped)  # the module TRL's generation unwraps
            model.generate = functools.partial(type(model).generate, model, stopping_criteria=criteria)
            try:
                completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            finally:
                del model.generate
            # a row that stopped there is padded while the batch goes on: keep up to the stop
            kept = [cut[1] if (cut := cut_at_stop(tokenizer, ids, stops)) else len(ids) for ids in completion_ids]
            completion_ids = [ids[:n] for ids, n in zip(completion_ids, kept, strict=True)]
            if logprobs is not None:
                logprobs = [lp[:n] for lp, n in zip(logprobs, kept, strict=True)]
            return completion_ids, logprobs

    return StopAtAnswer


def train_truncation_baseline(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Mapping[str, Any]],
    cfg: BaselineConfig,
    out_dir: Path,
    *,
    use_vllm: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> BaselineResult:
    """GRPO of one model on ``problems`` (already filtered) with the truncation reward; saves ``out_dir/model``.

    A rerun in a folder where a run from the same inputs finished (``baseline_result.json``, written after
    the whole model and before the checkpoints were removed) returns that run's result without training: a
    process killed after this returned and before the stage's record was saved must not train again from
    step 0.
    """
    from trl import GRPOConfig, GRPOTrainer  # noqa: PLC0415 - heavy import, only this stage needs it

    if len(problems) < cfg.prompts_per_step:
        raise ConfigError(
            f"baseline.prompts_per_step: {len(problems)} training problems left, fewer than "
            f"{cfg.prompts_per_step} (is baseline.easy_filter too strict for this model?)"
        )
    start = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    inputs = inputs_digest(problems, model, tokenizer, baseline=cfg.model_dump(mode="json"), use_vllm=use_vllm)
    # the pipeline's folders are named by their inputs, but not `longshort stage`'s or a bench's (inputs_digest)
    if (done := finished_run(out_dir / RESULT_FILE, inputs, BaselineResult, "baseline")) is not None:
        return done
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    use_cuda = torch.cuda.is_available()
    if use_vllm and not vllm_available():
        raise RuntimeError("baseline: use_vllm needs CUDA and the vllm package")
    # The model stops at </answer> as the evaluation does, not only at end-of-sequence: a one-token stop is an
    # end id; a longer one, a stop-string criterion (``stopping_at``). The model's own end ids stay (Qwen2.5-Instruct
    # ends at <|im_end|> or <|endoftext|>, Llama-3.1 at three): the saved config is what vLLM stops the model at later.
    stops = STOP_STRINGS["base"]
    eos, string_stops = end_ids_and_string_stops(tokenizer, model_end_ids(model), stops)
    model.generation_config.eos_token_id = eos
    reward = make_truncation_reward(cfg.length_target, tokenizer.eos_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    batch = cfg.prompts_per_step * cfg.group_size
    micro = cfg.micro_batch_size or batch  # sequences per forward/backward; one generation batch per step
    vllm_args: dict[str, Any] = {}
    if use_vllm:  # TRL's colocated engine builds its own SamplingParams: stop it at </answer> as the evaluation does
        longest_prompt = max(len(tokenizer.apply_chat_template(_prompt(p), add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"]) for p in problems)  # fmt: skip
        vllm_args = {
            "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
            "vllm_max_model_length": longest_prompt + cfg.length_target,  # not the model's 128k context
            "vllm_enable_sleep_mode": True,  # frees the KV cache while the policy trains
            "generation_kwargs": {"stop": list(stops), "include_stop_str_in_output": True},
        }
    with deepspeed_scope(cfg.deepspeed) as deepspeed:
        args = GRPOConfig(
            output_dir=str(ckpt_dir),
            max_steps=cfg.steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="constant",
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=batch // micro,
            num_generations=cfg.group_size,
            max_completion_length=cfg.length_target,  # L_R = L_T: a longer answer is cut and scores 0
            temperature=cfg.temperature,
            beta=cfg.kl_coef,
            num_iterations=1,  # on-policy
            logging_steps=1,
            save_strategy="steps",
            save_steps=cfg.checkpoint_every,
            save_total_limit=2,
            report_to=[],
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=cfg.bf16 and use_cuda,
            use_cpu=not use_cuda,
            deepspeed=deepspeed,
            use_vllm=use_vllm,
            **vllm_args,
            dataloader_num_workers=0,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        dataset = Dataset.from_list(
            [
                {"prompt": _prompt(p), "answer": str(p["answer"])}
                for p in problems
            ]
        )
        history = _History(on_step)
        env_before = {name: os.environ.get(name) for name in _COLOCATE_ENV}
        trainer = None
        try:
            # (vLLM's engine stops at them itself: SamplingParams.stop)
            stopping = string_stops and not use_vllm
            trainer_cls = stopping_at(GRPOTrainer, tokenizer, string_stops) if stopping else GRPOTrainer
            trainer = trainer_cls(  # with use_vllm, TRL changes the environment and starts its engine here
                model=model,
                reward_funcs=[reward],
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[history, DurableCheckpoints()],
            )
            trainer.remove_callback(PrinterCallback)  # each step is logged once, by ``on_step``
            last = last_complete_checkpoint(ckpt_dir, optimizer_state=not args.save_only_model, deepspeed=deepspeed)
            if last:
                log.info("resuming the truncation baseline from %s", last)
            result = trainer.train(resume_from_checkpoint=last)
            model_dir = out_dir / "model"
            save_trained(trainer, tokenizer, model_dir)
            out = BaselineResult(
                model_dir=str(model_dir),
                steps=int(result.global_step),
                n_problems=len(problems),
                history=[history_row(int(h["step"]), h) for h in trainer.state.log_history if "reward" in h],
                runtime_s=round(time.perf_counter() - start, 2),
                resumed_from=last,
            )
            # The order is what a rerun relies on: the whole model (one rename), then the result file
            # (``finished_run`` takes it as the mark of a finished run), and only then the checkpoints go.
            if trainer.is_world_process_zero():  # one writer (under a multi-process launch, the others return)
                atomic_write_text(out_dir / RESULT_FILE, json.dumps({**asdict(out), "inputs": inputs}, indent=2))
                retire_checkpoints(ckpt_dir)
            return out
        finally:  # the stages after this one run in this process (DeepSpeed's engine goes before vLLM's process group)
            if trainer is not None:
                cleanup_step("release the baseline trainer", release_trainer, trainer)
            cleanup_step("shut down TRL's vLLM engine", close_colocated_vllm, trainer, env_before)
