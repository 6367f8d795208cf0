"""Chunking traces into thoughts: rules, the LLM path's validation, and the exact round trip."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from longshort.config import DemoTaskConfig
from longshort.io import iter_jsonl
from models.generation import Completion
from models.protocol import format_response
from tasks.chunking import (
    DEFAULT_MARKERS,
    BlockError,
    ChunkConfig,
    ThoughtSpan,
    chunk_by_rules,
    chunk_trace,
    chunk_traces,
    marker_of,
    parse_blocks,
    split_steps,
    thinking_of,
)
from tasks.demo import demo_rows

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LIMO = SHARED_DATA / "cold_start" / "limo_r1_distill_qwen32b.jsonl"
# The demo teacher's thought kinds, in the chunker's vocabulary.
DEMO_KIND_TO_TYPE = {"restate": "restate", "plan": "plan", "detour": "detour", "compute": "compute",
                     "verify": "verify", "backcheck": "verify", "conclude": "conclude"}  # fmt: skip


def assert_spans_exact(trace: str, thoughts: Sequence[ThoughtSpan]) -> None:
    assert "".join(t.text for t in thoughts) == trace
    pos = 0
    for t in thoughts:
        assert t.start == pos and t.end == t.start + len(t.text) and trace[t.start : t.end] == t.text
        assert t.text  # no empty thoughts
        pos = t.end
    assert pos == len(trace)


# --------------------------------------------------------------------------- demo teacher


@pytest.fixture(scope="module")
def demo() -> list[dict]:
    train, heldout = demo_rows(DemoTaskConfig(n_train=50, n_heldout=5))
    return train + heldout


def test_rules_recover_the_demo_teachers_thoughts(demo):
    n_detours = 0
    for row in demo:
        teacher = row["thoughts"]
        trace = thinking_of(row["response"])
        assert trace == "\n\n".join(t["text"] for t in teacher)
        thoughts = chunk_trace(trace)
        assert [t.text for t in thoughts] == [t["text"] + "\n\n" for t in teacher[:-1]] + [teacher[-1]["text"]]
        assert [t.type for t in thoughts] == [DEMO_KIND_TO_TYPE[t["kind"]] for t in teacher]
        assert_spans_exact(trace, thoughts)
        n_detours += any(t["kind"] == "detour" for t in teacher)
    assert 0 < n_detours < len(demo)  # both shapes of trace were exercised


# --------------------------------------------------------------------------- steps and markers


def test_thinking_of_finds_the_thinking_in_each_response_style():
    assert thinking_of(format_response("a\n\nb", "\\boxed{3}")) == "a\n\nb"
    assert thinking_of("Okay, so x.\n\nSo y.\n</think>\n\n**Final Answer**\n\\boxed{3}") == "Okay, so x.\n\nSo y."
    assert thinking_of("<think>\nOkay, cut off mid") == "Okay, cut off mid"  # truncated trace
    no_tags = "Okay, so x.\n\n**Final Answer**\n\\boxed{3}\n"
    assert thinking_of(no_tags) == no_tags


def test_split_steps_cuts_at_blank_lines_and_keeps_them():
    trace = "\n\nA one\nline two\n\n\nB \n  \t\nC\r\n\r\nD\n\n"
    assert split_steps(trace) == ["\n\nA one\nline two\n\n\n", "B \n  \t\n", "C\r\n\r\n", "D\n\n"]
    assert split_steps("") == [] and split_steps("\n\n") == ["\n\n"]


def test_marker_of_takes_the_longest_whole_word_marker():
    assert marker_of("Let me verify this.") == "Let me verify"
    assert marker_of("Let me think.") == "Let me"
    assert marker_of("  **Final Answer**\n\\boxed{1}") == "Final Answer"
    assert marker_of("Now, the sum") == "Now" and marker_of("Nowhere near") is None
    assert marker_of("Butter is 3") is None and marker_of("But wait, no") == "But wait"
    assert marker_of("So, x") == "So," and marker_of("Sox = 1") is None
    assert marker_of("wait, lower case") is None


def test_tiny_thoughts_join_a_neighbour():
    first = "Okay, so we need the sum of the roots.\n\n"
    trace = first + "Hmm.\n\nWait, the product of the roots is 6.\n\nHmm.\n\nSo the answer is 6."
    assert [t.text for t in chunk_by_rules(trace, min_chars=16)] == [
        first + "Hmm.\n\n",  # "Hmm." alone is tiny: it stays with the thought before it
        "Wait, the product of the roots is 6.\n\nHmm.\n\n",
        "So the answer is 6.",
    ]
    assert len(chunk_by_rules(trace, min_chars=0)) == 5
    # a tiny first thought joins the next one, whose type it takes
    opening = chunk_by_rules("Hmm.\n\nLet me compute 2 + 2 = 4.\n\nSo the answer is 4.", min_chars=16)
    assert [(t.text, t.type) for t in opening] == [
        ("Hmm.\n\nLet me compute 2 + 2 = 4.\n\n", "compute"),
        ("So the answer is 4.", "conclude"),
    ]


def test_steps_without_a_marker_continue_the_current_thought():
    trace = "Okay, so two numbers.\n\nTheir sum is 10.\n\nTheir difference is 2.\n\nWait, recheck: 6 + 4 = 10."
    thoughts = chunk_by_rules(trace)
    assert [t.type for t in thoughts] == ["restate", "verify"]
    assert thoughts[0].text.endswith("Their difference is 2.\n\n")
    # with custom markers only those open thoughts
    custom = chunk_by_rules(trace, markers=["Their"], min_chars=0)
    assert [t.text.split()[0] for t in custom] == ["Okay,", "Their", "Their"]
    assert [t.type for t in custom] == ["other"] * 3


def test_chunk_config_forbids_unknown_keys_and_blank_markers():
    assert ChunkConfig().method == "rules" and ChunkConfig().llm_max_retries == 5
    assert ChunkConfig().markers is None  # the built-in markers
    assert "So the answer" in DEFAULT_MARKERS and "Let me double-check" in DEFAULT_MARKERS
    with pytest.raises(ValidationError, match="extra"):
        ChunkConfig(min_char=3)
    with pytest.raises(ValidationError, match="non-blank"):
        ChunkConfig(markers=["Wait", "  "])
    with pytest.raises(ValidationError):
        ChunkConfig(method="regex")
    custom = ChunkConfig(markers=["Their"], min_chars=0)
    assert len(chunk_trace("a\n\nTheir b\n\nc", custom)) == 2


# --------------------------------------------------------------------------- the round trip

_pieces = st.one_of(
    st.sampled_from([*DEFAULT_MARKERS, "\n", "\n\n", "\n\n\n", " \n \n", "\r\n\r\n", "**", " ", ",", "Nowhere"]),
    st.text(max_size=24),  # any unicode, newlines and separators included
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.lists(_pieces, max_size=40).map("".join), st.integers(0, 40))
def test_chunking_gives_the_trace_back_exactly(trace, min_chars):
    steps = split_steps(trace)
    assert "".join(steps) == trace
    thoughts = chunk_by_rules(trace, min_chars=min_chars)
    assert_spans_exact(trace, thoughts)
    assert (len(thoughts) == 0) == (trace == "")
    for t in thoughts[1:]:  # only a marker opens a thought ...
        assert marker_of(t.text) is not None
    if len(thoughts) > 1:  # ... and none is tiny unless it is the whole trace
        assert all(len(t.text.strip()) >= min_chars for t in thoughts)


# --------------------------------------------------------------------------- the LLM path


class ScriptedModel:
    """Stands in for a chunking LLM, which is outside our code and cannot run here.

    It answers each prompt with the next scripted output for the first script key
    found in the prompt, and records every call's prompts and seed.
    """

    name = "scripted"

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.calls: list[tuple[list[str], int, float]] = []
        self.caps: list[list[int]] = []  # each call's max_new_tokens per prompt

    def chat_prompt(self, system: str, user: str) -> str:
        return f"{system}\n{user}\n"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0):
        self.calls.append((list(prompts), seed, temperature))
        self.caps.append(list(max_new_tokens) if not isinstance(max_new_tokens, int) else [max_new_tokens] * len(prompts))
        outs = []
        for p, cap in zip(prompts, self.caps[-1], strict=True):
            key = next(k for k in self.scripts if k in p)
            words = self.scripts[key].pop(0).split(" ")  # a "token" is a word here: cut at the cap as a model is
            text = " ".join(words[:cap])
            outs.append([Completion(text, min(len(words), cap), "length" if len(words) > cap else "stop")])
        return outs


TRACE = "Okay, so the problem.\n\nIt asks for x.\n\nLet me compute x = 3.\n\nWait, check x = 3.\n\nSo x is 3."
VALID = json.dumps({
    "block 1": {"start": 1, "end": 2, "type": "restate"},
    "block 2": {"start": 3, "end": 3, "type": "compute"},
    "block 3": {"start": 4, "end": 5, "type": "Verify"},
})  # fmt: skip
INVALID = [
    '{"block 1": {"start": 1, "end": 2}, "block 2": {"start": 3, ',  # cut off: not JSON
    '{"block 1": {"start": 1, "end": 3}, "block 2": {"start": 3, "end": 5}}',  # step 3 twice
    '{"block 1": {"start": 1, "end": 2}, "block 2": {"start": 4, "end": 5}}',  # step 3 in none
]


def test_llm_blocks_are_validated_and_retried_with_new_seeds():
    model = ScriptedModel({"Okay, so the problem": [*INVALID, "```json\n" + VALID + "\n```"]})
    cfg = ChunkConfig(method="llm", llm_max_retries=5)
    [result] = chunk_traces([TRACE], cfg, model, seed=10)
    assert result.method == "llm" and result.attempts == 4
    assert [s for _, s, _ in model.calls] == [10, 11, 12, 13]
    assert all(t == cfg.llm_temperature > 0 for _, _, t in model.calls)
    assert "not valid JSON" in result.errors[0]
    assert "already covers" in result.errors[1]
    assert "steps 3..3 are in no block" in result.errors[2]
    assert [(t.text, t.type) for t in result.thoughts] == [
        ("Okay, so the problem.\n\nIt asks for x.\n\n", "restate"),
        ("Let me compute x = 3.\n\n", "compute"),
        ("Wait, check x = 3.\n\nSo x is 3.", "verify"),
    ]
    assert_spans_exact(TRACE, result.thoughts)
    prompt = model.calls[0][0][0]
    assert "[3] Let me compute x = 3." in prompt and "steps 1 to 5" in prompt


def test_llm_falls_back_to_the_rules_and_says_why(caplog):
    model = ScriptedModel({"Okay, so the problem": [*INVALID, VALID]})
    cfg = ChunkConfig(method="llm", llm_max_retries=2)  # three tries, all invalid
    with caplog.at_level(logging.WARNING, logger="tasks.chunking"):
        [result] = chunk_traces([TRACE], cfg, model)
    assert result.method == "fallback" and result.attempts == 3 and len(model.calls) == 3
    assert result.thoughts == chunk_by_rules(TRACE, DEFAULT_MARKERS, cfg.min_chars)
    assert "3 model answers rejected" in caplog.text
    assert "steps 3..3 are in no block" in caplog.text and "not valid JSON" in caplog.text


def test_llm_retries_only_the_traces_that_failed():
    other = "Okay, another one.\n\nSo the answer is 1."
    model = ScriptedModel({
        "Okay, so the problem": [INVALID[1], VALID],
        "Okay, another one": ['<think>two steps, one block</think>{"b": {"start": 1, "end": 2, "type": "conclude"}}'],
    })  # fmt: skip
    single = "Just one step, nothing to ask."
    results = chunk_traces([TRACE, single, other], ChunkConfig(method="llm"), model)
    assert [len(prompts) for prompts, _, _ in model.calls] == [2, 1]
    assert [(r.method, r.attempts) for r in results] == [("llm", 2), ("rules", 0), ("llm", 1)]
    assert [t.text for t in results[2].thoughts] == [other]


def test_an_answer_cut_off_at_its_cap_goes_to_the_rules_without_retries(caplog):
    """Retrying at the same cap would be cut off again: one try, and the error says which setting to raise.
    The cap grows with the trace: at least TOKENS_PER_STEP tokens per step."""
    from tasks.chunking import TOKENS_PER_STEP

    long_answer = " ".join(["pad"] * 200) + " " + VALID  # 200 "tokens" of chatter, then the blocks
    model = ScriptedModel({"Okay, so the problem": [long_answer, VALID]})
    cfg = ChunkConfig(method="llm", llm_max_new_tokens=16, llm_max_retries=5)
    with caplog.at_level(logging.WARNING, logger="tasks.chunking"):
        [result] = chunk_traces([TRACE], cfg, model)
    assert model.caps == [[TOKENS_PER_STEP * 5]] and len(model.calls) == 1  # 5 steps: 160 > 16
    assert result.method == "fallback" and result.attempts == 1
    assert result.errors[0].endswith("(cut off at 160 new tokens: raise chunk.llm_max_new_tokens)")
    assert "raise chunk.llm_max_new_tokens" in caplog.text
    model = ScriptedModel({"Okay, so the problem": [long_answer]})  # under a larger cap the same answer passes
    [result] = chunk_traces([TRACE], ChunkConfig(method="llm", llm_max_new_tokens=400), model)
    assert model.caps == [[400]] and result.method == "llm" and result.attempts == 1


def test_an_answer_still_thinking_is_rejected_not_searched_for_braces():
    with pytest.raises(BlockError, match="still thinking"):
        parse_blocks("<think>blocks might be " + VALID, 5)
    assert len(parse_blocks("<think>" + VALID + "</think>" + VALID, 5)) == 3


def test_a_chunking_temperature_of_zero_is_refused():
    with pytest.raises(ValueError, match="llm_temperature"):
        ChunkConfig(method="llm", llm_temperature=0.0)


@pytest.mark.parametrize(
    "output, message",
    [
        ("I cannot do that.", "no JSON object"),
        ('["block 1"]', "no JSON object"),
        ("[]{}", "non-empty JSON object"),
        ('{"block 1": [1, 4]}', "expected an object"),
        ('{"block 1": {"start": "1", "end": 4}}', "must be integers"),
        ('{"block 1": {"start": true, "end": 4}}', "must be integers"),
        ('{"block 1": {"start": 1, "end": 2}, "block 2": {"start": 4, "end": 3}}', "start 4 is after end 3"),
        ('{"block 1": {"start": 2, "end": 4}}', "steps 1..1 are in no block"),
        ('{"block 1": {"start": 1, "end": 5}}', "ends at step 5, but there are 4 steps"),
        ('{"block 1": {"start": 1, "end": 2}}', "steps 3..4 are in no block"),
        ('{"block 2": {"start": 3, "end": 4}, "block 1": {"start": 1, "end": 2}}', "steps 1..2 are in no block"),
    ],
)
def test_parse_blocks_rejects_invalid_answers(output, message):
    with pytest.raises(BlockError, match=message):
        parse_blocks(output, n_steps=4)


def test_parse_blocks_accepts_a_valid_answer():
    out = 'Sure:\n{"block 1": {"start": 1, "end": 1, "type": "plan"}, "block 2": {"start": 2, "end": 4, "type": "x"}}'
    assert parse_blocks(out, n_steps=4) == [(0, 0, "plan"), (1, 3, "other")]


def test_llm_method_needs_a_backend():
    with pytest.raises(ValueError, match="no generation backend"):
        chunk_traces([TRACE], ChunkConfig(method="llm"))


# --------------------------------------------------------------------------- real traces


@pytest.mark.skipif(not LIMO.is_file(), reason=f"shared LIMO traces not present at {LIMO}")
def test_first_limo_traces_chunk_without_error():
    rows = [row for _, row in iter_jsonl(LIMO)][:20]
    assert len(rows) == 20
    cfg = ChunkConfig()
    for row in rows:
        trace = thinking_of(row["response"])
        thoughts = chunk_trace(trace, cfg)
        assert_spans_exact(trace, thoughts)
        assert 5 < len(thoughts) < len(split_steps(trace))  # merged, but not into one block
        assert all(len(t.text.strip()) >= cfg.min_chars for t in thoughts)
        assert thoughts[-1].type == "conclude"  # "**Final Answer**" opens the last thought


def test_the_chunk_stage_prompts_the_given_model_when_the_method_is_llm(tmp_path, saved_tiny):
    """The flow's chunk task builds a backend from ``llm`` (the run's base model); an untrained tiny model
    writes no valid JSON, so each trace falls back to the rules after its tries, and the records say so."""
    import json

    from flows.stages import chunk_task
    from longshort.config import DemoTaskConfig, load_profile
    from tasks.synthesize import synthesize_demo

    files = synthesize_demo(DemoTaskConfig(n_train=3, n_heldout=2, seed=5), tmp_path / "data")
    smoke = load_profile("smoke")
    chunk = {**smoke.section_dump("chunk"), "method": "llm", "llm_max_retries": 1, "llm_max_new_tokens": 16}
    inputs = dict(train_path=files.train, heldout_path=files.heldout, chunk=chunk, n_train=2, n_heldout=1, seed=0)
    with pytest.raises(ValueError, match="chunk.method is 'llm' but no model was given to prompt"):
        chunk_task.fn(key="k0", out_dir=str(tmp_path / "none"), **inputs)
    llm = {"model_dir": str(saved_tiny), "base_model": smoke.section_dump("base_model"),
           "generation": smoke.section_dump("generation")}  # fmt: skip
    record = chunk_task.fn(key="k1", out_dir=str(tmp_path / "chunk"), llm=llm, **inputs)
    rows = [json.loads(line) for line in open(record.outputs["train"])] + [json.loads(line) for line in open(record.outputs["heldout"])]
    assert [r["chunk_method"] for r in rows] == ["fallback"] * 3
    assert record.metrics["chunk_train_traces"] == 2 and record.metrics["chunk_heldout_traces"] == 1
    assert record.metrics["chunk_train_llm_fallback_share"] == record.metrics["chunk_heldout_llm_fallback_share"] == 1.0
