"""The truncation-recipe baseline: its reward by hand, the easy-prompt filter and a real GRPO run (TRL)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_prompt, fit_completions
from longshort.config import BaselineConfig, ConfigError, ModelConfig
from models.factory import load_model
from models.generation import TransformersBackend, cut_at_stop
from models.protocol import format_response
from tasks.evaluate import response_answer
from tasks.baseline import (
    close_colocated_vllm,
    easy_problems,
    keep_easy,
    make_truncation_reward,
    response_correct,
    train_truncation_baseline,
)

EOS = 2


@pytest.fixture(scope="module")
def base_format_tiny(trained_tiny, demo_rows_small, tmp_path_factory) -> str:
    """``trained_tiny`` after half a second of next-token fitting on 4 problems' short base-format answers.

    ``trained_tiny`` writes protocol-shaped text but never a right answer, so every GRPO reward would be
    0 and training a no-op. Fitted on ``train[:4]`` it solves those problems some of the time at T=0.7,
    so groups mix rewards 0 and 1 and the advantages are not all zero.
    """
    train, _ = demo_rows_small

    def examples(tok):
        return [
            (chat_prompt(tok, "base", row["problem"]), format_response(f"Answer {row['answer']}.", f"\\boxed{{{row['answer']}}}"))
            for row in train[:4]
        ]

    out, nll = fit_completions(trained_tiny, examples, 40, tmp_path_factory.mktemp("base-format-tiny"))
    assert nll < 0.3
    return out


def test_truncation_reward_is_one_only_for_correct_answers_within_the_target():
    reward = make_truncation_reward(length_target=5, eos_token_id=EOS)
    right, wrong = format_response("3 + 4 = 7", "\\boxed{7}"), format_response("3 + 4 = 8", "\\boxed{8}")
    completions = [right, right, right, wrong, "<think>\nno answer"]
    ids = [
        [9, 9, 9, 9, 9],  # 5 tokens: at the target
        [9, 9, 9, 9, 9, EOS],  # 5 tokens and the end-of-sequence token, which is not counted
        [9, 9, 9, 9, 9, 9],  # 6 tokens: over
        [9, 9],  # short but wrong
        [9],  # malformed
    ]
    got = reward(completions=completions, completion_ids=ids, answer=["7"] * 5, trainer_state=None)
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]
    # TRL's conversational form: the completion is a list of messages
    assert reward(completions=[[{"role": "assistant", "content": right}]], completion_ids=[[9]], answer=["7"]) == [1.0]


def test_truncation_reward_counts_the_stop_token_as_the_evaluation_does(demo_tokenizer):
    """The demo tokenizer's </answer> is one token: a rollout that stops on it is counted with it, as the
    evaluation's ``n_tokens`` (the stop string included) counts it; only the end-of-sequence token is free."""
    tok = demo_tokenizer
    text = format_response("3 + 4 = 7", "The final number is \\boxed{7}.")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("</answer>")
    n = TransformersBackend.count_tokens(SimpleNamespace(tokenizer=tok), text)
    assert n == len(ids)
    at, under = make_truncation_reward(n, tok.eos_token_id), make_truncation_reward(n - 1, tok.eos_token_id)
    for completion_ids in (ids, [*ids, tok.eos_token_id]):
        assert at(completions=[text], completion_ids=[completion_ids], answer=["7"]) == [1.0]
        assert under(completions=[text], completion_ids=[completion_ids], answer=["7"]) == [0.0]


def test_truncation_reward_reads_the_text_up_to_the_stop():
    """The token that completes a multi-token ``</answer>`` can carry more text (Qwen2.5 has ``>.``, ``>,``);
    the evaluation's backends cut the text at the stop, so the reward does too."""
    reward = make_truncation_reward(length_target=8, eos_token_id=EOS)
    right = format_response("3 + 4 = 7", "\\boxed{7}")
    texts = [right + ".", right + ",\nmore", right, right.replace("</answer>", "")]
    assert reward(completions=texts, completion_ids=[[9] * 8] * 4, answer=["7"] * 4) == [1.0, 1.0, 1.0, 0.0]


def test_response_correct_needs_a_well_formed_response():
    assert response_correct(format_response("x", "The final number is \\boxed{12}."), "12")
    assert not response_correct("<think>\nx\n</think>\n<answer>\\boxed{12}", "12")  # no </answer>
    assert not response_correct(format_response("x", "\\boxed{13}"), "12")


def test_keep_easy_keeps_pass_rates_strictly_above_half():
    problems = [{"id": i} for i in "abcd"]
    draws = {"a": [1, 1, 1, 0], "b": [1, 1, 0, 0], "c": [0, 0, 0, 0], "d": [1, 1, 1, 1]}
    records = [{"problem_id": pid, "correct": bool(c)} for pid, cs in draws.items() for c in cs]
    kept, rates = keep_easy(problems, records)
    assert [p["id"] for p in kept] == ["a", "d"]
    assert rates == {"a": 0.75, "b": 0.5, "c": 0.0, "d": 1.0}


def test_easy_problems_samples_the_model_for_each_problem(trained_tiny, demo_rows_small):
    model, tok = load_model(ModelConfig(), path=trained_tiny)
    backend = TransformersBackend(model, tok)
    train, _ = demo_rows_small
    impossible = [{"id": r["id"], "problem": r["problem"], "answer": "-999"} for r in train[:3]]
    kept, rates = easy_problems(backend, impossible, samples=2, temperature=1.0, max_new_tokens=32)
    assert kept == [] and rates == {p["id"]: 0.0 for p in impossible}


def test_easy_problems_keeps_those_solved_more_than_half_the_time(tiny_model, demo_tokenizer, demo_rows_small):
    """`samples` draws per problem at the filter's temperature; a problem is kept when its pass rate is > 0.5 (the
    real backend samples, then each problem's draws are replaced by answers right 2, 1 and 0 times of 2)."""
    from dataclasses import replace

    from models.protocol import format_response

    train, _ = demo_rows_small
    problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in train[:3]]
    backend, calls = TransformersBackend(tiny_model, demo_tokenizer, device="cpu"), []
    real_generate = backend.generate

    def generate(prompts, **kwargs):
        calls.append(kwargs)
        outs = real_generate(prompts, **kwargs)
        right = {0: 2, 1: 1, 2: 0}
        return [
            [replace(c, text=format_response("x", f"\\boxed{{{p['answer'] if j < right[i] else '-999'}}}")) for j, c in enumerate(out)]
            for i, (p, out) in enumerate(zip(problems, outs, strict=True))
        ]  # fmt: skip

    backend.generate = generate
    kept, rates = easy_problems(backend, problems, samples=2, temperature=1.0, max_new_tokens=8, seed=3)
    assert rates == {problems[0]["id"]: 1.0, problems[1]["id"]: 0.5, problems[2]["id"]: 0.0}
    assert kept == problems[:1]  # 0.5 is not more than half
    (call,) = calls
    assert call["n"] == 2 and call["temperature"] == 1.0 and call["max_new_tokens"] == 8 and call["seed"] == 3


def test_grpo_run_saves_a_model_and_logs_each_step(base_format_tiny, demo_rows_small, tmp_path: Path):
    model, tok = load_model(ModelConfig(), path=base_format_tiny)
    # a model with two end ids (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>, its pad): both stay in what is saved
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, _ = demo_rows_small
    problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in train[:4]]
    cfg = BaselineConfig(steps=2, prompts_per_step=2, group_size=4, learning_rate=1e-3, length_target=64,
                         temperature=0.7, checkpoint_every=1)  # fmt: skip
    steps: list[dict] = []
    result = train_truncation_baseline(model, tok, problems, cfg, tmp_path, on_step=steps.append)
    assert result.steps == 2 and [h["step"] for h in result.history] == [1, 2] == [s["step"] for s in steps]
    for row in result.history:
        assert 0.0 <= row["reward"] <= 1.0
        assert 0 < row["completions/mean_length"] <= cfg.length_target  # L_R = L_T caps every rollout
    # some rollouts were right and some wrong, so the advantages and the gradient were not all zero ...
    assert any(0.0 < h["reward"] < 1.0 and h["reward_std"] > 0 and h["grad_norm"] > 0 for h in result.history)
    saved = load_file(str(Path(result.model_dir) / "model.safetensors"))
    assert saved.keys() <= before.keys()
    # ... and the optimizer moved the weights that were saved
    changed = [k for k in saved if not torch.equal(saved[k], before[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) > len(saved) // 2
    assert (Path(result.model_dir) / "tokenizer.json").is_file()
    saved_config = json.loads((Path(result.model_dir) / "generation_config.json").read_text())
    answer_close = tok.convert_tokens_to_ids("</answer>")
    assert saved_config["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id, answer_close]
    assert not (tmp_path / "checkpoints").exists()  # removed once the model is saved
    json.dumps(result.history)  # JSON-able, as history.jsonl stores it


def test_rollouts_stop_at_a_multi_token_stop_and_end_right_after_it(
    base_format_tiny, demo_rows_small, tmp_path: Path, monkeypatch
):
    """With a tokenizer that splits the response's last tag (Qwen2.5 and Llama-3.1 split ``</answer>``), TRL's
    ``model.generate`` stopped at end ids only: a rollout went on past its answer, and the text after it made a
    correct response malformed (reward 0). The demo tokenizer's tags are single tokens, so the stop here is
    ``}</answer>``, two of them: generation stops there (the row is padded, no end token sampled) and the
    completion the reward scores ends with it."""
    import tasks.baseline as baseline

    stop = "}</answer>"
    model, tok = load_model(ModelConfig(), path=base_format_tiny)
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) == 2
    monkeypatch.setattr(baseline, "STOP_STRINGS", {"base": (stop,)})

    rows_out: list[list[int]] = []
    generate = type(model).generate

    def recording_generate(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        rows_out.extend(out[:, kwargs["input_ids"].shape[1] :].tolist())
        return out

    monkeypatch.setattr(type(model), "generate", recording_generate)
    scored: list[tuple[str, list[int]]] = []
    make_reward = baseline.make_truncation_reward

    def recording_reward(*args, **kwargs):
        reward = make_reward(*args, **kwargs)

        @functools.wraps(reward)
        def truncation(completions, completion_ids, **rest):
            scored.extend((c[-1]["content"], ids) for c, ids in zip(completions, completion_ids))
            return reward(completions=completions, completion_ids=completion_ids, **rest)

        return truncation

    monkeypatch.setattr(baseline, "make_truncation_reward", recording_reward)
    train, _ = demo_rows_small
    problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in train[:4]]
    cfg = BaselineConfig(steps=1, prompts_per_step=2, group_size=4, learning_rate=1e-3, length_target=64,
                         temperature=0.7, checkpoint_every=1)  # fmt: skip
    result = train_truncation_baseline(model, tok, problems, cfg, tmp_path)
    assert result.steps == 1 and len(rows_out) == len(scored) == 8
    stopped = 0
    for raw, (text, ids) in zip(rows_out, scored):
        cut = cut_at_stop(tok, raw, [stop])
        if cut is None:  # ended by the end token or at L_R: as before
            assert ids == raw[: len(ids)] and stop not in text
            continue
        stopped += 1
        n = cut[1]
        assert raw[n:] == [tok.pad_token_id] * (len(raw) - n)  # stopped there, not at an end token
        assert ids == raw[:n] and text.endswith("</answer>")  # the reward scored up to the stop
        assert response_answer(text)[1]  # well formed
    assert stopped >= 4
    # the batch ended when its last row stopped, short of L_R
    assert len(rows_out[0]) < cfg.length_target


def test_a_rerun_after_the_baseline_finished_returns_its_result_without_training(
    base_format_tiny, demo_rows_small, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A kill after ``train_truncation_baseline`` returned and before the stage saved its record leaves the model
    and ``baseline_result.json`` but no checkpoints: the rerun returns the first run's result, trains no step."""
    train, _ = demo_rows_small
    problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in train[:4]]
    cfg = BaselineConfig(steps=2, prompts_per_step=2, group_size=4, learning_rate=1e-3, length_target=64,
                         temperature=0.7, checkpoint_every=1)  # fmt: skip
    model, tok = load_model(ModelConfig(), path=base_format_tiny)
    first = train_truncation_baseline(model, tok, problems, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline_result.json", "model"]
    weights = Path(first.model_dir) / "model.safetensors"
    saved = (weights.stat().st_mtime_ns, weights.read_bytes())

    model, tok = load_model(ModelConfig(), path=base_format_tiny)
    steps: list[dict] = []
    with caplog.at_level("INFO", logger="tasks.sft"):  # tasks.sft.finished_run says it
        again = train_truncation_baseline(model, tok, problems, cfg, tmp_path, on_step=steps.append)

    assert again == first and again.steps == 2 and len(again.history) == 2
    assert steps == []  # no GRPO step ran
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == saved  # the model was not saved again
    assert not (tmp_path / "checkpoints").exists()
    assert "reusing the finished baseline run" in caplog.text

    # Other settings in the same folder (a bench's --workdir): trained, not the stored result.
    model, tok = load_model(ModelConfig(), path=base_format_tiny)
    other = train_truncation_baseline(model, tok, problems, cfg.model_copy(update={"steps": 1}), tmp_path)
    assert other.steps == 1 and len(other.history) == 1
    assert "was written from other inputs" in caplog.text


def test_no_problem_left_is_a_clear_error(trained_tiny, tmp_path: Path):
    model, tok = load_model(ModelConfig(), path=trained_tiny)
    with pytest.raises(ConfigError, match=r"baseline.prompts_per_step: 0 training problems left, fewer than 8"):
        train_truncation_baseline(model, tok, [], BaselineConfig(), tmp_path)


def test_the_easy_filter_is_drawn_once_per_stage_folder(tmp_path):
    """A baseline run killed after its filter resumes on the problems it trained on: the rates are kept in the
    folder and reused for the same problems (drawn again on vLLM, a rate near one half could flip)."""
    from tasks.baseline import EASY_FILTER_FILE, easy_problems_once

    problems = [{"id": str(i), "problem": f"p{i}", "answer": "1"} for i in range(4)]
    draws: list[list[str]] = []

    def draw(todo):  # problems 0 and 2 are easy at the first draw only
        draws.append([p["id"] for p in todo])
        rates = {p["id"]: (0.75 if len(draws) == 1 else 0.25) if p["id"] in ("0", "2") else 0.0 for p in todo}
        return [p for p in todo if rates[p["id"]] > 0.5], rates

    easy, rates, reused = easy_problems_once(tmp_path, problems, draw)
    assert [p["id"] for p in easy] == ["0", "2"] and not reused and (tmp_path / EASY_FILTER_FILE).is_file()
    again, same_rates, reused = easy_problems_once(tmp_path, problems, draw)  # the second draw would say 0.25
    assert again == easy and same_rates == rates and reused and len(draws) == 1
    fewer, _, reused = easy_problems_once(tmp_path, problems[:3], draw)  # other problems: drawn again
    assert not reused and draws[-1] == ["0", "1", "2"] and fewer == []


def test_the_colocated_vllm_engine_is_shut_down_and_the_environment_it_changed_put_back(monkeypatch):
    """TRL leaves its colocated engine running, in this process, with vLLM's in-process mode and rank variables set
    process-wide. The engine here stands in for vLLM 0.31's LLM (not installed on CPU machines): LLM and LLMEngine
    have no shutdown there, the in-process engine-core client has (``shutdown_vllm`` finds it)."""
    import os

    shut: list[str] = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")  # set before the trainer (by a launcher): stays
    before = {name: os.environ.get(name) for name in ("RANK", "VLLM_ENABLE_V1_MULTIPROCESSING", "MASTER_PORT")}
    os.environ.update(RANK="0", VLLM_ENABLE_V1_MULTIPROCESSING="0", MASTER_PORT="41234")  # what the engine set
    core = SimpleNamespace(shutdown=lambda: shut.append("engine_core"))
    generation = SimpleNamespace(llm=SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core)))

    close_colocated_vllm(SimpleNamespace(vllm_generation=generation), before)

    assert shut == ["engine_core"] and generation.llm is None
    assert "RANK" not in os.environ and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert os.environ["MASTER_PORT"] == "29500"
    close_colocated_vllm(SimpleNamespace(vllm_generation=generation), before)  # again: nothing left to shut down
    close_colocated_vllm(SimpleNamespace(), {})  # a trainer without vLLM (this machine's)
    assert shut == ["engine_core"]
