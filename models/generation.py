"""Generation backends behind one interface: transformers (CPU or GPU) and vLLM (GPU).

Every caller that needs text from a model (synthesis, Monte Carlo rollouts,
RL episodes, evaluation, ``longshort solve``) goes through ``GenerationBackend``.
vLLM is imported only when it is selected, so the CPU install never needs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache
from transformers import GenerationConfig as HFGenerationConfig

from longshort.config import GenerationConfig, ModelConfig

log = logging.getLogger(__name__)

PrefixMode = Literal["shared", "copied", "separate"]
_SAMPLE_SEED_STRIDE = 1_000_003  # seed offset between the passes of prefix="separate"


@dataclass(frozen=True)
class Completion:
    text: str  # includes the stop string that ended it
    n_tokens: int  # generated model tokens, the stop string included
    finish_reason: Literal["stop", "length"]
    token_ids: tuple[int, ...] = ()  # the generated ids counted in n_tokens (RL needs them for log-probs)


class GenerationBackend(Protocol):
    name: str

    def chat_prompt(self, system: str, user: str) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        prefix: PrefixMode = "shared",
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order.

        ``prefix`` says how the ``n`` samples of one prompt treat the prompt:
        ``shared`` encodes it once and every sample reuses its KV cache (the
        default; Monte Carlo rollouts depend on it, DESIGN §3), ``copied`` runs
        ``n`` copies of it in one batch (Hugging Face's ``num_return_sequences``),
        ``separate`` makes one generation pass per sample, re-encoding the prompt
        each time (the naive baseline the benchmark compares against). Greedy
        decoding gives the same text in every mode.
        """
        ...


def _chat_prompt(tokenizer, system: str, user: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@contextlib.contextmanager
def _plain_generation_config(model: Any) -> Iterator[None]:
    """``model.generation_config`` reduced to its token ids for the duration (restored after)."""
    saved = model.generation_config
    ids = {k: getattr(saved, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
    model.generation_config = HFGenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        model.generation_config = saved


class TransformersBackend:
    """Batched ``model.generate`` with left padding and a KV cache.

    The ``n`` samples of a prompt share its encoding by default (see
    ``_generate_from_shared_prefix``): Monte Carlo scoring draws several rollouts
    from each of many long prefixes, and encoding a prefix once instead of ``n``
    times is most of its cost on a CPU.
    """

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 64, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.batch_size = batch_size

    def chat_prompt(self, system: str, user: str) -> str:
        return _chat_prompt(self.tokenizer, system, user)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _single_token_id(self, text: str) -> int | None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        prefix: PrefixMode = "shared",
    ) -> list[list[Completion]]:
        if prefix not in ("shared", "copied", "separate"):
            raise ValueError(f"generate: prefix must be 'shared', 'copied' or 'separate', got {prefix!r}")
        if prefix == "separate" and n > 1:
            # The naive baseline: one full pass per sample, each re-encoding every prompt.
            passes = [
                self.generate(
                    prompts,
                    max_new_tokens=max_new_tokens,
                    stop=stop,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + j * _SAMPLE_SEED_STRIDE,
                )
                for j in range(n)
            ]
            return [[one[i][0] for one in passes] for i in range(len(prompts))]
        share = prefix == "shared" and n > 1
        tok = self.tokenizer
        # Stops that are one token become extra EOS ids (cheap); others use stop_strings.
        stop_ids = {s: self._single_token_id(s) for s in stop}
        eos_ids = [tok.eos_token_id] + [i for i in stop_ids.values() if i is not None]
        string_stops = [s for s, i in stop_ids.items() if i is None]
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        per_batch = max(1, self.batch_size // n)
        # only what is asked for here shapes the samples (RL scores them as log_softmax(logits / T)): a hub
        # model's saved generation_config (e.g. repetition_penalty 1.05) would make rollouts off-policy, and
        # transformers merges it into any generation_config passed in, so it is swapped out for the call
        with _plain_generation_config(self.model):
            for start in range(0, len(order), per_batch):
                idx = order[start : start + per_batch]
                batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(self.device)
                kwargs = dict(
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_ids,
                    pad_token_id=tok.pad_token_id,
                    do_sample=temperature > 0,
                )
                if temperature > 0:
                    kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
                    torch.manual_seed(seed + start)
                if string_stops:
                    kwargs.update(stop_strings=string_stops, tokenizer=tok)
                if share:
                    out = self._generate_from_shared_prefix(batch["input_ids"], batch["attention_mask"], n, kwargs)
                else:
                    # n full copies of each prompt (num_return_sequences refuses n > 1 when greedy)
                    out = self.model.generate(
                        input_ids=batch["input_ids"].repeat_interleave(n, dim=0),
                        attention_mask=batch["attention_mask"].repeat_interleave(n, dim=0),
                        **kwargs,
                    )
                new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
                for row, ids in enumerate(new_tokens):
                    results[idx[row // n]].append(self._completion(ids, set(eos_ids), string_stops, max_new_tokens))
        return results

    def _generate_from_shared_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, kwargs: dict
    ) -> torch.Tensor:
        """``n`` samples per row that share one encoding of the prompt.

        The prompt minus its last token is encoded once into a KV cache, the cache
        is repeated ``n`` times along the batch (``DynamicCache.batch_repeat_interleave``),
        and ``model.generate`` continues from it: its prefill then runs only the
        last prompt token of each of the ``n`` rows. Positions follow the left
        padding exactly as ``generate`` computes them, so greedy decoding matches
        the ``copied`` path.
        """
        cache = DynamicCache(config=self.model.config)
        if input_ids.shape[1] > 1:
            head_mask = attention_mask[:, :-1]
            position_ids = (head_mask.long().cumsum(-1) - 1).masked_fill(head_mask == 0, 0)
            self.model(
                input_ids=input_ids[:, :-1],
                attention_mask=head_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache.batch_repeat_interleave(n)
        return self.model.generate(
            input_ids=input_ids.repeat_interleave(n, dim=0),
            attention_mask=attention_mask.repeat_interleave(n, dim=0),
            past_key_values=cache,
            **kwargs,
        )

    def _completion(self, ids: list[int], eos_ids: set[int], string_stops: list[str], cap: int) -> Completion:
        tok = self.tokenizer
        end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
        if end is not None and ids[end] == tok.pad_token_id and string_stops:
            # pad == eos (a tokenizer without a pad token): a row that stopped on a stop string is padded with
            # "eos" while the batch goes on, so a stop string before it is where the model stopped
            stopped = self._string_stop(ids[:end], string_stops)
            if stopped is not None:
                return stopped
        if end is not None:
            keep = ids[: end + 1] if ids[end] != tok.eos_token_id else ids[:end]
            text = tok.decode(keep, skip_special_tokens=False)
            return Completion(text, end + 1, "stop", tuple(ids[: end + 1]))
        ids = [t for t in ids if t != tok.pad_token_id]
        stopped = self._string_stop(ids, string_stops)
        if stopped is not None:
            return stopped
        text = tok.decode(ids, skip_special_tokens=False)
        return Completion(text, len(ids), "length" if len(ids) >= cap else "stop", tuple(ids))

    def _string_stop(self, ids: list[int], string_stops: list[str]) -> Completion | None:
        """The completion cut after the first stop string in ``ids``' text, or None when there is none."""
        tok = self.tokenizer
        text = tok.decode(ids, skip_special_tokens=False)
        for s in string_stops:
            cut = text.find(s)
            if cut != -1:
                text = text[: cut + len(s)]
                # the fewest tokens whose decoding covers the cut text
                n_tok = next(k for k in range(1, len(ids) + 1) if len(tok.decode(ids[:k])) >= len(text))
                return Completion(text, n_tok, "stop", tuple(ids[:n_tok]))
        return None


class VLLMBackend:
    """vLLM with prefix caching; used on CUDA machines with the ``gpu`` extra."""

    name = "vllm"

    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GenerationConfig, seed: int = 0):
        from vllm import LLM  # noqa: PLC0415 - optional GPU dependency

        self.llm = LLM(
            model=str(model_path),
            dtype=model_cfg.dtype if model_cfg.dtype != "float32" else "auto",
            trust_remote_code=model_cfg.trust_remote_code,
            enable_prefix_caching=gen_cfg.enable_prefix_caching,
            gpu_memory_utilization=gen_cfg.gpu_memory_utilization,
            seed=seed,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def chat_prompt(self, system: str, user: str) -> str:
        return _chat_prompt(self.tokenizer, system, user)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        prefix: PrefixMode = "shared",
    ) -> list[list[Completion]]:
        # vLLM always shares prompts through its prefix cache (enable_prefix_caching), so
        # ``prefix`` changes nothing here; the n samples come from one request.
        from vllm import SamplingParams  # noqa: PLC0415

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            stop=list(stop),
            include_stop_str_in_output=True,
            seed=seed,
        )
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [
            [
                Completion(
                    o.text,
                    len(o.token_ids),
                    "length" if o.finish_reason == "length" else "stop",
                    tuple(o.token_ids),
                )
                for o in out.outputs
            ]
            for out in outputs
        ]


def vllm_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def make_backend(
    model_path: str | Path, model_cfg: ModelConfig, gen_cfg: GenerationConfig, seed: int = 0
) -> GenerationBackend:
    """The configured backend for a saved model; ``auto`` picks vLLM when CUDA and vLLM are present."""
    choice = gen_cfg.backend
    if choice == "auto":
        choice = "vllm" if vllm_available() else "transformers"
    if choice == "vllm":
        if not vllm_available():
            from longshort.config import ConfigError  # noqa: PLC0415

            raise ConfigError("generation.backend is 'vllm' but CUDA or the vllm package is missing")
        return VLLMBackend(str(model_path), model_cfg, gen_cfg, seed=seed)
    from models.factory import load_model  # noqa: PLC0415 - avoid a cycle at import time

    model, tokenizer = load_model(model_cfg, path=model_path)
    return TransformersBackend(model, tokenizer, batch_size=gen_cfg.batch_size)
