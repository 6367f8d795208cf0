"""Supervised fine-tuning with TRL's SFTTrainer, loss on the completion only.

Examples are ``{"prompt": <chat prompt string>, "completion": <assistant text>}``
so the same code trains the long-CoT base model, the long-thought model and
the short-thought model. Checkpoints go to ``out_dir/checkpoints`` and a rerun
after an interruption resumes from the last complete one; the final model is saved as
safetensors with its tokenizer in ``out_dir/model``, then ``sft_result.json``, and a
rerun that finds both returns the stored result without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from longshort.config import LoraConfig as LoraSettings
from longshort.config import SFTConfig, repo_file
from longshort.io import atomic_write_text, fsync_dir, fsync_tree, json_digest, replace_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTResult:
    model_dir: str
    train_loss: float  # the whole run's mean loss, the steps before a resumed checkpoint included (run_train_loss)
    steps: int
    train_tokens: int
    train_runtime_s: float
    resumed_from: str | None


def deepspeed_config(path: str | None) -> str | None:
    """The DeepSpeed config file to hand a Trainer: ``path`` resolved on CUDA, None without CUDA.

    DeepSpeed needs a distributed environment even for one process. A stage that Prefect runs
    in-process (no ``torchrun``/``accelerate launch``) gets a single-process one: rank 0 of 1 on
    127.0.0.1, as the Hugging Face DeepSpeed guide does for notebooks. A launcher's settings win.
    """
    if not path:
        return None
    if not torch.cuda.is_available():
        log.info("no CUDA: training without the DeepSpeed config %s", path)
        return None
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:  # a free port for the one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                            "WORLD_SIZE": "1"}.items():  # fmt: skip
            os.environ.setdefault(name, value)
    return repo_file(path)


@contextmanager
def deepspeed_scope(path: str | None) -> Iterator[str | None]:
    """``deepspeed_config(path)`` for the life of one Trainer, then transformers' ZeRO-3 flag cleared.

    A Trainer's arguments with a ZeRO-3 config set a process-wide flag in transformers
    (``is_deepspeed_zero3_enabled``). While it stands, every later ``from_pretrained`` in the process
    builds its weights partitioned for DeepSpeed, i.e. empty outside a DeepSpeed engine. A pipeline
    runs its stages in one process, so the next stage's model would load empty: on an H200, a ZeRO-2
    SFT after a ZeRO-3 one failed with "'weight' must be 2-D". On exit, with or without an error,
    the flag is cleared (``unset_hf_deepspeed_config``, what transformers' own tests call).
    """
    resolved = deepspeed_config(path)
    try:
        yield resolved
    finally:
        if resolved is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

            unset_hf_deepspeed_config()


def save_trained(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, model_dir: Path, *, merge_lora: bool = False) -> None:
    """Save the trained model (safetensors) and its tokenizer to ``model_dir``, replacing it atomically.

    Under DeepSpeed ``trainer.save_model`` gathers ZeRO-3's sharded weights (the config's
    ``stage3_gather_16bit_weights_on_model_save``); ``save_pretrained`` on the wrapped model would
    write empty placeholders. Only the main process writes, and every process returns once it has.
    ``merge_lora`` folds LoRA adapters in.
    """
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    if trainer.is_deepspeed_enabled and not merge_lora:
        trainer.save_model(str(tmp))
    elif trainer.is_world_process_zero():
        final = trainer.model.merge_and_unload() if merge_lora else trainer.model
        final.save_pretrained(str(tmp), safe_serialization=True)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        replace_tree(tmp, model_dir)
    trainer.accelerator.wait_for_everyone()  # no process goes on (to retire the checkpoints) before the model is whole


def release_trainer(trainer: Trainer) -> None:
    """Free what a finished (or failed) Trainer holds on the accelerator, for what runs after it in this process: the
    next stages, or after a failure a caller that catches the error and goes on (``bench/gpu_check.py``'s stopped
    runs; the pipeline itself sets no retries on SFT, and its failed flow ends).

    ``accelerator.free_memory`` destroys a DeepSpeed engine (removing the hooks ZeRO put on the model) and drops
    the accelerator's references to the prepared model, optimizer and scheduler, as accelerate advises between
    two trainings; transformers itself calls it only when a training starts. Then the model leaves DeepSpeed's
    ZeRO-3 module stack (:func:`_forget_zero3_module`). The trainer goes when its caller returns, and the stage
    runner then collects and empties the CUDA cache (``free_accelerator_memory``)."""
    engine_module = getattr(getattr(trainer, "model_wrapped", None), "module", None)  # before the engine goes
    try:
        trainer.accelerator.free_memory()
    finally:  # a sticky CUDA error raises from the engine's destroy: DeepSpeed's references go all the same
        # GRPO's reference model under ZeRO-3 is an engine of its own (TRL's prepare_deepspeed), outside accelerate
        _forget_zero3_module(trainer.model, engine_module, getattr(trainer, "ref_model", None))


def cleanup_step(what: str, step: Callable[..., None], *args: Any) -> None:
    """Run one clean-up step of a finished (or failed) training; its failure (a sticky CUDA error raises again) is
    logged, so it neither skips the next step nor replaces the training's own error."""
    try:
        step(*args)
    except Exception:  # noqa: BLE001
        log.warning("could not %s", what, exc_info=True)


def _forget_zero3_module(*modules: Any) -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps, for the life of the process, of an engine it has destroyed.

    DeepSpeed (0.19.8) holds a ZeRO-3 model in two process-wide places that ``destroy`` leaves alone:
    - ``FWD_MODULE_STACK`` (``deepspeed.runtime.zero.parameter_offload``): each engine pushes its model when it sets
      up its hooks and never pops it (forwards push and pop sub-modules above it; a forward that raised leaves
      them). ``modules`` and their sub-modules are taken off.
    - the ``functools.lru_cache`` of ``PartitionedParameterCoordinator.__params_to_release``, a method's cache keyed
      by the coordinator and the sub-modules: emptied (for every coordinator: a live engine only recomputes it).
    Through its parameters the model keeps the ZeRO-3 optimizer alive, with its reduce bucket (5e8 elements unless
    the config sets ``reduce_bucket_size``): on an H200 each ZeRO-3 SFT of the demo model left 1 GiB allocated, and
    a 7B model would keep its weights and optimizer state too. Nothing to do when DeepSpeed was never imported."""
    stack, cache_clear = _zero3_holders()
    if stack is not None:
        ids = {id(sub) for m in modules if isinstance(m, torch.nn.Module) for sub in m.modules()}
        stack[:] = [m for m in stack if id(m) not in ids]
    if cache_clear is not None:
        cache_clear()


def _zero3_holders() -> tuple[list[Any] | None, Callable[[], None] | None]:
    """The two places of :func:`_forget_zero3_module` in the DeepSpeed this process imported: its module stack, and
    the ``cache_clear`` of the coordinator's cache (behind DeepSpeed's NVTX wrapper); None for one not found."""
    stack = getattr(sys.modules.get("deepspeed.runtime.zero.parameter_offload"), "FWD_MODULE_STACK", None)
    coordinator = getattr(sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator"),
                          "PartitionedParameterCoordinator", None)  # fmt: skip
    method = vars(coordinator).get("_PartitionedParameterCoordinator__params_to_release") if coordinator else None
    candidates = (method, *(c.cell_contents for c in getattr(method, "__closure__", None) or ()))
    cache_clear = next((c.cache_clear for c in candidates if callable(getattr(c, "cache_clear", None))), None)
    return (stack if isinstance(stack, list) else None), cache_clear


def run_train_loss(log_history: Sequence[Mapping[str, Any]]) -> float | None:
    """The mean training loss over every logged step of a run, from the Trainer's ``log_history``.

    Each ``loss`` entry is the mean over the steps since the one before, so entries are weighted by the
    steps they cover. A resumed Trainer's history starts with the checkpoint's entries, so an interrupted
    and an uninterrupted run report the same number. ``TrainOutput.training_loss`` does not: it covers
    only the steps of the process that returned it, and its divisor changed between transformers
    releases (the total step count in 5.17, the steps run in 5.23). None when nothing was logged.
    """
    total = covered = 0.0
    previous = 0
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        width = int(entry["step"]) - previous
        if width > 0:
            total += float(entry["loss"]) * width
            covered += width
            previous = int(entry["step"])
    return total / covered if covered else None


class _LossHistory(TrainerCallback):
    def __init__(self) -> None:
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "loss" in logs:
            self.history.append({"step": state.global_step, "loss": float(logs["loss"])})


DURABLE_MARK = ".durable"  # in a Trainer checkpoint once all of it is on the disk (DurableCheckpoints)


class DurableCheckpoints(TrainerCallback):
    """Flush each Trainer checkpoint to the disk once it is saved, then mark it so (``DURABLE_MARK``).

    transformers writes ``checkpoint-N`` with plain writes and no flush. After a power cut or a crash of the
    machine (not of the process), a checkpoint that was not flushed can come back with files of the right names
    but short or zero-filled, which a resume loads and fails on, at every rerun. Here every process flushes the
    folder at ``on_save`` (``fsync_tree``: under a multi-process launch each covers the files it wrote itself,
    DeepSpeed's per-rank states), waits for the others, and the main process then writes the mark, flushed with
    the folder. ``checkpoint_problem`` counts a checkpoint without the mark as incomplete, so the resume goes back
    to the one before, which is whole: transformers calls ``on_save`` after its rotation, which with
    ``save_total_limit=2`` removes only checkpoints older than that one. A process killed between the save and
    the mark costs the steps since that earlier checkpoint.
    """

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        from accelerate import PartialState  # noqa: PLC0415

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            fsync_tree(folder)
        PartialState().wait_for_everyone()  # every process's files are on the disk before the mark
        if state.is_world_process_zero and folder.is_dir():
            atomic_write_text(folder / DURABLE_MARK, "")
            fsync_dir(folder)
            fsync_dir(folder.parent)


# Largest fp32 logits tensor (batch x max_length x vocab) for which the loss is taken from the full logits.
_PLAIN_LOSS_MAX_LOGITS_BYTES = 256 * 2**20


class _SFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with, for small vocabularies, the loss taken from the model's full logits.

    TRL 1.x computes the loss through a fused, chunked LM head that never builds the
    ``[tokens, vocab]`` logits, and with it the per-token entropy and top-1 accuracy it logs.
    That saves gigabytes for a 150k vocabulary on a GPU, but where there is no Triton (CPU) it
    runs as a sequence of torch ops over the whole tile, twice in the backward, and on the
    demo's 0.5 M-parameter model with a 600-token vocabulary it was ~15% of every training step.
    ``plain_loss`` computes the same quantity, the sum of the completion tokens' negative
    log-likelihood over the batch's label count (``num_items_in_batch``, as TRL does), with one
    ``log_softmax`` over the full logits; the logged metrics (entropy, mean token accuracy,
    num_tokens) are computed the same way from it, without gradients.
    """

    def __init__(self, *args, plain_loss: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plain_loss = plain_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        if not self.plain_loss or return_outputs or not self.model.training or "attention_mask" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"][:, 1:]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        logp = F.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
        nll = F.nll_loss(logp.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        mask = labels != -100
        n_items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = nll / torch.as_tensor(n_items, device=nll.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():  # the metrics TRL logs, from the same log-probabilities
            n_valid = mask.sum()
            entropy = -(logp.exp() * logp).sum(-1)
            top1 = logp.argmax(-1) == labels
            metrics = self._metrics["train"]
            denom = n_valid.clamp(min=1)
            metrics["entropy"].append((entropy[mask].sum() / denom).item())
            metrics["mean_token_accuracy"].append((top1[mask].sum() / denom).item())
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
            metrics["num_tokens"] = [self._total_train_tokens]
        return loss


def _use_plain_loss(model: PreTrainedModel, cfg: SFTConfig) -> bool:
    """Full logits when they are small (the tiny demo models), TRL's fused LM head otherwise."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return cfg.lora is None and cfg.batch_size * cfg.max_length * vocab * 4 <= _PLAIN_LOSS_MAX_LOGITS_BYTES


def peft_lora(lora: LoraSettings | None):
    """peft's LoraConfig for a profile's ``lora`` section (None: no adapters)."""
    if lora is None:
        return None
    from peft import LoraConfig  # noqa: PLC0415

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def last_complete_checkpoint(
    ckpt_dir: Path, *, optimizer_state: bool = True, deepspeed: str | Mapping[str, Any] | None = None
) -> str | None:
    """The newest checkpoint that holds everything a resume loads from it.

    A process killed while saving leaves a folder with weights but no trainer state, or a trainer state
    cut short (transformers writes it with a plain ``open``, last); a kill while deleting a folder
    (``retire_checkpoints``, ``rotate_checkpoints``) can leave the trainer state with some other files
    gone. transformers resumes from such a folder without an error where the optimizer, scheduler or RNG
    file is missing (it skips them, and only logs a missing RNG file): a silently different run. So a
    folder is complete when ``checkpoint_problem`` finds nothing missing; the others are skipped with a
    warning naming what is missing and removed (so that the next save can use the name), and the newest
    complete one is picked. ``optimizer_state`` is False for checkpoints saved with ``save_only_model``;
    ``deepspeed`` is the DeepSpeed config the Trainer runs with (its path or dict), None without one.
    """
    complete = []
    for folder in Path(ckpt_dir).glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if not step.isdigit() or not folder.is_dir():
            continue
        problem = checkpoint_problem(folder, optimizer_state=optimizer_state, deepspeed=deepspeed)
        if problem is None:
            complete.append((int(step), folder))
        else:
            log.warning("skipping and removing incomplete checkpoint %s (%s)", folder, problem)
            _remove_renamed(folder)
    return str(max(complete)[1]) if complete else None


def checkpoint_problem(
    folder: Path, *, optimizer_state: bool = True, deepspeed: str | Mapping[str, Any] | None = None
) -> str | None:
    """What a Trainer checkpoint folder lacks for a faithful resume, or None when it is whole.

    What transformers 5 (``Trainer._save_checkpoint``) writes, and reads back on resume:
    - always ``trainer_state.json`` (written last), and ``DURABLE_MARK`` (ours: the whole folder was flushed to
      the disk, :class:`DurableCheckpoints`), and, unless DeepSpeed saved the run, the weights:
      ``model.safetensors``, ``adapter_model.safetensors`` (LoRA) or a ``*.index.json`` with its shards;
    - with optimizer state (``save_only_model`` False): ``optimizer.pt`` and ``scheduler.pt``, and
      ``rng_state.pth`` (one process) or ``rng_state_{rank}.pth`` (one per process);
    - under DeepSpeed, instead of the weights and ``optimizer.pt``, the engine's ``save_checkpoint``: a
      ``latest`` file naming a ``global_stepN/`` folder of ``*model_states.pt`` and, with ZeRO (stage >= 1),
      one ``*optim_states.pt`` per data-parallel rank. ``scheduler.pt`` is still written unless the engine
      runs the LR scheduler (then it lives in the engine's states): when the DeepSpeed config has its own
      ``scheduler``, or its own ``optimizer`` (``integrations.deepspeed.deepspeed_optim_sched`` then hands the
      Trainer's scheduler to the engine), as ``infra/deepspeed/zero3_offload.json`` does.
    """
    problem = _trainer_state_problem(folder / "trainer_state.json")
    if problem is not None:
        return problem
    if not (folder / DURABLE_MARK).is_file():
        return f"no {DURABLE_MARK} mark: its save was not flushed to the disk to the end"
    ds = _deepspeed_settings(deepspeed)
    # The processes that saved it: one wrote rng_state.pth, several one rng_state_{rank}.pth each.
    ranks = sorted(int(r) for p in folder.glob("rng_state_*.pth") if (r := p.stem.rsplit("_", 1)[1]).isdigit())
    world = 1 if (folder / "rng_state.pth").is_file() else len(ranks) if ranks == list(range(len(ranks))) else None
    missing: list[str] = []
    if ds is not None and optimizer_state:
        missing += _deepspeed_missing(folder, zero_stage=ds[0], world=world)
    else:
        missing += weights_missing(folder)
    if optimizer_state:
        if ds is None and not (folder / "optimizer.pt").is_file():
            missing.append("optimizer.pt")
        if (ds is None or not ds[1]) and not (folder / "scheduler.pt").is_file():
            missing.append("scheduler.pt")
        if not world:
            gaps = sorted(set(range(ranks[-1] + 1)) - set(ranks)) if ranks else []
            missing.append(f"rng_state_<rank>.pth of ranks {gaps}" if ranks else "rng_state.pth")
    return f"missing {', '.join(missing)}" if missing else None


def weights_missing(folder: Path) -> list[str]:
    """What is missing of a saved model's weights in ``folder``: nothing (``[]``) when it holds a whole
    ``model.safetensors`` / ``adapter_model.safetensors`` / ``pytorch_model.bin`` / ``adapter_model.bin``, or
    an index (``*.index.json``) whose every shard is there."""
    singles = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
    if any((folder / name).is_file() for name in singles):
        return []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = folder / index
        if not path.is_file():
            continue
        try:
            shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [f"a readable {index} ({type(exc).__name__})"]
        return sorted(s for s in shards if not (folder / s).is_file())
    return ["model weights (model.safetensors, adapter_model.safetensors or a sharded index)"]


def _deepspeed_settings(deepspeed: str | Mapping[str, Any] | None) -> tuple[int, bool] | None:
    """(ZeRO stage, whether DeepSpeed runs the LR scheduler) of a DeepSpeed config path or dict.

    The engine runs the scheduler when the config names a ``scheduler``, and also when it names an ``optimizer``:
    transformers then builds its own scheduler inside ``deepspeed.initialize`` and the Trainer holds a
    ``DeepSpeedSchedulerWrapper``, which ``Trainer._save_optimizer_and_scheduler`` does not write to
    ``scheduler.pt``."""
    if deepspeed is None:
        return None
    cfg = deepspeed if isinstance(deepspeed, Mapping) else json.loads(Path(deepspeed).read_text(encoding="utf-8"))
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    return (int(stage) if str(stage).isdigit() else 0), "scheduler" in cfg or "optimizer" in cfg


def _deepspeed_missing(folder: Path, zero_stage: int, world: int | None) -> list[str]:
    """What a DeepSpeed engine checkpoint in ``folder`` lacks (``DeepSpeedEngine.save_checkpoint``), for
    ``world`` processes (from the RNG files; None when they are incomplete): with ZeRO, one
    ``zero_pp_rank_{rank}_..._optim_states.pt`` per process (and under ZeRO-3 one ``..._model_states.pt``)."""
    latest = folder / "latest"
    if not latest.is_file():
        return ["DeepSpeed 'latest' file"]
    tag = latest.read_text(encoding="utf-8").strip()
    states = folder / tag
    if not tag or not states.is_dir():
        return [f"DeepSpeed state folder '{tag}/' named by 'latest'"]
    missing = [] if any(states.glob("*model_states.pt")) else [f"{tag}/*model_states.pt"]
    for kind in ("optim", "model") if zero_stage == 3 else ("optim",) if zero_stage >= 1 else ():
        ranks = sorted({int(p.name.split("zero_pp_rank_", 1)[1].split("_", 1)[0])
                        for p in states.glob(f"*zero_pp_rank_*_{kind}_states.pt")})  # fmt: skip
        if not ranks or ranks != list(range(world or len(ranks))):
            missing.append(f"{tag}/*zero_pp_rank_<rank>_{kind}_states.pt (found ranks {ranks} of {world or '?'})")
    return missing


def _trainer_state_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole trainer state, or None when it is one."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as exc:  # cut short: not JSON, or not UTF-8
        return f"trainer_state.json unreadable: {str(exc).splitlines()[0]}"
    return None if isinstance(state, dict) and "global_step" in state else "trainer_state.json has no global_step"


def _remove_renamed(folder: Path) -> None:
    """Delete ``folder``, renamed first to a dot name: a kill during the rmtree must not leave a folder under
    its own name that has its trainer_state.json but lost other files, or a half-deleted model."""
    retired = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        os.replace(folder, retired)
    shutil.rmtree(retired, ignore_errors=True)


def retire_checkpoints(ckpt_dir: Path) -> None:
    """Delete a finished run's checkpoint folder (renamed away first, see ``_remove_renamed``)."""
    _remove_renamed(Path(ckpt_dir))


def model_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a whole saved model (``config.json`` and its weights), or None."""
    if not (model_dir / "config.json").is_file():
        return f"no {model_dir / 'config.json'}"
    missing = weights_missing(model_dir)
    return f"{model_dir} is missing {', '.join(missing)}" if missing else None


def _stored_result(path: Path, inputs: str | None = None) -> dict[str, Any] | None:
    """The fields of a finished run's result file, or None (with a warning saying why) when it cannot stand
    for the run: absent, unreadable, written from other ``inputs`` (when given), or its model incomplete.

    The result file is written (atomically) after ``save_trained`` has put the whole model in place with
    one rename, so a readable result file means the model was complete; ``model_problem`` checks it again
    in case files were removed since.
    """
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); training again", path, str(exc).splitlines()[0])
        return None
    if not isinstance(stored, dict):
        log.warning("%s does not hold a JSON object; training again", path)
        return None
    if inputs is not None and stored.get("inputs") != inputs:
        log.warning("%s was written from other inputs (%s, now %s); training again", path,
                    str(stored.get("inputs"))[:16], inputs[:16])  # fmt: skip
        return None
    problem = model_problem(path.parent / "model")
    if problem is not None:
        log.warning("%s: its model is incomplete (%s); training again", path, problem)
        return None
    return stored


def inputs_digest(
    rows: Iterable[Mapping[str, Any]], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **settings: Any
) -> str:
    """A digest of what a training run is made from: its data ``rows``, its ``settings`` (config sections,
    seed, ...), the model's config (architecture and where it was loaded from) and the tokenizer's vocabulary.

    Within the pipeline a rerun in one folder has the same inputs: ``_run_stage`` (flows/stages.py) runs
    a stage in ``artifacts/<stage>/<key>``, named by the digest of all its inputs and code
    (``flows.caching.stage_dir``), and removes a folder whose record holds another key. Not so elsewhere:
    ``longshort stage sft_base`` (``flows.dvc_stages``) trains in a fixed ``DIR/sft_base`` and the benches take
    a ``--workdir``; a run killed there before its record, rerun after a settings change, must not take the
    other settings' result. The starting weights are not hashed (gigabytes): two models of one config from
    one path count as the same start.
    """
    rows_digest = hashlib.sha256()  # one row at a time: a real SFT set is gigabytes of JSON
    for row in rows:
        rows_digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
    return json_digest({
        "rows": rows_digest.hexdigest(),
        "settings": settings,
        "model": model.config.to_dict(),
        "tokenizer": [len(tokenizer), json_digest(tokenizer.get_vocab())],
    })  # fmt: skip


def _stamped_inputs(stamp: Path) -> str | None:
    """The inputs digest a checkpoint folder's ``inputs.json`` holds (None when unreadable)."""
    try:
        held = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return held.get("inputs") if isinstance(held, dict) else None


R = TypeVar("R")


def finished_run(result_file: Path, inputs: str, result_type: type[R], what: str) -> R | None:
    """The result a finished run from the same ``inputs`` left in ``result_file``, or None.

    ``result_type`` is the run's result dataclass (``SFTResult``, ``tasks.baseline.BaselineResult``); its
    ``model_dir`` is pointed at the folder's ``model``, where it is now if the folder was moved. On reuse, the
    checkpoints a kill between the result file and their removal left are removed. A result file that cannot
    stand for this run (``_stored_result`` logs why) is removed first: a kill later, after the new model
    replaced the old one and before the new result was written, must not leave the old result beside it.
    """
    out_dir = result_file.parent
    stored = _stored_result(result_file, inputs)
    result = None
    if stored is not None:
        try:
            result = result_type(**{f.name: stored[f.name] for f in fields(result_type)})  # type: ignore[arg-type]
        except KeyError as exc:
            log.warning("%s has no field %s; training again", result_file, exc)
    if result is None:
        result_file.unlink(missing_ok=True)
        return None
    log.info("reusing the finished %s run in %s (%d steps): not training again", what, out_dir, stored["steps"])
    retire_checkpoints(out_dir / "checkpoints")
    return replace(result, model_dir=str(out_dir / "model"))  # type: ignore[type-var]


def train_sft(
    examples: list[dict[str, str]],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SFTConfig,
    out_dir: Path,
    seed: int = 0,
    loss: Literal["auto", "fused", "plain"] = "fused",
) -> SFTResult:
    """Fine-tune ``model`` on prompt/completion pairs and save it to ``out_dir/model``.

    ``loss`` picks how the (same) loss is computed: ``fused`` is TRL's chunked LM head, ``plain``
    the full logits (see ``_SFTTrainer``), ``auto`` the plain one when the logits are small.
    ``fused`` is the default: ``plain`` is 1.2x faster on CPU and equal to float rounding over 60
    steps, but over the demo's 1125-step base SFT the rounding compounded into another model
    (18% held-out accuracy instead of 98.7%: the demo model's copying skill emerges abruptly).

    A rerun in a folder where a run from the same inputs (``inputs_digest``) finished, i.e. wrote
    ``sft_result.json`` after the whole model, returns that run's result without training: a process
    killed after this returned and before the stage's record was saved must not train again from step 0
    (its checkpoints are gone by then). Checkpoints of other inputs are removed, not resumed from.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    inputs = inputs_digest(examples, model, tokenizer, sft=cfg.model_dump(mode="json"), seed=seed, loss=loss)
    if (done := finished_run(out_dir / "sft_result.json", inputs, SFTResult, "SFT")) is not None:
        return done
    stamp = ckpt_dir / "inputs.json"
    if stamp.is_file() and _stamped_inputs(stamp) != inputs:
        log.warning("removing the checkpoints in %s: they were written from other inputs", ckpt_dir)
        retire_checkpoints(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps({"inputs": inputs}))
    use_cuda = torch.cuda.is_available()
    with deepspeed_scope(cfg.deepspeed) as deepspeed:
        args = TRLSFTConfig(
            output_dir=str(ckpt_dir),
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            gradient_checkpointing=cfg.gradient_checkpointing,
            max_length=cfg.max_length,
            completion_only_loss=True,
            packing=False,
            logging_steps=cfg.logging_steps,
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=2,
            report_to=[],
            seed=seed,
            data_seed=seed,
            bf16=cfg.bf16 and use_cuda,
            use_cpu=not use_cuda,
            deepspeed=deepspeed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        history = _LossHistory()
        trainer = _SFTTrainer(
            plain_loss=_use_plain_loss(model, cfg) if loss == "auto" else loss == "plain",
            model=model,
            args=args,
            train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
            peft_config=peft_lora(cfg.lora),
            callbacks=[history, DurableCheckpoints()],
        )
        try:
            last = last_complete_checkpoint(ckpt_dir, optimizer_state=not args.save_only_model, deepspeed=deepspeed)
            if last:
                log.info("resuming SFT from %s", last)
            result = trainer.train(resume_from_checkpoint=last)
            n_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
            train_loss = run_train_loss(trainer.state.log_history)
            model_dir = out_dir / "model"
            save_trained(trainer, tokenizer, model_dir, merge_lora=cfg.lora is not None)
            out = SFTResult(
                model_dir=str(model_dir),
                train_loss=float(train_loss if train_loss is not None else result.training_loss),
                steps=int(result.global_step),
                train_tokens=int(n_tokens * cfg.epochs),
                train_runtime_s=float(result.metrics.get("train_runtime", 0.0)),
                resumed_from=last,
            )
            # The order is what a rerun relies on: the whole model (one rename), its loss history, then the
            # result file (``finished_run`` takes it as the mark of a finished run), and only then the checkpoints go.
            if trainer.is_world_process_zero():  # one writer (under a multi-process launch, the others return)
                atomic_write_text(out_dir / "loss_history.json", json.dumps(history.history))
                atomic_write_text(out_dir / "sft_result.json", json.dumps({**asdict(out), "inputs": inputs}, indent=2))
                retire_checkpoints(ckpt_dir)
            return out
        finally:  # after a failure too: a caller that catches the error gets the accelerator's memory back
            cleanup_step("release the SFT trainer", release_trainer, trainer)

