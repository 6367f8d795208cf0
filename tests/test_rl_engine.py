"""RL rollouts on vLLM: what the trainer hands its engines, tested without vLLM; the engines themselves where CUDA is.

On a GPU profile each model of the pair samples from a vLLM engine, and after every update
the trained model's weights go to its engine (``tasks.rl._Pair.sync_engine``): the trainer
writes them in checkpoint names (``models.generation.engine_weights``, LoRA folded in out of
place) and each engine worker loads them with its model's own ``load_weights``
(``EngineWeightsLoader``). Here: the names and values are those of the checkpoint the engine
would load, the training model is untouched, the worker method hands every tensor over, the
engines' context is what an episode can reach, and a CPU machine asking for vLLM gets a
config error before any model loads. The last tests run real engines where CUDA and vLLM are.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from longshort.config import ConfigError, GenerationConfig, LoraConfig, ModelConfig, ProtocolConfig, RLConfig
from models.factory import load_model
from models.generation import (
    ENGINE_WEIGHTS_EXTENSION,
    EngineWeightsLoader,
    TransformersBackend,
    engine_weights,
    prompt_token_ids,
    save_engine_weights,
    vllm_available,
)
from models.protocol import SYSTEM_PROMPTS
from tasks.rl import _TURN_MARGIN, _Pair, engine_context, rollout_context_tokens, train_pair_rl
from tasks.sft import peft_lora


def _checkpoint_tensors(model, folder: Path) -> dict[str, torch.Tensor]:
    """What ``save_pretrained`` writes: the names and tensors vLLM loads when an engine starts."""
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def test_a_plain_models_engine_weights_are_its_checkpoint(tiny_model, tmp_path):
    expected = _checkpoint_tensors(tiny_model, tmp_path / "ckpt")
    got = dict(engine_weights(tiny_model))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_is_folded_in_out_of_place_under_checkpoint_names(tiny_model, tmp_path, dtype):
    from peft import get_peft_model

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    wrapped = get_peft_model(tiny_model.to(dtype), peft_lora(lora))
    for name, p in wrapped.named_parameters():
        if "lora_" in name:  # adapters in fp32, as tasks.rl trains them; B != 0 so the delta is not zero
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5
    model = wrapped.get_base_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    got = dict(engine_weights(model))

    merged = copy.deepcopy(wrapped).merge_and_unload()
    expected = _checkpoint_tensors(merged, tmp_path / "merged")
    assert set(got) == set(expected)  # no lora_A/lora_B, no ".base_layer"
    adapted = [n for n in got if any(f".{m}." in n for m in lora.target_modules)]
    assert adapted and all(got[n].dtype == dtype for n in got)
    for name in adapted:  # the adapted weights moved, to W + B·A·scaling, computed in fp32 and rounded once
        layer = model.get_submodule(name.removesuffix(".weight"))
        w = layer.base_layer.weight.detach()
        want = (w.float() + layer.get_delta_weight("default").float()).to(dtype)
        assert torch.equal(got[name], want), name
        assert not torch.equal(got[name], w), name
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    for name in set(got) - set(adapted):
        assert torch.equal(got[name], expected[name]), name
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n].detach(), t) for n, t in before.items())  # the training model is untouched
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_engine_weights_file_is_written_atomically_and_round_trips(tiny_model, tmp_path):
    path = save_engine_weights(tiny_model, tmp_path / "w" / "long.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["long.safetensors"]  # no temporary left behind
    loaded = load_file(str(path))
    for name, tensor in engine_weights(tiny_model):
        assert torch.equal(loaded[name], tensor), name


class _VllmLikeModel(torch.nn.Module):
    """vLLM's model contract as EngineWeightsLoader uses it: ``load_weights(weights=iterable of (name, tensor))``."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def load_weights(self, weights):
        state = dict(weights)
        missing, unexpected = self.hf.load_state_dict(state, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing)  # a tied head is not in a checkpoint
        return set(state)


@pytest.mark.parametrize("runner_kind", ["get_model", "model attribute"])
def test_worker_extension_loads_every_tensor_of_the_file(demo_tokenizer, tmp_path, runner_kind):
    from longshort.config import TinyModelConfig
    from models.factory import build_tiny_model

    assert ENGINE_WEIGHTS_EXTENSION == f"{EngineWeightsLoader.__module__}.{EngineWeightsLoader.__qualname__}"
    torch.manual_seed(99)  # two models with their own weights
    tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2)  # fmt: skip
    target, source = build_tiny_model(tiny, demo_tokenizer), build_tiny_model(tiny, demo_tokenizer)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    served = _VllmLikeModel(target)
    runner = SimpleNamespace(get_model=lambda: served) if runner_kind == "get_model" else SimpleNamespace(model=served)
    worker = EngineWeightsLoader()
    worker.model_runner = runner
    path = save_engine_weights(source, tmp_path / "short.safetensors")

    n = worker.load_weights_file(str(path))

    assert n == len(load_file(str(path)))
    for (name, got), (_, want) in zip(target.named_parameters(), source.named_parameters()):
        assert torch.equal(got, want), name


def test_rollout_context_is_the_longest_prompt_plus_every_turn_at_its_cap(demo_tokenizer, demo_rows_small):
    train, _ = demo_rows_small
    problems = [{"problem": r["problem"], "answer": r["answer"]} for r in train[:20]]
    protocol = ProtocolConfig(max_turns=4, max_new_tokens_long=100, max_new_tokens_short=30)
    prompts = [
        demo_tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPTS[role]},
                                            {"role": "user", "content": p["problem"]}],
                                           tokenize=False, add_generation_prompt=True)  # fmt: skip
        for p in problems
        for role in ("long", "short")
    ]
    longest = max(len(ids) for ids in prompt_token_ids(demo_tokenizer, prompts))
    assert rollout_context_tokens(problems, demo_tokenizer, RLConfig(), protocol) == longest + 4 * (100 + _TURN_MARGIN)
    capped = RLConfig(length_target=50, cap_rollout_at_length_target=True)  # L_R = L_T: the turns together
    assert rollout_context_tokens(problems, demo_tokenizer, capped, protocol) == longest + 50 + 4 * _TURN_MARGIN
    loose = RLConfig(length_target=1000, cap_rollout_at_length_target=True)  # the turn caps bind first
    assert rollout_context_tokens(problems, demo_tokenizer, loose, protocol) == longest + 4 * (100 + _TURN_MARGIN)


@pytest.mark.skipif(vllm_available(), reason="checks the error on a machine without CUDA or vLLM")
def test_asking_for_vllm_rollouts_without_cuda_is_a_config_error_before_loading(tmp_path):
    problems = [{"problem": "Start with 1. Then (1) add 1. What is the final number?", "answer": "2"}]
    missing = tmp_path / "no-model-here"  # never read: the error comes first
    with pytest.raises(ConfigError, match="generation.backend"):
        train_pair_rl(missing, missing, problems, RLConfig(), tmp_path / "rl", generation=GenerationConfig(backend="vllm"))
    assert not (tmp_path / "rl").exists()



def test_an_rl_engine_reserves_the_context_its_episodes_reach_not_the_profiles_evaluation_length():
    """The real profiles set generation.max_model_len 32768 for evaluation's 8k-token turns; RL episodes capped at
    L_R = 4096 reach ~4.6k, and an engine reserves KV cache for one whole max_model_len at start (4 GiB for
    Llama-3.1-8B's 32k, out of an engine's 0.3 share of the GPU). A shorter profile limit still wins."""
    assert engine_context(4_600, 32_768, 131_072) == 4_600
    assert engine_context(4_600, 2_048, 131_072) == 2_048  # the user's cap
    assert engine_context(4_600, None, 131_072) == 4_600
    assert engine_context(4_600, None, 4_096) is None  # the model's own context is the limit anyway
    assert engine_context(4_600, None, None) == 4_600



def test_with_engines_a_full_weight_reference_model_follows_its_model_to_the_accelerator_and_back(
    tiny_model, demo_tokenizer
):
    """With kl_coef > 0 and no LoRA, each model has a reference copy of its weights. With vLLM engines only the
    trained model sits on the accelerator; its reference must too (the KL term runs them side by side), and the
    partner's reference must not (it was left there: 2 x 15 GB of a 7B pair next to the engines). The meta
    device stands in for the accelerator of a machine without one."""
    import copy

    models = {"long": tiny_model, "short": copy.deepcopy(tiny_model)}
    refs = {r: copy.deepcopy(m) for r, m in models.items()}
    optimizers = {r: torch.optim.AdamW(m.parameters()) for r, m in models.items()}
    meta = torch.device("meta")
    pair = _Pair(models=models, tokenizers={r: demo_tokenizer for r in models}, engine_weights_dir=Path("unused"),
                 devices={"long": meta, "short": meta}, refs=refs)  # fmt: skip

    pair.place("long", optimizers)

    def device(module) -> str:
        return next(module.parameters()).device.type

    assert (device(models["long"]), device(refs["long"])) == ("meta", "meta")
    assert (device(models["short"]), device(refs["short"])) == ("cpu", "cpu")


# --------------------------------------------------------------------------- the RL loop with engines


class _CopyEngine(TransformersBackend):
    """Stands in for a vLLM engine on a machine without one: its own copy of the model, started from the
    same path, generating with the transformers backend, and taking new weights through
    ``EngineWeightsLoader`` as a vLLM worker does. If the trainer forgot to send weights, sent the
    wrong role's, or sent them late, its samples would drift from the models' own."""

    made: list[_CopyEngine] = []

    def __init__(self, model_path, model_cfg, gen_cfg, seed=0, *, tensor_parallel_size=1, max_model_len=None,
                 weight_updates=False, sample_logprobs=False):  # fmt: skip
        model, tokenizer = load_model(model_cfg, path=model_path)
        super().__init__(model, tokenizer)
        self.args = {"path": str(model_path), "gpu_memory_utilization": gen_cfg.gpu_memory_utilization,
                     "max_model_len": max_model_len, "weight_updates": weight_updates}  # fmt: skip
        self.loads: list[str] = []
        self.closed = False
        _CopyEngine.made.append(self)

    def load_weights(self, path) -> None:
        worker = EngineWeightsLoader()
        worker.model_runner = SimpleNamespace(model=_VllmLikeModel(self.model))
        worker.load_weights_file(str(path))
        self.loads.append(Path(path).name)

    def close(self) -> None:
        self.closed = True


def copy_engines(monkeypatch) -> list[_CopyEngine]:
    """From here on, RL "finds" vLLM and its engines are :class:`_CopyEngine`; the list fills as they start."""
    import models.generation
    import tasks.rl

    _CopyEngine.made = []
    monkeypatch.setattr(models.generation, "VLLMBackend", _CopyEngine)
    monkeypatch.setattr(tasks.rl, "resolve_backend", lambda gen: "vllm")  # as on a CUDA machine with vLLM
    return _CopyEngine.made


ENGINE_CFG = RLConfig(rounds=1, steps_per_round=2, prompts_per_step=2, group_size=4, learning_rate=3e-2,
                      efficiency="kimi", format_weight=0.5, checkpoint_every=1, keep_checkpoints=4, temperature=1.0,
                      seed=3, vllm_gpu_memory_utilization=0.35)  # fmt: skip
ENGINE_PROTOCOL = ProtocolConfig(max_turns=2, max_new_tokens_long=16, max_new_tokens_short=16)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_engines_that_follow_training_sample_exactly_what_the_models_would(
    protocol_pair, demo_rows_small, tmp_path, monkeypatch
):
    train, _ = demo_rows_small
    problems = [{"problem": r["problem"], "answer": r["answer"]} for r in train[:8]]
    plain = train_pair_rl(protocol_pair, protocol_pair, problems, ENGINE_CFG, tmp_path / "plain",
                          protocol=ENGINE_PROTOCOL)  # fmt: skip

    made = copy_engines(monkeypatch)
    served = train_pair_rl(protocol_pair, protocol_pair, problems, ENGINE_CFG, tmp_path / "engines",
                           protocol=ENGINE_PROTOCOL, generation=GenerationConfig(backend="vllm"))  # fmt: skip

    assert served.history == plain.history  # every rollout sampled from the current policy: step for step the same
    long_engine, short_engine = made
    assert long_engine.loads == ["long.safetensors"] * 2 and short_engine.loads == ["short.safetensors"] * 2
    for engine, role in ((long_engine, "long"), (short_engine, "short")):
        assert engine.closed and engine.args["weight_updates"] and engine.args["path"] == str(protocol_pair)
        assert engine.args["gpu_memory_utilization"] == 0.35
        trained, _ = load_model(ModelConfig(), path=tmp_path / "engines" / role)
        assert all(torch.equal(a, b) for a, b in zip(_weights(engine.model).values(), _weights(trained).values()))
    context = rollout_context_tokens(problems, long_engine.tokenizer, ENGINE_CFG, ENGINE_PROTOCOL)
    assert long_engine.args["max_model_len"] == context  # below the model's context: reserve only what episodes use
    assert not list((tmp_path / "engines" / ".engine-weights").iterdir())  # each file removed once loaded


def test_an_engine_that_started_is_shut_down_when_the_next_one_fails_to(protocol_pair, demo_rows_small, tmp_path,
                                                                       monkeypatch):
    """A pipeline worker lives on after a failed stage: the long model's engine must not keep its GPU memory
    when the short model's engine cannot start (out of memory, a bad path)."""
    train, _ = demo_rows_small
    problems = [{"problem": r["problem"], "answer": r["answer"]} for r in train[:8]]
    made = copy_engines(monkeypatch)

    class NoRoom(_CopyEngine):
        def __init__(self, *args, **kwargs):
            if made:  # the second engine
                raise RuntimeError("No available memory for the cache blocks")
            super().__init__(*args, **kwargs)

    import models.generation

    monkeypatch.setattr(models.generation, "VLLMBackend", NoRoom)
    with pytest.raises(RuntimeError, match="cache blocks"):
        train_pair_rl(protocol_pair, protocol_pair, problems, ENGINE_CFG, tmp_path, protocol=ENGINE_PROTOCOL,
                      generation=GenerationConfig(backend="vllm"))  # fmt: skip
    assert len(made) == 1 and made[0].closed


def test_a_resumed_lora_run_gives_the_engines_the_checkpoints_adapters_first(
    protocol_pair, demo_rows_small, tmp_path, monkeypatch
):
    train, _ = demo_rows_small
    problems = [{"problem": r["problem"], "answer": r["answer"]} for r in train[:8]]
    cfg = ENGINE_CFG.model_copy(update={"lora": LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])})
    made = copy_engines(monkeypatch)

    class Killed(Exception):
        pass

    def kill(metrics):
        raise Killed

    with pytest.raises(Killed):
        train_pair_rl(protocol_pair, protocol_pair, problems, cfg, tmp_path, on_step=kill, protocol=ENGINE_PROTOCOL,
                      generation=GenerationConfig(backend="vllm"))  # fmt: skip
    assert all(e.closed for e in made)  # engines are shut down when the run dies too
    made.clear()
    result = train_pair_rl(protocol_pair, protocol_pair, problems, cfg, tmp_path, protocol=ENGINE_PROTOCOL,
                           generation=GenerationConfig(backend="vllm"))  # fmt: skip
    assert result.resumed_from_step == 1
    long_engine, short_engine = made
    # both engines started from the SFT weights and took the checkpoint's merged adapters before step 2;
    # then one load per update: step 2 trains long, steps 3 and 4 short
    assert long_engine.loads == ["long.safetensors"] * 2 and short_engine.loads == ["short.safetensors"] * 3
    for engine, role in ((long_engine, "long"), (short_engine, "short")):
        trained, _ = load_model(ModelConfig(), path=tmp_path / role)
        for (name, a), b in zip(_weights(engine.model).items(), _weights(trained).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- real engines


def _save_tiny(folder: Path, tokenizer, seed: int):
    from longshort.config import TinyModelConfig
    from models.factory import build_tiny_model

    torch.manual_seed(seed)  # head size 64: every vLLM attention backend takes it
    tiny = TinyModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = build_tiny_model(tiny, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="needs CUDA and the vllm package")
def test_an_engine_serves_the_weights_it_is_given(tmp_path, demo_tokenizer):
    from longshort.config import ModelConfig
    from models.generation import VLLMBackend

    _save_tiny(tmp_path / "a", demo_tokenizer, seed=1)
    model_b = _save_tiny(tmp_path / "b", demo_tokenizer, seed=2)
    cfg = GenerationConfig(backend="vllm", gpu_memory_utilization=0.2)
    engine = VLLMBackend(str(tmp_path / "a"), ModelConfig(), cfg, max_model_len=512, weight_updates=True)
    reference = VLLMBackend(str(tmp_path / "b"), ModelConfig(), cfg, max_model_len=512)
    prompts = [engine.chat_prompt("s", f"Start with {k}.") for k in range(4)]
    before = engine.generate(prompts, max_new_tokens=24)
    want = reference.generate(prompts, max_new_tokens=24)
    assert before != want  # two random models disagree

    engine.load_weights(save_engine_weights(model_b, tmp_path / "b.safetensors"))

    assert engine.generate(prompts, max_new_tokens=24) == want  # greedy: B's own engine's tokens, prefix cache reset
    engine.close()
    reference.close()


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="needs CUDA and the vllm package")
def test_rl_on_vllm_engines_runs_both_phases_and_cleans_up(demo_tokenizer, demo_rows_small, tmp_path):
    _save_tiny(tmp_path / "pair", demo_tokenizer, seed=3)  # random weights: rewards 0, but every turn is trained
    train, _ = demo_rows_small
    problems = [{"problem": r["problem"], "answer": r["answer"]} for r in train[:8]]
    cfg = RLConfig(rounds=1, steps_per_round=1, prompts_per_step=2, group_size=4, learning_rate=3e-2,
                   efficiency="kimi", temperature=1.0, checkpoint_every=1, vllm_gpu_memory_utilization=0.2)  # fmt: skip
    protocol = ProtocolConfig(max_turns=2, max_new_tokens_long=16, max_new_tokens_short=16)
    pair = tmp_path / "pair"
    result = train_pair_rl(pair, pair, problems, cfg, tmp_path / "rl", protocol=protocol,
                           generation=GenerationConfig(backend="vllm"))  # fmt: skip
    assert [h["role"] for h in result.history] == ["long", "short"]
    assert all(h["trained_tokens"] > 0 for h in result.history)
    # the engines report each sampled token's log-prob: the ratio to the trainer's is near 1 (fp16 engine vs fp32)
    assert all(0.5 < h["is_ratio"] < 2 for h in result.history)
    assert not list((tmp_path / "rl" / ".engine-weights").glob("*.safetensors"))  # each file removed once loaded
