import pytest

from models.generation import Completion
from models.protocol import (
    ProtocolError,
    extract_boxed,
    format_long_turn,
    format_response,
    format_short_turn,
    parse_response,
    parse_transcript,
    parse_turn,
    run_episodes,
)


def test_extract_boxed_takes_last_balanced_box():
    assert extract_boxed(r"so \boxed{3} or rather \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{ 42 }") == "42"
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_boxed(r"\boxed{1} then \boxed{2") == "1"


def test_parse_long_and_short_turns():
    assert parse_turn("long", "<think>\nstep one\n</think>").body == "step one"
    r = parse_turn("short", "<answer>ok, back to you</rethink>")
    assert (r.kind, r.body, r.answer) == ("rethink", "ok, back to you", None)
    f = parse_turn("short", r"<answer>The answer is \boxed{7}.</answer>")
    assert (f.kind, f.answer) == ("final", "7")


@pytest.mark.parametrize(
    "role,text,message",
    [
        ("long", "thinking without tags", "must start with <think>"),
        ("long", "<think>\nnever closed", "no closing </think>"),
        ("long", "<think> a <answer> b </think>", "unexpected <answer>"),
        ("short", "<think>wrong model</think>", "must start with <answer>"),
        ("short", r"<answer>\boxed{3}", "neither </rethink> nor </answer>"),
        ("short", "<answer>x <think> y</answer>", "unexpected <think>"),
    ],
)
def test_malformed_turns_name_the_problem(role, text, message):
    with pytest.raises(ProtocolError, match=message):
        parse_turn(role, text)


def test_transcript_round_trip_and_rules():
    text = "\n".join(
        [format_long_turn("a"), format_short_turn("b", final=False), format_long_turn("c"),
         format_short_turn(r"\boxed{5}", final=True)]
    )  # fmt: skip
    turns = parse_transcript(text)
    assert [t.kind for t in turns] == ["think", "rethink", "think", "final"]
    assert turns[-1].answer == "5"
    with pytest.raises(ProtocolError, match="does not end with </answer>"):
        parse_transcript(format_long_turn("a") + "\n" + format_short_turn("b", final=False))
    with pytest.raises(ProtocolError, match="consecutive turns"):
        parse_transcript(format_long_turn("a") + format_long_turn("b") + format_short_turn("x", True))
    with pytest.raises(ProtocolError, match="before the end"):
        parse_transcript(format_long_turn("a") + format_short_turn("x", True) + format_long_turn("b")
                         + format_short_turn("y", True))  # fmt: skip
    with pytest.raises(ProtocolError, match="text before the first turn"):
        parse_transcript("hello " + format_response("t", r"\boxed{1}"))


def test_missing_answer_close_in_response():
    with pytest.raises(ProtocolError, match="turn 2"):
        parse_response("<think>\nx\n</think>\n<answer>\\boxed{1}")
    thinking, final = parse_response(format_response("x\n\ny", r"It is \boxed{2}."))
    assert thinking == "x\n\ny" and final.answer == "2"


class ScriptedBackend:
    """A stand-in for a model that replays fixed turns: the protocol logic is what is under test."""

    name = "scripted"

    def __init__(self, turns):
        self.turns = list(turns)
        self.prompts = []

    def chat_prompt(self, system, user):
        return f"[{system}|{user}]"

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0):
        self.prompts.extend(prompts)
        out = []
        for _ in prompts:
            text = self.turns.pop(0)
            out.append([Completion(text, len(text.split()), "stop")])
        return out


def test_episode_alternates_counts_tokens_and_ends_on_answer():
    long = ScriptedBackend(["<think>\nfirst idea\n</think>", "<think>\nsecond\n</think>"])
    short = ScriptedBackend(["<answer>go on</rethink>", r"<answer>done \boxed{9}</answer>"])
    (ep,) = run_episodes(["p"], long, short, max_turns=6)
    assert ep.stop_reason == "answer" and ep.answer == "9"
    assert [t.role for t in ep.turns] == ["long", "short", "long", "short"]
    assert ep.tokens("long") == 4 + 3 and ep.tokens("short") == 2 + 2 and ep.tokens() == 11
    # the short model saw the long model's turn as history
    assert short.prompts[0].endswith("<think>\nfirst idea\n</think>\n")
    parse_transcript(ep.transcript)


def test_a_backend_that_drops_a_reply_is_an_error_not_a_lost_episode():
    class Dropping(ScriptedBackend):
        def generate(self, prompts, **kwargs):
            return super().generate(prompts, **kwargs)[:-1]

    long = Dropping(["<think>\na\n</think>", "<think>\nb\n</think>"])
    short = ScriptedBackend([])
    with pytest.raises(RuntimeError, match="turn 1: the long model returned 1 replies for 2 prompts"):
        run_episodes(["p", "q"], long, short)


def test_turn_cap_ends_an_episode_as_wrong():
    long = ScriptedBackend(["<think>\nx\n</think>"] * 3)
    short = ScriptedBackend(["<answer>more</rethink>"] * 3)
    (ep,) = run_episodes(["p"], long, short, max_turns=4)
    assert ep.stop_reason == "turn_cap" and ep.answer is None and len(ep.turns) == 4


class BudgetedBackend(ScriptedBackend):
    """Writes each scripted turn, cut at the cap it is given (one token per word), and records the caps."""

    def __init__(self, turns):
        super().__init__(turns)
        self.caps = []

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0):
        caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self.caps.append(caps)
        out = []
        for _, cap in zip(prompts, caps, strict=True):
            words = self.turns.pop(0).split(" ")
            text, cut = " ".join(words[:cap]), len(words) > cap
            out.append([Completion(text, min(cap, len(words)), "length" if cut else "stop")])
        return out


def test_an_episode_budget_caps_each_turn_at_what_is_left_and_ends_the_episode_there():
    """RL's rollout cap L_R: the turns together never pass max_episode_tokens; an episode cut off there
    stops as "token_cap" with no answer, while one that answers inside the budget is untouched."""
    long = BudgetedBackend(["<think>\na b c d e\n</think>", "<think>\nf g\n</think>", "<think>\nh i j k l m n\n</think>"])
    short = BudgetedBackend(["<answer>go on</rethink>", "<answer>\\boxed{2}</answer>"])
    # the first episode spends 5 + 2 tokens, then its second long turn (7 words) is cut at 12 - 7 = 5
    eps = run_episodes(["p", "q"], long, short, max_turns=6, max_episode_tokens=12)
    assert long.caps[0] == [12, 12] and short.caps[0] == [7, 10]
    first, second = eps
    assert first.stop_reason == "token_cap" and first.answer is None and first.error is None
    assert first.tokens() == 12 and [t.n_tokens for t in first.turns] == [5, 2, 5]
    assert second.stop_reason == "answer" and second.answer == "2" and second.tokens() == 2 + 1
    assert long.caps[1] == [5]  # only the first episode was still running


def test_an_episode_that_reaches_its_budget_on_a_handback_ends_there():
    long = BudgetedBackend(["<think>\na b\n</think>"])
    short = BudgetedBackend(["<answer>go on</rethink>"])
    (ep,) = run_episodes(["p"], long, short, max_turns=6, max_episode_tokens=4)
    assert ep.stop_reason == "token_cap" and ep.tokens() == 4 and len(ep.turns) == 2
    with pytest.raises(ValueError, match="max_episode_tokens must be at least 1"):
        run_episodes(["p"], long, short, max_episode_tokens=0)


def test_malformed_turn_stops_the_episode():
    long = ScriptedBackend(["<think>\nno close"])
    short = ScriptedBackend([])
    (ep,) = run_episodes(["p"], long, short)
    assert ep.stop_reason == "malformed" and "</think>" in ep.error
