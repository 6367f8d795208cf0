"""Model construction: tiny Llama/Qwen2 models from a config, real ones from a hub id or path."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from longshort.config import ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# any of these makes a folder's tokenizer loadable (fast serialisation, config, sentencepiece, BPE vocab)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(ValueError):
    """A model that cannot be loaded (safely), with the reason; ``path`` is the folder or hub id when known."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A small randomly initialised causal LM sized for ``tokenizer``."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def check_weights_safe(path: Path, allow_pickle: bool) -> None:
    """Refuse a local model directory whose weights are pickles, unless allowed."""
    if not path.is_dir():
        return
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safetensors and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path}: weights are pickle files ({', '.join(pickles)}), which can run arbitrary code "
            "when loaded; convert them to safetensors or set base_model.allow_pickle: true",
            path=path,
        )
    if not has_safetensors and not pickles:
        raise ModelLoadError(f"{path}: no model weights (*.safetensors) found", path=path)


def _load_error(name_or_path: str | Path, what: str, exc: Exception) -> ModelLoadError:
    """A transformers loading failure as a one-line ModelLoadError naming the folder (or hub id) and what failed.

    Custom code that is not allowed gets its own advice; a local folder without tokenizer files says so
    (transformers' own message then talks of sentencepiece and slow tokenizers)."""
    if "trust_remote_code" in str(exc):
        return ModelLoadError(
            f"{name_or_path}: the model needs custom code; set trust_remote_code: true in the "
            "profile only if you trust its source",
            path=name_or_path,
        )
    path = Path(name_or_path)
    if what == "tokenizer" and path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        reason = f"the folder has none of {', '.join(TOKENIZER_FILES)} (save the tokenizer with the model)"
    else:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    return ModelLoadError(f"{name_or_path}: cannot load the {what}: {reason}", path=name_or_path)


def load_pretrained(
    name_or_path: str | Path,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype: str = "float32",
    revision: str | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Only safetensors weights are accepted unless ``allow_pickle``; custom model
    code runs only when ``trust_remote_code`` is set explicitly.
    """
    path = Path(name_or_path)
    if path.exists():
        check_weights_safe(path, allow_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code, revision=revision
        )
    except (ValueError, OSError) as exc:
        raise _load_error(name_or_path, "tokenizer", exc) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path),
            trust_remote_code=trust_remote_code,
            revision=revision,
            dtype=DTYPES[dtype],
            use_safetensors=None if allow_pickle else True,
        )
    except (ValueError, OSError, SafetensorError) as exc:  # SafetensorError: a truncated file, a Git-LFS pointer
        raise _load_error(name_or_path, "model", exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_model(
    cfg: ModelConfig, path: str | Path | None = None, device: str | None = None, revision: str | None = None
):
    """Load the model a config names, or the one at ``path`` (a trained checkpoint, or another hub id such as the
    teacher's, pinned by ``revision``) with the config's safety flags."""
    return load_pretrained(
        path or cfg.name_or_path,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
        dtype=cfg.dtype,
        revision=revision if path else cfg.revision,
        device=device,
    )
