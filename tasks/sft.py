"""Supervised fine-tuning with TRL's SFTTrainer, loss on the completion only.

Examples are ``{"prompt": <chat prompt string>, "completion": <assistant text>}``
so the same code trains the long-CoT base model, the long-thought model and
the short-thought model. Checkpoints go to ``out_dir/checkpoints`` and a rerun
after an interruption resumes from the last one; the final model is saved as
safetensors with its tokenizer in ``out_dir/model``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from longshort.config import LoraConfig as LoraSettings
from longshort.config import SFTConfig, repo_file
from longshort.io import atomic_write_text

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
    write empty placeholders. Only the main process writes. ``merge_lora`` folds LoRA adapters in.
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
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)


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


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end (``trainer_state.json`` is written last).

    A process killed while saving leaves a folder with weights but no trainer state, or a
    trainer state cut short (transformers writes it with a plain ``open``);
    transformers' ``get_last_checkpoint`` would pick it and every rerun would fail, so
    incomplete folders are skipped (and removed, so that the next save can use the name).
    """
    complete = []
    for folder in Path(ckpt_dir).glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if not step.isdigit():
            continue
        problem = _trainer_state_problem(folder / "trainer_state.json")
        if problem is None:
            complete.append((int(step), folder))
        else:
            log.warning("removing incomplete checkpoint %s (%s)", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
    return str(max(complete)[1]) if complete else None


def _trainer_state_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole trainer state, or None when it is one."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as exc:  # cut short: not JSON, or not UTF-8
        return f"trainer_state.json unreadable: {str(exc).splitlines()[0]}"
    return None if isinstance(state, dict) and "global_step" in state else "trainer_state.json has no global_step"


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
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
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
            callbacks=[history],
        )
        last = last_complete_checkpoint(ckpt_dir)
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
        atomic_write_text(out_dir / "loss_history.json", json.dumps(history.history))
        atomic_write_text(out_dir / "sft_result.json", json.dumps(asdict(out), indent=2))
        # Renamed away before deleting: a kill during the rmtree must not leave a checkpoint that has its
        # trainer_state.json but lost its weights, which a rerun would take as complete and fail to resume.
        retired = out_dir / ".checkpoints.old"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(ckpt_dir, retired)
        shutil.rmtree(retired, ignore_errors=True)
        return out

