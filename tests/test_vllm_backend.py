"""The vLLM backend's pure parts and the engine lifecycle, tested without vLLM.

vLLM needs CUDA, so here the pieces it is fed and what its outputs become are tested on
their own: per-prompt seeds, prompt token ids (one BOS, as the transformers backend sees),
token counts as the transformers backend counts, and that evaluation and the served pair
never keep more engines than they need, each with its share of GPU memory. The last test
runs the real engine where CUDA and vLLM are installed.
"""

from __future__ import annotations

import copy
import json

import pytest

from longshort.config import EvaluateConfig, GenerationConfig, ModelConfig, ProtocolConfig
from models.generation import (
    Completion,
    TransformersBackend,
    close_backend,
    completion_from_vllm,
    prompt_token_ids,
    repeat_to_n,
    share_gpu_memory,
    vllm_available,
    vllm_request_seeds,
    vllm_sampling_kwargs,
)
from models.protocol import SYSTEM_PROMPTS, format_long_turn, format_response, format_short_turn
from models.tokenizer import CHAT_TEMPLATE


@pytest.fixture()
def bos_tokenizer(demo_tokenizer):
    """The demo tokenizer made Llama-3.1-like: its chat template writes BOS, and encoding adds one by default."""
    from tokenizers import processors

    tok = copy.deepcopy(demo_tokenizer)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------- seeds


def test_each_prompt_and_sample_gets_its_own_seed():
    """Identical prompts (pair_records sends each problem k times) must not share a seed; vLLM seeds the
    n children of a request seed + j, so no child seed of one prompt may be another prompt's, in one call
    or in the next turn's call (run_episodes seeds turn t with seed + t)."""
    seeds = vllm_request_seeds(7, n_prompts=5)
    children = [s + j for s in seeds for j in range(3)]
    assert len(set(children)) == len(children) == 15
    next_turn = {s + j for s in vllm_request_seeds(8, n_prompts=5) for j in range(3)}
    assert not next_turn & set(children)
    assert vllm_request_seeds(7, 5) == seeds  # reproducible for a seed
    assert vllm_request_seeds(7, 2) == seeds[:2]  # a prompt's seed does not depend on the batch size
    for seed in (-1, 0, 2**40):  # RL's pass-rate rollouts use rl.seed - 1
        assert all(0 <= s < 2**62 for s in vllm_request_seeds(seed, 4))


def test_sampling_kwargs_are_one_per_prompt_and_keep_the_stop_string():
    kwargs = vllm_sampling_kwargs(
        3, max_new_tokens=32, stop=("</answer>",), temperature=0.7, top_p=0.9, n=2, seed=5
    )
    assert [k["seed"] for k in kwargs] == vllm_request_seeds(5, 3)
    for k in kwargs:
        assert k["n"] == 2 and k["max_tokens"] == 32 and k["temperature"] == 0.7 and k["top_p"] == 0.9
        assert k["stop"] == ["</answer>"] and k["include_stop_str_in_output"] is True
    assert vllm_sampling_kwargs(0, max_new_tokens=1, stop=(), temperature=0, top_p=1, n=1, seed=0) == []
    # one cap per prompt (an RL episode's remaining budget) goes to that prompt's request
    capped = vllm_sampling_kwargs(3, max_new_tokens=[5, 32, 9], stop=(), temperature=0.7, top_p=1.0, n=2, seed=5)
    assert [k["max_tokens"] for k in capped] == [5, 32, 9] and [k["seed"] for k in capped] == vllm_request_seeds(5, 3)
    with pytest.raises(ValueError, match="2 max_new_tokens values for 3 prompts"):
        vllm_sampling_kwargs(3, max_new_tokens=[5, 9], stop=(), temperature=0.7, top_p=1.0, n=1, seed=0)


def test_greedy_requests_ask_the_engine_for_one_sample_and_repeat_it():
    """vLLM refuses n > 1 at temperature 0 (SamplingParams._verify_greedy_sampling); greedy samples are one text."""
    greedy = vllm_sampling_kwargs(2, max_new_tokens=8, stop=(), temperature=0.0, top_p=1.0, n=4, seed=0)
    assert [k["n"] for k in greedy] == [1, 1]
    one = Completion("<think>\nx\n</think>", 4, "stop", (1, 2, 3, 4))
    assert repeat_to_n([one], 4) == [one] * 4
    sampled = [one, Completion("y", 1, "length", (5,))]
    assert repeat_to_n(sampled, 2) is sampled
    with pytest.raises(RuntimeError, match="returned 2 completions for a request of 3"):
        repeat_to_n(sampled, 3)


def test_prompt_ids_keep_the_templates_single_bos(bos_tokenizer):
    tok = bos_tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "Start with 3."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith(tok.bos_token)
    # what vLLM does with a text prompt (add_special_tokens=True): a second BOS
    assert tok(prompt)["input_ids"][:2] == [tok.bos_token_id] * 2
    (ids,) = prompt_token_ids(tok, [prompt])
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.decode(ids) == prompt


def test_prompt_ids_add_nothing_to_a_template_without_bos(demo_tokenizer):
    tok = demo_tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Start with {i}."}], tokenize=False,
                                       add_generation_prompt=True) for i in range(3)]  # fmt: skip
    assert all(tok.decode(ids) == p for ids, p in zip(prompt_token_ids(tok, prompts), prompts))
    assert all(tok.bos_token_id not in ids for ids in prompt_token_ids(tok, prompts))


def test_transformers_backend_feeds_the_model_exactly_the_prompt_ids(bos_tokenizer, tiny_model):
    """Both backends must see the same ids: the transformers backend's rows, padding removed, are
    prompt_token_ids' (one BOS), for prompts of different lengths."""
    tok = bos_tokenizer
    backend = TransformersBackend(tiny_model, tok, device="cpu")
    prompts = [backend.chat_prompt("s", "Start with 3."), backend.chat_prompt("s", "Start with 12. Then (1) add 4.")]
    seen = []
    generate = tiny_model.generate

    def recording_generate(*args, **kwargs):
        seen.append((kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()))
        return generate(*args, **kwargs)

    tiny_model.generate = recording_generate
    try:
        backend.generate(prompts, max_new_tokens=2, prefix="copied")
    finally:
        del tiny_model.generate
    rows = [[t for t, m in zip(ids, mask) if m] for batch, masks in seen for ids, mask in zip(batch, masks)]
    assert sorted(rows) == sorted(prompt_token_ids(tok, prompts))
    assert all(r[0] == tok.bos_token_id and r[1] != tok.bos_token_id for r in rows)


# --------------------------------------------------------------------------- token counts


def test_vllm_outputs_count_tokens_as_the_transformers_backend(demo_tokenizer, tiny_model):
    """The same generated stream, as each backend reports it, gives the same text, count and ids.

    vLLM's CompletionOutput keeps every generated id (EOS included) and, with
    include_stop_str_in_output, text up to the end of the stop string."""
    tok = demo_tokenizer
    hf = TransformersBackend(tiny_model, tok, device="cpu")
    eos = tok.eos_token_id
    body = tok("Okay, so we start</think> with 3", add_special_tokens=False)["input_ids"]
    think_close = tok.convert_tokens_to_ids("</think>")

    # a multi-token stop string: transformers cuts after the fewest tokens covering it
    expected = hf._completion(body, {eos}, ["we st"], cap=50)
    k = expected.n_tokens
    got = completion_from_vllm(tok, expected.text, body[:k], "stop", "we st")
    assert got == expected
    # ids after the stop in the same engine step (speculative decoding) are not the model's answer
    assert completion_from_vllm(tok, expected.text, body[: k + 2], "stop", "we st") == expected

    # a one-token stop string (a protocol tag): transformers stops on it as an extra EOS id
    expected = hf._completion(body, {eos, think_close}, [], cap=50)
    end = body.index(think_close) + 1
    assert completion_from_vllm(tok, tok.decode(body[:end]), body[:end], "stop", "</think>") == expected

    # EOS: counted, its text left out (vLLM skips special tokens in the text)
    stream = body[:3] + [eos]
    expected = hf._completion(stream, {eos}, ["never"], cap=50)
    got = completion_from_vllm(tok, tok.decode(body[:3], skip_special_tokens=True), stream, "stop", None)
    assert got == expected and got.n_tokens == 4 and got.token_ids[-1] == eos

    # the length cap
    expected = hf._completion(body[:5], {eos}, [], cap=5)
    assert completion_from_vllm(tok, tok.decode(body[:5]), body[:5], "length", None) == expected
    assert expected.finish_reason == "length"


def test_vllm_sampled_logprobs_follow_the_ids_kept(demo_tokenizer):
    """RL asks the engine for each sampled id's log-probability (``logprobs=0``); they are cut where the ids are."""
    from types import SimpleNamespace

    tok = demo_tokenizer
    body = tok("Okay, so we start</think> with 3", add_special_tokens=False)["input_ids"]
    k = completion_from_vllm(tok, "", body, "stop", "we st").n_tokens
    steps = [{i: SimpleNamespace(logprob=-0.1 * (j + 1), rank=1)} for j, i in enumerate(body)]
    steps[1] = {body[1] + 1: SimpleNamespace(logprob=-9.0, rank=1)}  # the sampled id missing from its step
    got = completion_from_vllm(tok, "", body, "stop", "we st", steps)
    assert len(got.logprobs) == got.n_tokens == k < len(body)
    assert got.logprobs[0] == pytest.approx(-0.1) and got.logprobs[2] == pytest.approx(-0.3)
    assert got.logprobs[1] != got.logprobs[1]  # NaN: no correction for that token
    assert completion_from_vllm(tok, "", body, "stop", "we st").logprobs == ()  # not asked for
    asked = vllm_sampling_kwargs(2, max_new_tokens=8, stop=["</answer>"], temperature=1.0, top_p=1.0, n=1, seed=0,
                                 logprobs=True)  # fmt: skip
    assert all(kw["logprobs"] == 0 for kw in asked)
    assert "logprobs" not in vllm_sampling_kwargs(1, max_new_tokens=8, stop=[], temperature=1.0, top_p=1.0, n=1, seed=0)[0]


# --------------------------------------------------------------------------- releasing engines


def test_share_gpu_memory_splits_only_between_engines_alive_together():
    cfg = GenerationConfig(gpu_memory_utilization=0.8)
    assert share_gpu_memory(cfg, 1) is cfg
    half = share_gpu_memory(cfg, 2)
    assert half.gpu_memory_utilization == pytest.approx(0.4) and half.backend == cfg.backend
    assert cfg.gpu_memory_utilization == 0.8


def test_closing_a_transformers_backend_drops_its_model(tiny_model, demo_tokenizer):
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    (before,) = backend.generate(["Start with 3."], max_new_tokens=3)
    close_backend(backend)
    assert backend.model is None
    backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(["Start with 3."], max_new_tokens=3)
    reopened = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    assert reopened.generate(["Start with 3."], max_new_tokens=3) == [before]
    close_backend(object())  # a backend without close() is left alone


class Lifecycle:
    """Records the backends a run opens and closes, and the memory fraction each was given."""

    def __init__(self):
        self.opened: list[tuple[str, float]] = []
        self.alive: set[int] = set()
        self.most_alive = 0

    def make(self, path, model_cfg, gen_cfg, seed=0):
        backend = ScriptedBackend(self, str(path))
        self.opened.append((str(path), gen_cfg.gpu_memory_utilization))
        self.alive.add(id(backend))
        self.most_alive = max(self.most_alive, len(self.alive))
        return backend


class ScriptedBackend:
    """A model that answers by role; the lifecycle around it is what is under test."""

    name = "scripted"

    def __init__(self, lifecycle: Lifecycle, path: str):
        self.lifecycle, self.path, self.closed = lifecycle, path, False

    def chat_prompt(self, system, user):
        return f"[{system}|{user}]"

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0, prefix="shared"):
        assert not self.closed
        replies = {
            SYSTEM_PROMPTS["base"]: format_response("x", r"\boxed{1}"),
            SYSTEM_PROMPTS["long"]: format_long_turn("x"),
            SYSTEM_PROMPTS["short"]: format_short_turn(r"\boxed{1}", final=True),
        }
        out = []
        for p in prompts:
            text = next(t for s, t in replies.items() if p.startswith(f"[{s}|"))
            out.append([Completion(text, len(text.split()), "stop")] * n)
        return out

    def close(self):
        self.closed = True
        self.lifecycle.alive.discard(id(self))


def _heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"Start with {i}.", "answer": "1"}) + "\n"
                            for i in range(3)))  # fmt: skip
    return str(path)


def test_evaluation_runs_one_system_at_a_time_and_releases_its_engines(tmp_path, monkeypatch):
    from tasks.report import evaluate_systems

    life = Lifecycle()
    monkeypatch.setattr("tasks.report.make_backend", life.make)
    systems = {
        "base": {"kind": "single", "model": "base"},
        "Long⊗Short SFT": {"kind": "pair", "long": "sft_long", "short": "sft_short"},
        "Long⊗Short RL": {"kind": "pair", "long": "rl", "short": "rl"},
        "RL long alone": {"kind": "single", "model": "rl"},
    }
    report = evaluate_systems(
        systems, _heldout(tmp_path), None, ModelConfig(), GenerationConfig(gpu_memory_utilization=0.8),
        ProtocolConfig(), EvaluateConfig(n_problems=3, k=2, temperature=1.0), tmp_path / "out",
    )  # fmt: skip
    assert life.opened == [("base", 0.8), ("sft_long", 0.4), ("sft_short", 0.4), ("rl", 0.8)]  # rl kept
    assert life.most_alive == 2 and not life.alive
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [r["system"] for r in records] == [name for name in systems for _ in range(3 * 2)]
    assert all(r["correct"] for r in records) and report.metrics["heldout.base.accuracy"] == 1.0


def test_evaluation_releases_engines_when_a_system_fails(tmp_path, monkeypatch):
    from tasks.report import evaluate_systems

    life = Lifecycle()
    monkeypatch.setattr("tasks.report.make_backend", life.make)

    def failing(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("tasks.report.pair_records", failing)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_systems(
            {"sft": {"kind": "pair", "long": "a", "short": "b"}}, _heldout(tmp_path), None, ModelConfig(),
            GenerationConfig(), ProtocolConfig(), EvaluateConfig(n_problems=3), tmp_path / "out",
        )  # fmt: skip
    assert len(life.opened) == 2 and not life.alive


def test_a_pair_whose_second_engine_fails_to_start_closes_the_first(monkeypatch):
    from models.generation import make_pair_backends

    life = Lifecycle()

    def make(path, model_cfg, gen_cfg, seed=0):
        if path == "short":
            raise RuntimeError("Engine core initialization failed")
        return life.make(path, model_cfg, gen_cfg, seed)

    monkeypatch.setattr("models.generation.make_backend", make)
    with pytest.raises(RuntimeError, match="initialization failed"):
        make_pair_backends("long", "short", ModelConfig(), GenerationConfig(), same=False)
    assert life.opened == [("long", pytest.approx(0.425))] and not life.alive


def test_served_pair_gives_each_of_two_engines_half_the_memory(tmp_path, monkeypatch):
    from models.pair import LongShortPair, PairSettings

    life = Lifecycle()
    monkeypatch.setattr("models.generation.make_backend", life.make)
    settings = tmp_path / "pair.json"
    settings.write_text(PairSettings(generation=GenerationConfig(gpu_memory_utilization=0.9)).model_dump_json())
    long, short = tmp_path / "long", tmp_path / "short"
    for folder, weights in ((long, "a"), (short, "b")):
        folder.mkdir()
        (folder / "weights").write_text(weights)
    pair = LongShortPair().load(long, short, settings)
    assert [u for _, u in life.opened] == [pytest.approx(0.45)] * 2
    pair.close()
    assert not life.alive
    same = LongShortPair().load(long, long, settings)
    assert life.opened[-1] == (str(long), 0.9) and same.long is same.short
    same.close()
    assert not life.alive


# --------------------------------------------------------------------------- the real engine


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="needs CUDA and the vllm package")
def test_vllm_engine_samples_seeds_prompt_ids_and_release(tmp_path, bos_tokenizer):
    import torch

    from longshort.config import TinyModelConfig
    from models.factory import build_tiny_model
    from models.generation import VLLMBackend

    folder = tmp_path / "model"  # head size 64: every vLLM attention backend takes it
    tiny = TinyModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    build_tiny_model(tiny, bos_tokenizer).save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    cfg = GenerationConfig(backend="vllm", gpu_memory_utilization=0.3)
    backend = VLLMBackend(str(folder), ModelConfig(), cfg, max_model_len=512)
    prompt = backend.chat_prompt("s", "Start with 3.")
    outs = backend.generate([prompt] * 4, max_new_tokens=16, temperature=1.0, seed=3)
    assert len({c.token_ids for (c,) in outs}) > 1  # identical prompts, different samples
    assert backend.generate([prompt] * 4, max_new_tokens=16, temperature=1.0, seed=3) == outs  # reproducible
    for (c,) in outs:
        assert c.n_tokens == len(c.token_ids) <= 16
    (ids,) = prompt_token_ids(bos_tokenizer, [prompt])
    assert ids[1] != bos_tokenizer.bos_token_id
    (raw,) = backend.llm.generate([{"prompt_token_ids": ids}], use_tqdm=False)
    assert list(raw.prompt_token_ids) == ids  # the engine runs exactly these ids: one BOS
    free_before = torch.cuda.mem_get_info()[0]
    backend.close()
    assert torch.cuda.mem_get_info()[0] > free_before


class _RecordingLLM:
    """Stands in for ``vllm.LLM`` (not installed here) with the parts ``VLLMBackend`` calls, as vllm 0.31 has them:
    ``reset_prefix_cache`` returns False when a KV block is still held (v1/core/block_pool.py)."""

    made: list[dict] = []
    reset_ok = True

    def __init__(self, **kwargs):
        self.made.append(kwargs)
        self.calls: list[tuple] = []

    def get_tokenizer(self):
        return None

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return self.reset_ok


def test_engine_seed_fits_numpy_and_a_weight_load_without_a_cache_reset_fails(monkeypatch, tmp_path):
    """The engine's workers seed NumPy with ``LLM(seed=...)``, which refuses a negative seed or one ≥ 2**32; the
    engine process is spawned; and a weight load whose prefix cache was not reset would serve KV blocks computed
    with the old weights."""
    import os
    import sys
    import types

    from models.generation import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_RecordingLLM))
    monkeypatch.setattr(_RecordingLLM, "made", [])
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    cfg = GenerationConfig(backend="vllm")
    for seed, engine_seed in ((0, 0), (-1, 2**32 - 1), (2**32 + 5, 5)):
        VLLMBackend(str(tmp_path), ModelConfig(), cfg, seed=seed)
        assert _RecordingLLM.made[-1]["seed"] == engine_seed
    # a forked engine process cannot use CUDA once torch.cuda.is_available() has run here: spawned, unless set
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    backend = VLLMBackend(str(tmp_path), ModelConfig(), cfg, weight_updates=True)
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
    backend.load_weights(tmp_path / "w.safetensors")
    assert backend.llm.calls == [("load_weights_file", (str(tmp_path / "w.safetensors"),)), ("reset_prefix_cache",)]
    monkeypatch.setattr(_RecordingLLM, "reset_ok", False)
    with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
        backend.load_weights(tmp_path / "w.safetensors")
