import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.generation import TransformersBackend
from tasks.chunking import split_steps, thinking_of
from tasks.importance import (
    ScoreConfig,
    auroc,
    importance_scores,
    prefix_thinkings,
    rollout_correct,
    score_trace,
    score_traces,
)


def test_importance_on_hand_made_numbers():
    acc, ctx = [0.0, 0.5, 1.0, 1.0], [0, 10, 30, 60]
    s = importance_scores(acc, ctx, L_delta=100.0)
    d = [math.exp(-c / 100) for c in ctx]
    assert s == pytest.approx([0.5 * d[1], d[2] - 0.5 * d[1], d[3] - d[2]])
    assert s[0] == pytest.approx(0.5 * math.exp(-0.1)) and s[2] < 0  # a thought that adds nothing pays its tokens
    assert sum(s) == pytest.approx(acc[-1] * d[-1] - acc[0])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(1, 400)), min_size=1, max_size=12),
    st.integers(0, 8),
    st.floats(1.0, 5000.0),
)
def test_importance_telescopes_and_is_bounded(steps, right_0, L_delta):
    acc = [right_0 / 8] + [r / 8 for r, _ in steps]
    ctx = [0]
    for _, dc in steps:
        ctx.append(ctx[-1] + dc)
    s = importance_scores(acc, ctx, L_delta)
    assert len(s) == len(steps)
    assert all(-1.0 <= x <= 1.0 for x in s)
    assert sum(s) == pytest.approx(acc[-1] * math.exp(-ctx[-1] / L_delta) - acc[0], abs=1e-9)


def test_importance_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="3 accuracies but 2 context"):
        importance_scores([0, 1, 1], [0, 5], 10.0)


def test_auroc_known_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    # one positive tied with one of two negatives, above the other: (1 + 0.5) / 2
    assert auroc([0.3, 0.7, 0.7], [False, False, True]) == 0.75
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [True, True])


def test_prefixes_join_thoughts_as_in_the_trace(demo_rows_small):
    row = demo_rows_small[0][0]
    thinking = thinking_of(row["response"])
    thoughts = split_steps(thinking)
    prefixes = prefix_thinkings(thoughts)
    assert prefixes[0] == "" and prefixes[-1] == thinking and len(prefixes) == len(thoughts) + 1
    assert all(thinking.startswith(p) and not p.endswith("\n") for p in prefixes)


def test_rollout_correct_needs_a_final_answer_turn():
    assert rollout_correct("<answer>The final number is \\boxed{12}.</answer>", "12")
    assert not rollout_correct("<answer>The final number is \\boxed{13}.</answer>", "12")
    assert not rollout_correct("<answer>The final number is \\boxed{12}.", "12")  # cut off
    assert not rollout_correct("<answer>\\boxed{12}</rethink>", "12")


def _prompts(backend, rows):
    # different lengths exercise left padding inside a batch
    return [backend.chat_prompt("s", r["problem"]) + r["response"][: 30 * i] for i, r in enumerate(rows)]


def test_shared_prefix_equals_naive_when_greedy(tiny_model, demo_tokenizer, demo_rows_small):
    backend = TransformersBackend(tiny_model, demo_tokenizer, batch_size=9, device="cpu")
    prompts = _prompts(backend, demo_rows_small[0][:5])
    out = {m: backend.generate(prompts, max_new_tokens=10, n=3, prefix=m) for m in ("shared", "copied", "separate")}
    texts = {m: [[c.text for c in cs] for cs in o] for m, o in out.items()}
    assert texts["shared"] == texts["separate"] == texts["copied"]
    assert all(len(cs) == 3 and c.n_tokens == 10 for cs in out["shared"] for c in cs)
    one = backend.generate(prompts[:1], max_new_tokens=10)[0][0]
    assert out["shared"][0][0].text == one.text


def test_shared_prefix_sampling_is_seeded(tiny_model, demo_tokenizer, demo_rows_small):
    backend = TransformersBackend(tiny_model, demo_tokenizer, batch_size=8, device="cpu")
    prompts = _prompts(backend, demo_rows_small[0][:3])
    a = backend.generate(prompts, max_new_tokens=8, temperature=1.0, n=4, seed=7)
    b = backend.generate(prompts, max_new_tokens=8, temperature=1.0, n=4, seed=7)
    c = backend.generate(prompts, max_new_tokens=8, temperature=1.0, n=4, seed=8)
    text = lambda out: [[x.text for x in cs] for cs in out]  # noqa: E731
    assert text(a) == text(b) and text(a) != text(c)
    assert all(len({x.text for x in cs}) > 1 for cs in a)  # the n samples differ from each other


def test_unknown_prefix_mode_is_refused(tiny_model, demo_tokenizer):
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    with pytest.raises(ValueError, match="prefix must be"):
        backend.generate(["x"], max_new_tokens=2, prefix="cached")


def _traces(rows):
    return [
        {"id": r["id"], "problem": r["problem"], "answer": r["answer"], "thoughts": split_steps(thinking_of(r["response"]))}
        for r in rows
    ]


def test_scoring_refuses_thought_records():
    row = {"id": "x", "problem": "p", "answer": "1", "thoughts": [{"text": "a", "essential": True}]}
    with pytest.raises(ValueError, match="'thoughts' must be a list of strings"):
        score_traces(None, [row], ScoreConfig())  # type: ignore[arg-type]


@pytest.mark.slow
def test_score_traces_on_demo_rows(trained_tiny, demo_rows_small):
    from longshort.config import GenerationConfig, ModelConfig
    from models.generation import make_backend

    backend = make_backend(trained_tiny, ModelConfig(), GenerationConfig(backend="transformers", batch_size=32))
    traces = _traces(demo_rows_small[1][:2])
    cfg = ScoreConfig(n_rollouts=3, max_new_tokens=16, shard_size=1, seed=1)
    scored = score_traces(backend, traces, cfg)
    assert [s.id for s in scored] == [t["id"] for t in traces]
    for s, t in zip(scored, traces):
        n = len(t["thoughts"])
        assert len(s.acc) == len(s.context_tokens) == len(s.rollout_tokens) == n + 1 and len(s.importance) == n
        assert all(a in (0.0, 1 / 3, 2 / 3, 1.0) for a in s.acc)
        assert s.context_tokens[0] == 0 and s.context_tokens == sorted(s.context_tokens)
        assert s.context_tokens[-1] == backend.count_tokens(thinking_of(demo_rows_small[1][traces.index(t)]["response"]))
        assert all(0 < x <= cfg.max_new_tokens for x in s.rollout_tokens)
        assert s.importance == pytest.approx(importance_scores(s.acc, s.context_tokens, cfg.L_delta))
        assert sum(s.importance) == pytest.approx(s.acc[-1] * math.exp(-s.context_tokens[-1] / cfg.L_delta) - s.acc[0])
    # seeded: the same call gives the same numbers; one trace alone is scored like in a shard of its own
    assert score_traces(backend, traces, cfg) == scored
    # trace 1 is alone in shard 1 (seed + 1): scored alone with that seed, it gets the same rollouts
    assert score_trace(backend, traces[1], cfg.model_copy(update={"seed": cfg.seed + 1})) == scored[1]
    # as the pipeline scores it: shard 1 on its own, told its index
    assert score_traces(backend, traces[1:], cfg, first_shard=1) == scored[1:]
    assert score_traces(backend, traces[1:], cfg) != scored[1:]  # shard 0's seed: other rollouts


def test_a_shard_whose_rollouts_are_cut_off_says_so(caplog):
    """A rollout cut off before its box counts as wrong: when many are, acc_k measures the cap, not the prefix."""
    from models.generation import Completion

    class Rambling:
        def chat_prompt(self, system, user):
            return user

        def count_tokens(self, text):
            return len(text.split())

        def generate(self, prompts, *, n=1, **kwargs):
            return [[Completion("Let me write it all out again", 8, "length")] * n for _ in prompts]

    trace = {"id": "t", "problem": "p", "answer": "1", "thoughts": ["a", "b"]}
    with caplog.at_level("WARNING", logger="tasks.importance"):
        (scored,) = score_traces(Rambling(), [trace], ScoreConfig(n_rollouts=2, max_new_tokens=8))
    assert scored.acc == [0.0, 0.0, 0.0]
    assert "6 of 6 rollouts of shard 0 hit score.max_new_tokens=8" in caplog.text and "score.answer_probe" in caplog.text


@pytest.mark.slow
def test_greedy_scores_do_not_depend_on_prefix_sharing(trained_tiny, demo_rows_small):
    from longshort.config import GenerationConfig, ModelConfig
    from models.generation import make_backend

    backend = make_backend(trained_tiny, ModelConfig(), GenerationConfig(backend="transformers", batch_size=16))
    traces = _traces(demo_rows_small[1][:1])
    cfg = ScoreConfig(n_rollouts=2, temperature=0.0, max_new_tokens=16)
    assert score_traces(backend, traces, cfg) == score_traces(backend, traces, cfg, prefix="separate")


class _KeyThought:
    """A scripted rollout model: a rollout is right exactly when its prefix holds the thought "KEY", so acc_k,
    the prefix/rollout alignment, the answer probe and the reference decide every number below."""

    def chat_prompt(self, system, user):
        return f"[{user}]"

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, *, n=1, **kwargs):
        from models.generation import Completion

        out = []
        for p in prompts:  # the answer probe "<answer>\boxed{" ends the prompt: the completion closes it
            right = "KEY" in p.split("]", 1)[1]
            answer = p[1 : p.index("]")].split("=")[1] if right else "0"
            out.append([Completion(f"{answer}}}</answer>", 3, "stop")] * n)
        return out


def test_acc_follows_the_prefix_that_holds_the_key_thought():
    """DESIGN §3 by hand: s_k = acc_k·δ(c_k) − acc_{k−1}·δ(c_{k−1}), δ(c) = exp(−c / L_δ); two traces in one shard."""
    traces = [
        {"id": "a", "problem": "x=7", "answer": "7", "thoughts": ["one two\n\n", "KEY three\n\n", "four"]},
        {"id": "b", "problem": "x=5", "answer": "5", "thoughts": ["KEY\n\n", "six seven"]},
    ]
    cfg = ScoreConfig(n_rollouts=2, L_delta=10.0, answer_probe="<answer>\\boxed{", shard_size=2)
    a, b = score_traces(_KeyThought(), traces, cfg)
    assert a.acc == [0.0, 0.0, 1.0, 1.0] and b.acc == [0.0, 1.0, 1.0]
    assert a.context_tokens == [0, 2, 4, 5] and b.context_tokens == [0, 1, 3]
    d = lambda c: math.exp(-c / 10.0)  # noqa: E731
    assert a.importance == pytest.approx([0.0, d(4), d(5) - d(4)])
    assert b.importance == pytest.approx([d(1), d(3) - d(1)])
    wrong = [{**traces[0], "answer": "8"}]  # a wrong reference makes every rollout wrong
    assert score_traces(_KeyThought(), wrong, cfg)[0].acc == [0.0] * 4
