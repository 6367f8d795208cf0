"""The long-CoT base model: the analogue of an R1-distilled model (DESIGN §6).

Demo profile: a tokenizer built from the training text and a tiny Llama model
trained from scratch on the teacher's traces. Real profiles: a pretrained model
(e.g. Qwen2.5-7B-Instruct) fine-tuned on the teacher's traces.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from longshort.config import ModelConfig, SFTConfig, TokenizerConfig
from models.factory import build_tiny_model, load_model
from models.protocol import SYSTEM_PROMPTS
from models.tokenizer import build_tokenizer
from tasks.sft import SFTResult, train_sft

log = logging.getLogger(__name__)


def base_sft_examples(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Prompt = the chat prompt for the problem; completion = the whole long-CoT response."""
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM_PROMPTS["base"]}, {"role": "user", "content": r["problem"]}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            "completion": r["response"],
        }
        for r in rows
    ]


def tokenizer_corpus(rows: list[dict[str, Any]]) -> list[str]:
    return [r["problem"] + "\n" + r["response"] for r in rows] + list(SYSTEM_PROMPTS.values())


def train_base_model(
    rows: list[dict[str, Any]],
    model_cfg: ModelConfig,
    tokenizer_cfg: TokenizerConfig,
    sft_cfg: SFTConfig,
    out_dir: Path,
    seed: int = 0,
) -> SFTResult:
    if model_cfg.source == "tiny":
        tokenizer = build_tokenizer(tokenizer_corpus(rows), tokenizer_cfg.vocab_size)
        model = build_tiny_model(model_cfg.tiny, tokenizer, seed=seed)
        log.info("tiny %s model: %d parameters", model_cfg.tiny.architecture, model.num_parameters())
    else:
        model, tokenizer = load_model(model_cfg)
    return train_sft(base_sft_examples(tokenizer, rows), model, tokenizer, sft_cfg, out_dir, seed=seed)
