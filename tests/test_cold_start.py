"""Cold start: scored demo traces -> Long⊗Short episodes -> D_long / D_short.

Importance values are set by hand from the chunker's thought type (the test's
stand-in for Monte Carlo scores); the hidden ``essential`` label is never used.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from longshort.io import iter_jsonl
from models.generation import TransformersBackend
from models.protocol import SYSTEM_PROMPTS, TURN_SEP, parse_transcript
from tasks.chunking import chunk_trace, thinking_of
from tasks.demo import answer_text
from tasks.cold_start import (
    ColdStartConfig,
    DemoTerseCompressor,
    ModelCompressor,
    build_cold_start,
    clean_terse,
    episode_turns,
    make_compressor,
    pair_sft_examples,
    runs,
    verbatim_compressor,
    write_cold_start,
)

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LIMO = SHARED_DATA / "cold_start" / "limo_r1_distill_qwen32b.jsonl"
# Hand-set importance per chunker thought type: the computation adds the accuracy,
# everything else costs tokens and adds nothing.
IMPORTANCE_BY_TYPE = {"compute": 0.8, "verify": -0.03, "restate": -0.01, "plan": -0.01, "detour": -0.05,
                      "conclude": 0.05}  # fmt: skip


def scored_rows(rows: list[dict], importance_by_type: dict[str, float] = IMPORTANCE_BY_TYPE) -> list[dict]:
    """Demo rows chunked as the pipeline does, with hand-set importance."""
    out = []
    for r in rows:
        thoughts = chunk_trace(thinking_of(r["response"]))
        out.append({"id": r["id"], "problem": r["problem"], "answer": r["answer"], "response": r["response"],
                    "thoughts": [t.text for t in thoughts],
                    "importance": [importance_by_type.get(t.type, 0.0) for t in thoughts]})  # fmt: skip
    return out


def episodes_of(d_long: list[dict], d_short: list[dict]) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = {}
    for row in sorted(d_long + d_short, key=lambda r: (r["id"], r["turn"])):
        by_id.setdefault(row["id"], []).append(row)
    return by_id


@pytest.fixture(scope="module")
def demo_build(demo_rows_small):
    train, _ = demo_rows_small
    cfg = ColdStartConfig()
    return build_cold_start(scored_rows(train), cfg, make_compressor(cfg, train))


def test_demo_episodes_parse_alternate_start_long_and_box_the_reference(demo_rows_small, demo_build):
    train, _ = demo_rows_small
    d_long, d_short, stats = demo_build
    episodes = episodes_of(d_long, d_short)
    assert len(episodes) == stats.n_episodes == len(train)
    answers = {r["id"]: r["answer"] for r in train}
    for trace_id, rows in episodes.items():
        assert [r["turn"] for r in rows] == list(range(len(rows)))
        assert [r["role"] for r in rows] == ["long", "short"] * (len(rows) // 2)
        transcript = TURN_SEP.join(r["completion"] for r in rows)
        parsed = parse_transcript(transcript)
        assert parsed[0].kind == "think" and parsed[-1].kind == "final"
        assert parsed[-1].answer == answers[trace_id]
        assert rows[-1]["completion"].endswith(f"The final number is \\boxed{{{answers[trace_id]}}}.</answer>")
        # history is the exact transcript before each turn
        for prev, row in zip(rows, rows[1:]):
            assert row["history"] == prev["history"] + prev["completion"] + TURN_SEP
        assert rows[0]["history"] == ""
    # restate/plan come first and are unimportant: every episode opens with the empty long turn,
    # then the terse restatement, the computation verbatim, and the checks folded into the answer.
    assert stats.turns_histogram == {4: len(train)}
    assert all(rows[0]["completion"] == "<think>\n\n</think>" for rows in episodes.values())
    assert stats.n_long == stats.n_short == 2 * len(train)


def test_important_thoughts_stay_verbatim_and_same_kind_thoughts_merge(demo_rows_small):
    train, _ = demo_rows_small
    row = scored_rows(train[:1])[0]
    thoughts = row["thoughts"]
    assert len(thoughts) >= 6
    n = len(thoughts)
    # runs: [0] short, [1,2] long, [3,4] short, [5..] long -> a final short turn is added
    importance = [-0.1, 0.5, 0.6, -0.2, -0.3] + [0.4] * (n - 5)
    terse = [f"t{k}." for k in range(n)]
    turns = episode_turns(thoughts, importance, 0.1, terse, row["answer"])
    assert runs([s >= 0.1 for s in importance]) == [(0, 1, False), (1, 3, True), (3, 5, False), (5, n, True)]
    assert turns == [
        "<think>\n\n</think>",
        "<answer>t0.</rethink>",
        "<think>\n" + (thoughts[1] + thoughts[2]).strip() + "\n</think>",
        "<answer>t3. t4.</rethink>",
        "<think>\n" + "".join(thoughts[5:]).strip() + "\n</think>",
        f"<answer>The final number is \\boxed{{{row['answer']}}}.</answer>",
    ]
    # the merged long turn keeps the trace's blank line between its two thoughts, exactly
    assert (thoughts[1] + thoughts[2]).strip() in thinking_of(row["response"])
    assert "\n\n" in turns[2]
    # a last unimportant run is folded into the final answer turn
    folded = episode_turns(thoughts, [0.5] + [-0.1] * (n - 1), 0.1, terse, row["answer"])
    assert len(folded) == 2
    assert folded[1] == "<answer>" + " ".join(terse[1:]) + f" The final number is \\boxed{{{row['answer']}}}.</answer>"


def test_theta_changes_the_split(demo_rows_small):
    train, _ = demo_rows_small
    rows = scored_rows(train[:16])
    compressor = DemoTerseCompressor.from_rows(train)
    fractions, long_chars = [], []
    for theta in (0.9, 0.1, 0.0, -0.02):
        _, _, stats = build_cold_start(rows, ColdStartConfig(theta=theta), compressor)
        fractions.append(stats.important_fraction)
        long_chars.append(stats.chars_long)
    # 0.9: nothing is important; 0.1: compute; 0.0: + conclude; -0.02: + restate and plan
    assert fractions[0] == 0.0 and long_chars[0] == len("<think>\n\n</think>") * 16
    assert fractions == sorted(fractions) and len(set(fractions)) == 4
    assert long_chars == sorted(long_chars) and len(set(long_chars)) == 4
    # with nothing important an episode is an empty long turn and one final short turn
    d_long, d_short, stats = build_cold_start(rows, ColdStartConfig(theta=0.9), compressor)
    assert stats.turns_histogram == {2: 16}
    assert all(r["completion"].endswith(f"\\boxed{{{row['answer']}}}.</answer>") for r, row in zip(d_short, rows))


def test_demo_compressor_gives_the_teachers_terse_forms_without_the_hidden_label(demo_rows_small):
    train, _ = demo_rows_small
    blind = copy.deepcopy(train)
    for r in blind:
        for t in r["thoughts"]:
            del t["essential"]  # the compressor must not need it
    compressor = DemoTerseCompressor.from_rows(blind)
    teacher = train[0]["thoughts"]
    assert compressor([t["text"] for t in teacher]) == [t["terse"] for t in teacher]
    assert compressor([teacher[0]["text"] + "\n\n"]) == [teacher[0]["terse"]]  # chunk texts keep their blank line
    # a chunk spanning two teacher paragraphs gets both terse forms
    merged = teacher[0]["text"] + "\n\n" + teacher[1]["text"] + "\n\n"
    assert compressor([merged]) == [teacher[0]["terse"] + " " + teacher[1]["terse"]]
    assert compressor([]) == []


def test_unknown_thought_names_the_trace(demo_rows_small):
    train, _ = demo_rows_small
    rows = scored_rows(train[:3])
    rows[1]["thoughts"][0] = "Okay, a restatement the teacher never wrote.\n\n"
    rows[1].pop("response")
    with pytest.raises(ValueError, match=rf"trace '{rows[1]['id']}', thought 0: .*no terse form .*never wrote"):
        build_cold_start(rows, ColdStartConfig(), DemoTerseCompressor.from_rows(train))


def test_bad_rows_and_broken_episodes_name_the_trace(demo_rows_small):
    train, _ = demo_rows_small
    compressor = DemoTerseCompressor.from_rows(train)
    rows = scored_rows(train[:2])
    short = copy.deepcopy(rows)
    short[0]["importance"] = short[0]["importance"][:-1]
    with pytest.raises(ValueError, match=rf"id '{rows[0]['id']}'.*one number per thought"):
        build_cold_start(short, ColdStartConfig(), compressor)
    glued = copy.deepcopy(rows)
    glued[1]["thoughts"] = [t.strip() for t in glued[1]["thoughts"]]  # joined with '' they are not the trace
    with pytest.raises(ValueError, match=rf"id '{rows[1]['id']}'.*not the thinking"):
        build_cold_start(glued, ColdStartConfig(), compressor)
    tagged = copy.deepcopy(rows)
    k = tagged[0]["importance"].index(0.8)
    tagged[0]["thoughts"][k] = tagged[0]["thoughts"][k].replace("Let me", "</think> Let me")
    tagged[0].pop("response")
    with pytest.raises(ValueError, match=rf"trace '{rows[0]['id']}': .*breaks the protocol.*unexpected </think>"):
        build_cold_start(tagged, ColdStartConfig(), compressor)


def test_episodes_are_much_shorter_than_the_traces(demo_rows_small, demo_tokenizer):
    train, _ = demo_rows_small
    cfg = ColdStartConfig()
    count = lambda text: len(demo_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    _, _, stats = build_cold_start(scored_rows(train), cfg, make_compressor(cfg, train), count_tokens=count)
    # measured on these 64 demo traces: 63.0% fewer characters, 60.5% fewer tokens
    assert stats.char_reduction == pytest.approx(1 - stats.episode_chars / stats.trace_chars)
    assert stats.char_reduction > 0.6
    assert stats.token_reduction is not None and stats.token_reduction > 0.55
    assert 0.1 < stats.important_fraction < 0.15  # one compute thought of ~8
    # verbatim "compression" only adds tags: no shorter than the trace
    _, _, verbatim = build_cold_start(scored_rows(train), cfg, verbatim_compressor, count_tokens=count)
    assert verbatim.char_reduction < 0 < stats.char_reduction
    assert abs(verbatim.token_reduction) < 0.01


def test_real_r1_traces_make_valid_episodes():
    """Five LIMO traces (R1-Distill-Qwen-32B), chunked by rules, every third thought important."""
    rows = [r for _, r in iter_jsonl(LIMO)][:5]
    scored = []
    for r in rows:
        thoughts = chunk_trace(thinking_of(r["response"]))
        scored.append({"id": r["id"], "problem": r["problem"], "answer": r["answer"], "response": r["response"],
                       "thoughts": [t.text for t in thoughts],
                       "importance": [0.5 if k % 3 == 1 else -0.1 for k in range(len(thoughts))]})  # fmt: skip
    cfg = ColdStartConfig(compressor="verbatim", final_answer_template="The final answer is \\boxed{{{answer}}}.")
    d_long, d_short, stats = build_cold_start(scored, cfg, verbatim_compressor)
    for trace_id, episode in episodes_of(d_long, d_short).items():
        parsed = parse_transcript(TURN_SEP.join(r["completion"] for r in episode))
        assert parsed[-1].answer == next(r["answer"] for r in rows if r["id"] == trace_id)
        # the long turns hold the important thoughts exactly as the trace has them
        trace = thinking_of(next(r["response"] for r in rows if r["id"] == trace_id))
        assert all(t.body in trace for t in parsed if t.kind == "think")
    assert stats.n_episodes == 5 and stats.important_fraction == pytest.approx(1 / 3, abs=0.05)


def test_pair_sft_examples_match_the_inference_prompt(demo_rows_small, demo_build, demo_tokenizer, tiny_model):
    d_long, d_short, _ = demo_build
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    for role, rows in (("long", d_long), ("short", d_short)):
        examples = pair_sft_examples(demo_tokenizer, rows, role)
        assert len(examples) == len(rows)
        for ex, row in zip(examples, rows):
            # exactly what run_episodes feeds the model before this turn
            assert ex["prompt"] == backend.chat_prompt(SYSTEM_PROMPTS[role], row["problem"]) + row["history"]
            assert ex["completion"] == row["completion"]
            prompt_ids = demo_tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
            full_ids = demo_tokenizer(ex["prompt"] + ex["completion"], add_special_tokens=False)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids  # tokenization does not cross the boundary
        # a later turn of one model extends the earlier turn's prompt + completion
        first, second = examples[0], examples[1]
        assert rows[0]["id"] == rows[1]["id"]
        assert second["prompt"].startswith(first["prompt"] + first["completion"] + TURN_SEP)
    with pytest.raises(ValueError, match=r"role 'short' in a 'long' dataset"):
        pair_sft_examples(demo_tokenizer, d_short[:1], "long")


def test_model_compressor_makes_valid_episodes_in_one_batched_call(demo_rows_small, demo_tokenizer, tiny_model):
    train, _ = demo_rows_small
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    calls = []

    class Counting:  # the real backend, with its calls counted
        def chat_prompt(self, system, user):
            return backend.chat_prompt(system, user)

        def generate(self, prompts, **kwargs):
            calls.append(len(prompts))
            return backend.generate(prompts, **kwargs)

    cfg = ColdStartConfig(compressor="model", max_new_tokens=6)
    rows = scored_rows(train[:4])
    compressor = make_compressor(cfg, backend=Counting())
    assert isinstance(compressor, ModelCompressor)
    d_long, d_short, stats = build_cold_start(rows, cfg, compressor)
    n_unimportant = sum(s < cfg.theta for r in rows for s in r["importance"])
    assert calls == [n_unimportant]
    assert stats.n_episodes == 4 and stats.n_short == len(d_short) == 8
    answers = {r["id"]: r["answer"] for r in rows}
    for pid, rows_of_episode in episodes_of(d_long, d_short).items():
        parsed = parse_transcript(TURN_SEP.join(r["completion"] for r in rows_of_episode))
        assert parsed[-1].kind == "final" and parsed[-1].answer == answers[pid]  # the teacher's answer survives
    assert clean_terse("<think>\nhm\n</think>\n<answer>a </rethink>b") == "a b"


def test_write_cold_start_round_trips(tmp_path, demo_build):
    d_long, d_short, _ = demo_build
    p_long, p_short = write_cold_start(tmp_path / "cold", d_long, d_short)
    assert [r for _, r in iter_jsonl(p_long)] == d_long
    assert [r for _, r in iter_jsonl(p_short)] == d_short
    assert sorted(p.name for p in (tmp_path / "cold").iterdir()) == ["d_long.jsonl", "d_short.jsonl"]


def test_config_validates_theta_template_and_compressor_needs():
    with pytest.raises(ValidationError, match="inside"):
        ColdStartConfig(final_answer_template="The answer is {answer}.")
    with pytest.raises(ValidationError, match="theta"):
        ColdStartConfig(theta=1.5)
    with pytest.raises(ValidationError, match="extra"):
        ColdStartConfig(threshold=0.2)
    assert ColdStartConfig(final_answer_template="Final answer: \\boxed{{{answer}}}").theta == 0.1
    with pytest.raises(ValueError, match="no demo rows"):
        make_compressor(ColdStartConfig())
    with pytest.raises(ValueError, match="no generation backend"):
        make_compressor(ColdStartConfig(compressor="model"))
    assert make_compressor(ColdStartConfig(compressor="verbatim")) is verbatim_compressor
    # the default closing sentence is the demo teacher's, so demo episodes end as its traces do
    assert ColdStartConfig().final_answer_template.format(answer=7) == answer_text(7)


def test_episodes_longer_than_the_turn_cap_are_fitted_to_it_with_a_warning(demo_rows_small, caplog):
    """Inference ends an episode at protocol.max_turns without an answer: an episode with more turns is fitted,
    its least important runs of long thoughts becoming short turns, instead of being taught or thrown away."""
    import logging

    from tasks.cold_start import fit_to_turns, n_turns, runs

    train, _ = demo_rows_small
    rows = scored_rows(train[:16])
    compressor = DemoTerseCompressor.from_rows(train)
    cfg = ColdStartConfig(theta=-0.02)  # restate, plan, compute and conclude are long thoughts: more turns
    d_long, d_short, stats = build_cold_start(rows, cfg, compressor)
    cap = max(stats.turns_histogram) - 2
    long_episodes = sum(n for turns, n in stats.turns_histogram.items() if turns > cap)
    with caplog.at_level(logging.WARNING, logger="tasks.cold_start"):
        capped_long, capped_short, capped = build_cold_start(rows, cfg, compressor, max_turns=cap)
    assert capped.n_fitted_to_max_turns == long_episodes > 0 and capped.n_over_max_turns == 0
    assert capped.n_episodes == 16 and max(capped.turns_histogram) <= cap and stats.n_fitted_to_max_turns == 0
    assert f"{long_episodes} of 16 episodes had more than protocol.max_turns={cap} turns" in caplog.text
    fitted = episodes_of(capped_long, capped_short)
    for row in rows:
        kept = fit_to_turns(row["importance"], cfg.theta, cap)
        assert len(fitted[row["id"]]) == n_turns(kept) <= cap
        # what stays long is the important runs of most total importance; every other thought went short
        wanted = [(a, b) for a, b, flag in runs([s >= cfg.theta for s in row["importance"]]) if flag]
        kept_runs = [(a, b) for a, b, flag in runs(kept) if flag]
        assert set(kept_runs) <= set(wanted)
        dropped = [r for r in wanted if r not in kept_runs]
        if dropped:
            mass = lambda r: sum(row["importance"][r[0] : r[1]])  # noqa: E731
            assert max(map(mass, dropped)) <= min(map(mass, kept_runs), default=math.inf)
    with pytest.raises(ValueError, match="every episode has more than protocol.max_turns=1 turns"):
        build_cold_start(rows, cfg, compressor, max_turns=1)


def test_fitting_to_the_turn_cap_demotes_the_least_important_runs():
    from tasks.cold_start import fit_to_turns, n_turns

    #        run A (0.5)   run B (0.2)  run C (0.9)
    scores = [0.3, 0.2, -0.1, 0.2, -0.3, 0.5, 0.4, -0.2]
    assert n_turns([s >= 0.1 for s in scores]) == 6  # long A, short, long B, short, long C, final
    assert fit_to_turns(scores, 0.1, 6) == [s >= 0.1 for s in scores]
    assert fit_to_turns(scores, 0.1, 5) == [True, True, False, False, False, True, True, False]  # B goes
    assert fit_to_turns(scores, 0.1, 4) == fit_to_turns(scores, 0.1, 5)  # long A, short, long C, final: 4 turns
    # under 4, A goes (an empty think, a short turn, long C, final: still 4), then C
    assert fit_to_turns(scores, 0.1, 3) == [False] * 8 and n_turns([False] * 8) == 2
    assert fit_to_turns([0.2, 0.2], 0.1, 2) == [True, True]  # one long turn and the final one: fits
    assert fit_to_turns([0.2, -0.1, 0.2], 0.1, 2) == [True, False, False]  # a tie: the later run goes


def test_episodes_with_a_turn_over_its_token_cap_are_counted_and_warned_about(demo_rows_small, caplog):
    """A turn longer than protocol.max_new_tokens_long / _short is cut off at inference, never completed:
    the run says how many episodes have one and which cap to raise (the episodes stay: nothing is lost)."""
    import logging

    train, _ = demo_rows_small
    rows = scored_rows(train[:16])
    compressor = DemoTerseCompressor.from_rows(train)
    cfg = ColdStartConfig(theta=-0.02)
    chars = len  # a token counter: one token per character
    d_long, d_short, stats = build_cold_start(rows, cfg, compressor, chars)
    turns = {i: [r["completion"] for r in rs] for i, rs in episodes_of(d_long, d_short).items()}
    longest = {i: (max(map(chars, t[0::2])), max(map(chars, t[1::2]))) for i, t in turns.items()}
    cap_long = sorted(m for m, _ in longest.values())[len(longest) // 2]  # the median episode's longest long turn
    cap_short = max(s for _, s in longest.values())
    with caplog.at_level(logging.WARNING, logger="tasks.cold_start"):
        capped_long, capped_short, capped = build_cold_start(rows, cfg, compressor, chars, max_turn_tokens=(cap_long, cap_short))
    over = sum(m > cap_long for m, _ in longest.values())
    assert 0 < over < 16 and capped.n_over_turn_tokens == over and stats.n_over_turn_tokens == 0
    assert (capped_long, capped_short, capped.n_episodes) == (d_long, d_short, 16)
    assert f"{over} of 16 episodes have a turn longer than its cap, protocol.max_new_tokens_long={cap_long}" in caplog.text
    # without a token counter nothing is measured
    assert build_cold_start(rows, cfg, compressor, max_turn_tokens=(1, 1))[2].n_over_turn_tokens == 0


def test_the_model_compressor_answers_after_an_empty_think_and_keeps_a_cut_off_thought_verbatim(caplog):
    """The long-CoT base opens every reply with <think>: its rewrite is asked for as its answer, and a reply
    cut off by max_new_tokens (or empty) is no terse form, so that thought stays as it was."""
    import logging

    from models.generation import Completion

    class Scripted:
        def __init__(self):
            self.prompts, self.stop = [], None

        def chat_prompt(self, system, user):
            return f"[{user}]"

        def generate(self, prompts, *, stop=(), **kwargs):
            self.prompts, self.stop = prompts, stop
            return [
                [Completion(" 3+4=7.</answer>", 5, "stop")],
                [Completion(" So we have, let me see, the", 8, "length")],
                [Completion("</answer>", 1, "stop")],
            ]

    backend = Scripted()
    with caplog.at_level(logging.WARNING, logger="tasks.cold_start"):
        out = ModelCompressor(backend, max_new_tokens=8)(["Now 3 + 4 = 7.", "  So we have 7.\n", "Hmm."])
    assert out == ["3+4=7.", "So we have 7.", "Hmm."]
    assert backend.prompts[0] == "[Now 3 + 4 = 7.]<think>\n\n</think>\n<answer>" and "</answer>" in backend.stop
    assert "1 of 3 compressions hit max_new_tokens=8 and 1 were empty" in caplog.text
