"""Fuzz tests (hypothesis, derandomized): the turn protocol parser and the jsonl loaders.

The parser may only raise ProtocolError (or return None, for ``extract_boxed``); what
``format_*`` writes, ``parse_*`` reads back. A loader given any bytes returns rows or
raises DataError, never a bare UnicodeDecodeError, JSONDecodeError, KeyError or TypeError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longshort.config import DataConfig
from longshort.io import DataError, iter_jsonl
from models.protocol import (
    TAGS,
    ProtocolError,
    extract_boxed,
    format_long_turn,
    format_response,
    format_short_turn,
    parse_response,
    parse_transcript,
    parse_turn,
    split_turns,
)
from tasks.benchmarks import load_benchmark
from tasks.synthesize import load_problems

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# text built from the protocol's own pieces reaches the interesting branches far more often than random text
PIECES = (*TAGS, "\n", " ", "x", "{", "}", "\\boxed{", "\\boxed{4}", "<", ">", "</", "think", "é")
protocol_text = st.one_of(st.text(max_size=80), st.lists(st.sampled_from(PIECES), max_size=16).map("".join))
body = st.text(max_size=40).filter(lambda b: not any(tag in b for tag in TAGS))


@FUZZ
@given(text=protocol_text, role=st.sampled_from(["long", "short"]))
def test_parsers_raise_only_protocol_errors(text, role):
    for parse in (lambda: parse_turn(role, text), lambda: parse_transcript(text), lambda: split_turns(text),
                  lambda: parse_response(text)):  # fmt: skip
        try:
            parse()
        except ProtocolError:
            pass
    boxed = extract_boxed(text)
    assert boxed is None or (isinstance(boxed, str) and "\\boxed{" in text)


@FUZZ
@given(text=protocol_text)
def test_split_turns_keeps_the_text_exact(text):
    try:
        turns = split_turns(text)
    except ProtocolError:
        return
    assert text.endswith("".join(turns)) and not text[: len(text) - len("".join(turns))].strip()


@FUZZ
@given(thinking=body.map(lambda b: b.strip("\n")), rethinks=st.lists(st.tuples(body, body.map(lambda b: b.strip("\n"))),
       max_size=3), answer=body)  # fmt: skip
def test_format_then_parse_round_trips(thinking, rethinks, answer):
    assert parse_turn("long", format_long_turn(thinking)).body == thinking
    turns = [format_long_turn(thinking)]
    for short, long in rethinks:
        assert parse_turn("short", format_short_turn(short, final=False)).body == short
        turns += [format_short_turn(short, final=False), format_long_turn(long)]
    turns.append(format_short_turn(answer, final=True))
    parsed = parse_transcript("\n".join(turns))
    assert [t.kind for t in parsed] == ["think"] + ["rethink", "think"] * len(rethinks) + ["final"]
    assert parsed[-1].body == answer and parsed[-1].answer == extract_boxed(answer)
    got_thinking, final = parse_response(format_response(thinking, answer))
    assert (got_thinking, final.body) == (thinking, answer)


@FUZZ
@given(inner=st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=20), before=st.text(max_size=20))
def test_extract_boxed_reads_back_what_was_boxed(inner, before):
    assert extract_boxed(f"{before}\\boxed{{{inner}}}") == inner.strip()


# --- loaders

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
FIELDS = ("id", "problem", "answer", "response", "question", "choices", "correct_answer", "Correct Answer")
row = st.dictionaries(st.sampled_from(FIELDS), json_value | st.just("<think>\nx\n</think>\n<answer>\\boxed{1}</answer>"))
line = st.one_of(
    row.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=60),
    row.map(lambda r: json.dumps(r).encode()).flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),
)
jsonl_bytes = st.lists(line, max_size=4).map(lambda lines: b"\n".join(lines))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(content=jsonl_bytes)
def test_loaders_return_rows_or_a_data_error(fuzz_dir, content):
    path = fuzz_dir / "fuzz.jsonl"
    path.write_bytes(content)
    try:
        rows = list(iter_jsonl(path))
        assert all(isinstance(r, dict) for _, r in rows)
    except DataError as exc:
        assert str(exc).startswith(f"{path}:")
    for load in (
        lambda: load_problems(DataConfig(source="traces", path=str(path)), need_response=True),
        lambda: load_problems(DataConfig(source="teacher", path=str(path), teacher="t"), need_response=False),
        lambda: load_benchmark(str(path)),
        lambda: load_benchmark(str(path), name="gpqa_diamond"),
    ):
        try:
            items = load()
        except DataError as exc:
            assert str(exc).startswith(str(path)), exc
        else:
            assert items and all(isinstance(getattr(i, "answer", None) or i["answer"], str) for i in items)


# The fuzzed files above are nearly always refused (a random row lacks a problem or an answer): well-formed
# files must be read back row for row.
nonblank = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() and "\x00" not in s)
valid_row = st.fixed_dictionaries({"problem": nonblank, "answer": nonblank | st.integers(-(10**6), 10**6)})


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(valid_row, min_size=1, max_size=4))
def test_well_formed_rows_are_all_read(fuzz_dir, rows):
    path = fuzz_dir / "ok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_benchmark(str(path))
    assert [it.problem for it in items] == [r["problem"] for r in rows]
    assert [it.answer for it in items] == [str(r["answer"]).strip() for r in rows]  # answers are stripped
    got = load_problems(DataConfig(source="teacher", path=str(path), teacher="t"), need_response=False)
    assert [g["problem"] for g in got] == [r["problem"] for r in rows]
