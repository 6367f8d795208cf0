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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from longshort.config import SFTConfig
from longshort.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTResult:
    model_dir: str
    train_loss: float
    steps: int
    train_tokens: int
    train_runtime_s: float
    resumed_from: str | None


class _LossHistory(TrainerCallback):
    def __init__(self) -> None:
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "loss" in logs:
            self.history.append({"step": state.global_step, "loss": float(logs["loss"])})


def _peft_config(cfg: SFTConfig):
    if cfg.lora is None:
        return None
    from peft import LoraConfig  # noqa: PLC0415

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end (``trainer_state.json`` is written last).

    A process killed while saving leaves a folder with weights but no trainer state;
    transformers' ``get_last_checkpoint`` would pick it and every rerun would fail, so
    incomplete folders are skipped (and removed, so that the next save can use the name).
    """
    complete = []
    for folder in Path(ckpt_dir).glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if not step.isdigit():
            continue
        if (folder / "trainer_state.json").is_file():
            complete.append((int(step), folder))
        else:
            log.warning("removing incomplete checkpoint %s (no trainer_state.json)", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return str(max(complete)[1]) if complete else None


def train_sft(
    examples: list[dict[str, str]],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SFTConfig,
    out_dir: Path,
    seed: int = 0,
) -> SFTResult:
    """Fine-tune ``model`` on prompt/completion pairs and save it to ``out_dir/model``."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    use_cuda = torch.cuda.is_available()
    deepspeed = cfg.deepspeed if (cfg.deepspeed and use_cuda) else None
    if cfg.deepspeed and not use_cuda:
        log.info("no CUDA: training without the DeepSpeed config %s", cfg.deepspeed)
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
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=_peft_config(cfg),
        callbacks=[history],
    )
    last = last_complete_checkpoint(ckpt_dir)
    if last:
        log.info("resuming SFT from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    n_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    final = trainer.model
    if cfg.lora is not None:
        final = final.merge_and_unload()
    tmp = out_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    model_dir = out_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    out = SFTResult(
        model_dir=str(model_dir),
        train_loss=float(result.training_loss),
        steps=int(result.global_step),
        train_tokens=int(n_tokens * cfg.epochs),
        train_runtime_s=float(result.metrics.get("train_runtime", 0.0)),
        resumed_from=last,
    )
    atomic_write_text(out_dir / "loss_history.json", json.dumps(history.history))
    atomic_write_text(out_dir / "sft_result.json", json.dumps(asdict(out), indent=2))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out

