"""Generation backends behind one interface: transformers (CPU or GPU) and vLLM (GPU).

Every caller that needs text from a model (synthesis, Monte Carlo rollouts,
RL episodes, evaluation, ``longshort solve``) goes through ``GenerationBackend``.
vLLM is imported only when it is selected, so the CPU install never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache, StoppingCriteriaList, StopStringCriteria
from transformers import GenerationConfig as HFGenerationConfig

from longshort.config import GenerationConfig, ModelConfig
from longshort.memory import free_accelerator_memory

log = logging.getLogger(__name__)

PrefixMode = Literal["shared", "copied", "separate"]
# transformers samples from torch's global generator, which the backend seeds per batch: two threads sampling at
# once (a thread task runner's score shards, a served pair's concurrent requests) would interleave their draws,
# so sampled calls in one process take turns (greedy ones need no generator)
_GLOBAL_SAMPLER = threading.RLock()
_SAMPLE_SEED_STRIDE = 1_000_003  # seed offset between the passes of prefix="separate"


@dataclass(frozen=True)
class Completion:
    text: str  # includes the stop string that ended it
    n_tokens: int  # generated model tokens, the stop string included
    finish_reason: Literal["stop", "length"]
    token_ids: tuple[int, ...] = ()  # the generated ids counted in n_tokens (RL needs them for log-probs)
    # each id's log-probability under the sampler, after temperature (vLLM when asked; empty otherwise): RL's
    # importance-sampling correction for the sampler/trainer mismatch
    logprobs: tuple[float, ...] = ()


class GenerationBackend(Protocol):
    name: str

    def chat_prompt(self, system: str, user: str) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int],
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        prefix: PrefixMode = "shared",
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order.

        ``max_new_tokens`` caps every prompt's completions, or each prompt's own with one cap per
        prompt (an RL episode's remaining token budget, :func:`models.protocol.run_episodes`).

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


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids every backend feeds the model for ``prompts``: exactly the prompt text's tokens.

    Prompts are chat-template text (plus turns), and a chat template already writes the special tokens
    the model expects (Llama-3.1's and DeepSeek-R1-Distill's start with BOS), so nothing is added:
    tokenizing with ``add_special_tokens=True`` (a tokenizer's default, and vLLM's for text prompts)
    would put a second BOS in front.
    """
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def per_prompt_caps(max_new_tokens: int | Sequence[int], n_prompts: int) -> list[int]:
    """``generate``'s ``max_new_tokens`` as one cap per prompt, each at least 1."""
    caps = [max_new_tokens] * n_prompts if isinstance(max_new_tokens, int) else [int(c) for c in max_new_tokens]
    if len(caps) != n_prompts:
        raise ValueError(f"generate: {len(caps)} max_new_tokens values for {n_prompts} prompts")
    if any(c < 1 for c in caps):
        raise ValueError(f"generate: max_new_tokens must be at least 1, got {min(caps)}")
    return caps


def close_backend(backend: object) -> None:
    """Release what a backend holds (a vLLM engine's GPU memory, a model); one without ``close`` is left alone."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()


def share_gpu_memory(gen_cfg: GenerationConfig, engines: int) -> GenerationConfig:
    """``gen_cfg`` for one of ``engines`` vLLM engines alive at once on the same GPU(s).

    vLLM's ``gpu_memory_utilization`` is a per-engine fraction of the whole GPU and an engine refuses to
    start when less than that is free, so two engines of a pair get half the configured fraction each.
    The transformers backend does not read the field.
    """
    if engines <= 1:
        return gen_cfg
    return gen_cfg.model_copy(update={"gpu_memory_utilization": gen_cfg.gpu_memory_utilization / engines})


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

    Prompts are encoded by :func:`prompt_token_ids` (no special tokens added), as
    the vLLM backend does. Sampling seeds torch once per batch (``seed`` plus the
    batch's offset): the rows of a batch, identical prompts included, draw from
    one stream, so every sample differs and a call is reproducible for a given
    ``seed``, batch size and prompt list, also with other threads sampling at the same
    time (sampled calls take turns: torch's generator is one per process).
    """

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 64, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.batch_size = batch_size
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}

    def chat_prompt(self, system: str, user: str) -> str:
        return _chat_prompt(self.tokenizer, system, user)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        """Drop this backend's reference to the model (freeing it unless the caller holds one); idempotent."""
        if self.model is not None:
            self.model = None
            free_accelerator_memory()

    def _stop_string_criteria(self, stops: tuple[str, ...]) -> StopStringCriteria:
        """The criterion ``generate(stop_strings=...)`` builds, built once per set of stops: building it reads every
        token of the vocabulary, 1.3 s per call with Qwen2.5's 151k tokens (``bench/README.md``), on each call."""
        if stops not in self._stop_criteria:
            self._stop_criteria[stops] = StopStringCriteria(self.tokenizer, list(stops))
        return self._stop_criteria[stops]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int],
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        prefix: PrefixMode = "shared",
    ) -> list[list[Completion]]:
        if prefix not in ("shared", "copied", "separate"):
            raise ValueError(f"generate: prefix must be 'shared', 'copied' or 'separate', got {prefix!r}")
        if self.model is None:
            raise RuntimeError("generate: this backend was closed")
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
        caps = per_prompt_caps(max_new_tokens, len(prompts))
        share = prefix == "shared" and n > 1
        tok = self.tokenizer
        # Stops that are one token become extra EOS ids (cheap); others use stop_strings. The model's own
        # end ids (a generation_config may list several: Qwen2.5-Instruct's <|im_end|> and <|endoftext|>)
        # end a turn as they do on vLLM.
        model_eos = model_end_ids(self.model)
        eos_ids, string_stops = end_ids_and_string_stops(tok, model_eos, stop)
        # an end id that is a special token is counted but has no text (vLLM skips special tokens); one that is not
        # (a stop tag saved as an end id, as the baseline's GRPO saves </answer>) keeps its text, as on vLLM
        eos_set = set(eos_ids)
        silent = {tok.eos_token_id} | (set(model_eos) & set(tok.all_special_ids))
        encoded = prompt_token_ids(tok, prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        per_batch = max(1, self.batch_size // n)
        # only what is asked for here shapes the samples (RL scores them as log_softmax(logits / T)): a hub
        # model's saved generation_config (e.g. repetition_penalty 1.05) would make rollouts off-policy, and
        # transformers merges it into any generation_config passed in, so it is swapped out for the call
        sampler = _GLOBAL_SAMPLER if temperature > 0 else contextlib.nullcontext()
        with sampler, _plain_generation_config(self.model):
            for start in range(0, len(order), per_batch):
                idx = order[start : start + per_batch]
                batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(self.device)
                kwargs = dict(
                    max_new_tokens=max(caps[i] for i in idx),  # each row is cut at its own cap below
                    eos_token_id=eos_ids,
                    pad_token_id=tok.pad_token_id,
                    do_sample=temperature > 0,
                )
                if temperature > 0:
                    kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
                    torch.manual_seed(seed + start)
                if string_stops:
                    kwargs.update(stopping_criteria=StoppingCriteriaList([self._stop_string_criteria(tuple(string_stops))]))
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
                    cap = caps[idx[row // n]]
                    results[idx[row // n]].append(self._completion(ids[:cap], eos_set, string_stops, cap, silent))
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

    def _completion(
        self, ids: list[int], eos_ids: set[int], string_stops: list[str], cap: int, silent: set[int] | None = None
    ) -> Completion:
        """One row's completion: ``ids`` up to the first of ``eos_ids`` (counted; its text dropped when it is
        one of ``silent``, the end-of-text ids, by default the tokenizer's EOS) or the first stop string."""
        tok = self.tokenizer
        silent = {tok.eos_token_id} if silent is None else silent
        end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
        if end is not None and ids[end] == tok.pad_token_id and string_stops:
            # the pad id is an end id (a tokenizer without a pad token pads with EOS; Qwen2.5's pad <|endoftext|>
            # is one of its model's end ids): a row that stopped on a stop string is padded with it while the
            # batch goes on, so a stop string before it is where the model stopped
            stopped = self._string_stop(ids[:end], string_stops)
            if stopped is not None:
                return stopped
        if end is not None:
            keep = ids[:end] if ids[end] in silent else ids[: end + 1]
            text = tok.decode(keep, skip_special_tokens=False)
            return Completion(text, end + 1, "stop", tuple(ids[: end + 1]))
        # a row that stopped on a stop string is padded while the batch goes on: only that trailing padding goes
        # (a pad id the model sampled mid-turn, Qwen2.5's <|endoftext|> say, is part of what it wrote)
        while ids and ids[-1] == tok.pad_token_id:
            ids = ids[:-1]
        stopped = self._string_stop(ids, string_stops)
        if stopped is not None:
            return stopped
        text = tok.decode(ids, skip_special_tokens=False)
        return Completion(text, len(ids), "length" if len(ids) >= cap else "stop", tuple(ids))

    def _string_stop(self, ids: list[int], string_stops: list[str]) -> Completion | None:
        """The completion cut after the first stop string in ``ids``' text, or None when there is none."""
        cut = cut_at_stop(self.tokenizer, ids, string_stops)
        if cut is None:
            return None
        text, n_tok = cut
        return Completion(text, n_tok, "stop", tuple(ids[:n_tok]))


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer writes it as one token, else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def model_end_ids(model) -> list[int]:
    """The model's own end ids: its generation config's ``eos_token_id`` (none, one, or several: Qwen2.5-Instruct
    ends at <|im_end|> or <|endoftext|>, Llama-3.1 at three)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def end_ids_and_string_stops(tokenizer, model_eos: Sequence[int], stops: Sequence[str]) -> tuple[list[int], list[str]]:
    """How a ``model.generate`` stops at ``stops``: the end ids (the tokenizer's end-of-sequence, the model's own,
    and the stops that are one token: cheap), and the stops that are longer (a stop-string criterion's)."""
    stop_ids = {s: single_token_id(tokenizer, s) for s in stops}
    eos_ids = [tokenizer.eos_token_id, *model_eos, *(i for i in stop_ids.values() if i is not None)]
    return list(dict.fromkeys(eos_ids)), [s for s, i in stop_ids.items() if i is None]


def stop_end(text: str, stops: Sequence[str]) -> int | None:
    """Where the stop string that ends first in ``text`` ends, or None when none occurs."""
    ends = [at + len(s) for s in stops if (at := text.find(s)) != -1]
    return min(ends) if ends else None


def cut_at_stop(tokenizer, ids: Sequence[int], stops: Sequence[str]) -> tuple[str, int] | None:
    """``ids`` cut after the stop string that ends first in their text: (the text up to and with it, the fewest
    leading ids whose text covers it), or None when no stop occurs.

    The fewest ids are found by bisection (a prefix's text grows with the prefix): a few decodes, where trying
    every prefix decoded one per id, quadratic in the turn's length (a 4,096-token turn: 4,096 decodes)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    end = stop_end(text, stops)
    if end is None:
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= end:
            hi = mid
        else:
            lo = mid + 1
    return text[:end], lo


def vllm_request_seeds(seed: int, n_prompts: int) -> list[int]:
    """The ``SamplingParams.seed`` of each prompt's request: a hash of ``(seed, i)`` for prompt ``i``.

    vLLM seeds a generator per request, so requests that share a prompt and a seed give the same
    sample (the k copies of a problem that ``tasks.evaluate.pair_records`` sends would all agree).
    A request with ``n`` samples fans out into ``n`` child requests seeded ``seed + j``
    (``vllm/v1/engine/parallel_sampling.py``, ``ParentRequest._get_child_sampling_params``). Hashing
    keeps every child seed apart, within a call and across calls whose seeds differ by small offsets:
    ``models.protocol.run_episodes`` seeds turn ``t`` with ``seed + t``, and a stride (``seed + i * n``)
    would give prompt ``i`` of turn ``t + 1`` the noise of prompt ``i + 1`` at turn ``t``. The values are
    in [0, 2**62): non-negative (the caller's seed may be), with room for ``+ j``.
    """
    return [
        int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") >> 2
        for i in range(n_prompts)
    ]


def vllm_sampling_kwargs(
    n_prompts: int,
    *,
    max_new_tokens: int | Sequence[int],
    stop: Sequence[str],
    temperature: float,
    top_p: float,
    n: int,
    seed: int,
    logprobs: bool = False,
) -> list[dict[str, Any]]:
    """One ``vllm.SamplingParams(**kwargs)`` per prompt (``LLM.generate`` pairs a list with the prompts).
    ``logprobs``: report each sampled token's log-probability (``logprobs=0``: the sampled one only).
    Greedy requests ask for one sample: vLLM refuses ``n > 1`` at temperature 0, and the n greedy
    samples are the same text (``VLLMBackend.generate`` repeats it, as the transformers backend does)."""
    common = dict(
        n=n if temperature > 0 else 1,
        temperature=temperature,
        top_p=top_p,
        stop=list(stop),
        include_stop_str_in_output=True,
        **({"logprobs": 0} if logprobs else {}),
    )
    caps = per_prompt_caps(max_new_tokens, n_prompts)
    return [{**common, "max_tokens": c, "seed": s} for c, s in zip(caps, vllm_request_seeds(seed, n_prompts), strict=True)]


def repeat_to_n(completions: list[Completion], n: int) -> list[Completion]:
    """A prompt's ``n`` completions from a greedy request, which asked the engine for one
    (:func:`vllm_sampling_kwargs`); a sampled request's ``n`` pass through unchanged."""
    if len(completions) == n:
        return completions
    if len(completions) != 1:
        raise RuntimeError(f"the engine returned {len(completions)} completions for a request of {n}")
    return completions * n


def _ids_through_stop(tokenizer, ids: Sequence[int], stop: str) -> list[int]:
    """The fewest leading ``ids`` whose text holds ``stop``.

    vLLM checks stop strings after each step and keeps every id of the step in ``token_ids``
    (``vllm/v1/engine/detokenizer.py``: only ``output_text`` is truncated); with one token per step
    the last id is the one that completed the stop string, as in the transformers backend, and this
    costs one decode. A step of several tokens (speculative decoding) may leave ids after it: they
    are dropped here so both backends count the same tokens.
    """
    ids = list(ids)
    while len(ids) > 1 and stop in tokenizer.decode(ids[:-1], skip_special_tokens=True):
        ids.pop()
    return ids


def completion_from_vllm(
    tokenizer, text: str, token_ids: Sequence[int], finish_reason: str | None, stop_reason: int | str | None,
    logprobs: Sequence[Mapping[int, Any]] | None = None,
) -> Completion:
    """A :class:`Completion` from one vLLM ``CompletionOutput``'s fields, counted as the transformers backend counts.

    ``token_ids`` holds every generated id: an EOS (or other stop token) that ended the sample is the
    last id and is counted (its text is not in ``text``, special tokens being skipped); with
    ``include_stop_str_in_output=True`` the text ends with the stop string, and the ids end with the
    token that completed it. ``logprobs`` (vLLM's, one ``{id: Logprob}`` per generated id, when asked
    for) gives each kept id's log-probability; NaN where vLLM has none for it.
    """
    ids = list(token_ids)
    if isinstance(stop_reason, str) and ids:
        ids = _ids_through_stop(tokenizer, ids, stop_reason)
    lps: tuple[float, ...] = ()
    if logprobs is not None:
        lps = tuple(
            float(getattr(step.get(i), "logprob", math.nan)) if step else math.nan
            for i, step in zip(ids, logprobs, strict=False)  # ids cut after a stop string; missing steps padded below
        )
        lps += (math.nan,) * (len(ids) - len(lps))
    return Completion(text, len(ids), "length" if finish_reason == "length" else "stop", tuple(ids), lps)


def shutdown_vllm(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine: ``LLM.shutdown`` where a version has it, else the V1 engine's.

    V1's ``LLMEngine.shutdown`` and its ``engine_core`` client's ``shutdown`` end the engine-core
    process (the default multiprocessing mode), which frees its GPU memory.
    """
    engine = getattr(llm, "llm_engine", None)
    for owner in (llm, engine, getattr(engine, "engine_core", None)):
        shutdown = getattr(owner, "shutdown", None) if owner is not None else None
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - a failed shutdown must not hide the run's result
                log.warning("vLLM engine shutdown failed; its memory is freed when the process ends", exc_info=True)
            return


def use_spawned_engine_process() -> None:
    """Have vLLM start its engine-core process with ``spawn``, unless ``VLLM_WORKER_MULTIPROC_METHOD`` says otherwise.

    vLLM forks that process unless torch has initialized CUDA in this one. But ``torch.cuda.is_available()``
    (:func:`vllm_available`, the device pick of the transformers path) already starts the CUDA driver here without
    torch's own initialization, and torch then refuses every CUDA call in a forked child ("Cannot re-initialize
    CUDA in forked subprocess"): without this, the first engine of a process that had only asked whether CUDA is
    there died at start-up (seen on an H200 with vllm 0.26). vLLM itself switches to spawn once CUDA is
    initialized, so a process that trained before its engines started was spawning them already.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


class VLLMBackend:
    """vLLM with prefix caching; used on CUDA machines with the ``gpu`` extra.

    Prompts go to the engine as token ids from :func:`prompt_token_ids`, the same ids the
    transformers backend feeds its model (a text prompt would be tokenized with special tokens
    added: a second BOS after the chat template's). Sampling: each prompt's request gets its own
    seed (:func:`vllm_request_seeds`), so identical prompts in one call give different samples and
    the draws do not depend on the prompt's place in the batch; the draws themselves differ from the
    transformers backend's (torch seeded once per batch there). vLLM documents its results as
    reproducible only with ``VLLM_BATCH_INVARIANT=1`` or ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: batched
    kernels may round differently from run to run, so a rerun can differ in a token here and there.
    ``close()`` shuts the engine down and frees its GPU memory; use one engine per GPU at a time
    or split ``gpu_memory_utilization`` (:func:`share_gpu_memory`).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        gen_cfg: GenerationConfig,
        seed: int = 0,
        *,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        weight_updates: bool = False,
        sample_logprobs: bool = False,
        revision: str | None = None,
    ):
        from vllm import LLM  # noqa: PLC0415 - optional GPU dependency

        free_accelerator_memory()  # what an earlier stage of this process left cached counts as used to the engine
        use_spawned_engine_process()
        extra: dict[str, Any] = {} if max_model_len is None else {"max_model_len": max_model_len}
        if revision is not None:  # a hub id pinned to a commit: weights and tokenizer from the same one
            extra.update(revision=revision, tokenizer_revision=revision)
        if weight_updates:  # every worker of the engine gets EngineWeightsLoader's method (load_weights below)
            extra["worker_extension_cls"] = ENGINE_WEIGHTS_EXTENSION
        if sample_logprobs:  # log-probabilities of the distribution sampled from, after temperature (as TRL asks)
            extra["logprobs_mode"] = "processed_logprobs"
        self.sample_logprobs = sample_logprobs
        self.llm = LLM(
            model=str(model_path),
            dtype=model_cfg.dtype if model_cfg.dtype != "float32" else "auto",
            trust_remote_code=model_cfg.trust_remote_code,
            enable_prefix_caching=gen_cfg.enable_prefix_caching,
            gpu_memory_utilization=gen_cfg.gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed % 2**32,  # the workers seed NumPy with it, which takes [0, 2**32) only (a negative seed too)
            **extra,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def chat_prompt(self, system: str, user: str) -> str:
        return _chat_prompt(self.tokenizer, system, user)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def load_weights(self, path: str | Path) -> None:
        """Replace the engine's weights with those in ``path`` (:func:`save_engine_weights`), on every worker.

        Needs an engine made with ``weight_updates=True``. The prefix cache is reset: KV blocks
        computed with the old weights must not be reused for the same prompt ids.
        """
        if self.llm is None:
            raise RuntimeError("load_weights: this backend was closed")
        self.llm.collective_rpc("load_weights_file", args=(str(path),))
        if self.llm.reset_prefix_cache() is False:  # vLLM keeps the cache (with a warning) while a block is held
            raise RuntimeError("load_weights: vLLM did not reset its prefix cache after the weight load, so its "
                               "KV blocks from the old weights would be reused")

    def close(self) -> None:
        """Shut the engine down and free its GPU memory; idempotent."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        shutdown_vllm(llm)
        del llm
        free_accelerator_memory()

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int],
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        prefix: PrefixMode = "shared",
    ) -> list[list[Completion]]:
        # vLLM always shares prompts through its prefix cache (enable_prefix_caching), so
        # ``prefix`` changes nothing here; the n samples come from one request.
        if self.llm is None:
            raise RuntimeError("generate: this backend was closed")
        if not prompts:
            return []
        from vllm import SamplingParams  # noqa: PLC0415

        params = [
            SamplingParams(**kwargs)
            for kwargs in vllm_sampling_kwargs(
                len(prompts), max_new_tokens=max_new_tokens, stop=stop, temperature=temperature,
                top_p=top_p, n=n, seed=seed, logprobs=self.sample_logprobs,
            )
        ]  # fmt: skip
        # a dict with "prompt_token_ids" is a vllm.inputs.TokensPrompt (a TypedDict): no tokenization by vLLM
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_ids(self.tokenizer, prompts)]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return [
            repeat_to_n(
                [
                    completion_from_vllm(
                        self.tokenizer, o.text, o.token_ids, o.finish_reason, getattr(o, "stop_reason", None),
                        o.logprobs if self.sample_logprobs else None,
                    )
                    for o in out.outputs
                ],
                n,
            )
            for out in outputs
        ]


# --------------------------------------------------------------------------- live weights (RL rollouts on vLLM)

ENGINE_WEIGHTS_EXTENSION = "models.generation.EngineWeightsLoader"


def engine_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights an engine serving ``model`` should hold now, named as ``save_pretrained`` names them.

    A plain model gives its parameters (a tied embedding once, as in a checkpoint). A model with
    peft LoRA layers injected (vanilla LoRA, ``tasks.rl`` trains nothing else) gives each adapted
    layer's weight as W + ΔW of its active adapters, computed in float32 *out of place* and cast to
    W's dtype: the training model is not touched (merging into bf16 weights and unmerging after
    would move them by a rounding error at every step). Adapter tensors are left out.
    """
    try:
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    except ImportError:  # no peft: no adapters to fold in
        LoraLayer = ()  # noqa: N806
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if ".lora_" in f".{name}":
            continue  # lora_A.default.weight, lora_B.default.weight, lora_embedding_*, lora_magnitude_vector
        tensor = param.detach()
        if owner.endswith(".base_layer") and owner.removesuffix(".base_layer") in lora:
            owner = owner.removesuffix(".base_layer")
            layer = lora[owner]
            if leaf == "weight" and not layer.merged and not layer.disable_adapters:
                delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
                tensor = (tensor.float() + delta).to(tensor.dtype)
        yield (f"{owner}.{leaf}" if owner else leaf), tensor


def save_engine_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """:func:`engine_weights` of ``model`` in one safetensors file at ``path``, written atomically."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: t.to("cpu").contiguous() for name, t in engine_weights(model)}, str(tmp))
    os.replace(tmp, path)
    return path


class EngineWeightsLoader:
    """vLLM worker extension: ``LLM(worker_extension_cls=ENGINE_WEIGHTS_EXTENSION)`` mixes it into each
    of the engine's workers, so ``LLM.collective_rpc("load_weights_file", args=(path,))`` runs it in
    every worker process (one per tensor-parallel rank).

    The model's own ``load_weights`` is the function vLLM loads a checkpoint with: it maps the
    checkpoint's names onto vLLM's fused layers (q/k/v into qkv_proj, gate/up into gate_up_proj)
    and takes each rank's shard. It copies into the existing parameters, so CUDA graphs captured
    at start-up stay valid. The same path TRL's colocated GRPO takes, across processes.
    """

    model_runner: Any  # set by vLLM's worker

    def load_weights_file(self, path: str) -> int:
        from safetensors import safe_open  # noqa: PLC0415

        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model  # not a CUDA-graph wrapper
        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            model.load_weights(weights=((name, f.get_tensor(name)) for name in names))
        try:  # what vLLM's loader runs after a checkpoint (repacking for quantized layers; nothing for bf16 ones)
            from vllm.model_executor.model_loader.utils import process_weights_after_loading  # noqa: PLC0415
        except ImportError:  # not vLLM's worker (the CPU tests)
            return len(names)
        process_weights_after_loading(model, self.model_config, self.device)  # type: ignore[attr-defined]
        return len(names)


def vllm_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def resolve_backend(gen_cfg: GenerationConfig) -> Literal["vllm", "transformers"]:
    """The backend ``generation.backend`` means on this machine: ``auto`` is vLLM when CUDA and vLLM are
    present; ``vllm`` without them is a ConfigError."""
    if gen_cfg.backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if gen_cfg.backend == "vllm" and not vllm_available():
        from longshort.config import ConfigError  # noqa: PLC0415

        raise ConfigError("generation.backend is 'vllm' but CUDA or the vllm package is missing")
    return gen_cfg.backend


def make_backend(
    model_path: str | Path, model_cfg: ModelConfig, gen_cfg: GenerationConfig, seed: int = 0,
    revision: str | None = None,
) -> GenerationBackend:
    """The configured backend for a saved model or a hub id (:func:`resolve_backend`); ``revision`` pins a hub id
    (the teacher's ``data.teacher_revision``)."""
    if resolve_backend(gen_cfg) == "vllm":
        return VLLMBackend(
            str(model_path),
            model_cfg,
            gen_cfg,
            seed=seed,
            # multi-GPU settings, read when GenerationConfig has them
            tensor_parallel_size=gen_cfg.tensor_parallel_size,
            max_model_len=gen_cfg.max_model_len,
            revision=revision,
        )
    from models.factory import load_model  # noqa: PLC0415 - avoid a cycle at import time

    model, tokenizer = load_model(model_cfg, path=model_path, revision=revision)
    return TransformersBackend(model, tokenizer, batch_size=gen_cfg.batch_size)


def make_pair_backends(
    long_path: str | Path, short_path: str | Path, model_cfg: ModelConfig, gen_cfg: GenerationConfig, seed: int = 0,
    *, same: bool,
) -> tuple[GenerationBackend, GenerationBackend]:
    """The long and short models' backends: one shared backend when ``same`` (the caller's test of identity),
    else two, whose vLLM engines live at once on the GPU and so split ``gpu_memory_utilization``."""
    if same:
        backend = make_backend(long_path, model_cfg, gen_cfg, seed)
        return backend, backend
    gen = share_gpu_memory(gen_cfg, 2)
    long = make_backend(long_path, model_cfg, gen, seed)
    try:
        short = make_backend(short_path, model_cfg, gen, seed)
    except BaseException:
        close_backend(long)  # else its engine holds its share of the GPU until the process ends
        raise
    return long, short
