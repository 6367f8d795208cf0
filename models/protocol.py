"""The Long⊗Short turn protocol (DESIGN §2).

An episode alternates two models on one problem:

* long-thought turn:  ``<think>\\n … \\n</think>``
* short-thought turn: ``<answer> … </rethink>`` hands control back to the long model,
  ``<answer> … \\boxed{X} … </answer>`` ends the episode.

Turns are joined by a newline into one transcript that both models see after
their own chat prompt. A single long-CoT model writes the same format in one
go: ``<think>\\n…\\n</think>\\n<answer>…</answer>``. This module is the only place
that knows the tags; data building, RL rollouts, evaluation and ``longshort solve``
all go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from models.generation import GenerationBackend

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE, RETHINK = "<answer>", "</answer>", "</rethink>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, RETHINK)
TURN_SEP = "\n"

Role = Literal["long", "short", "base"]

SYSTEM_PROMPTS: dict[str, str] = {
    "base": "Solve the problem. Think inside <think> </think>, then answer inside <answer> </answer> with \\boxed{}.",
    "long": "You are the long-thought model. Write the important reasoning inside <think> </think>.",
    "short": "You are the short-thought model. Be brief. End with </rethink> to hand back, or \\boxed{} and </answer>.",
}
STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "long": (THINK_CLOSE,),
    "short": (RETHINK, ANSWER_CLOSE),
    "base": (ANSWER_CLOSE,),
}


class ProtocolError(ValueError):
    """A turn or transcript that breaks the protocol."""


@dataclass(frozen=True)
class ParsedTurn:
    kind: Literal["think", "rethink", "final"]
    body: str
    answer: str | None = None  # boxed content of a final turn


def format_long_turn(body: str) -> str:
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}"


def format_short_turn(body: str, final: bool) -> str:
    return f"{ANSWER_OPEN}{body}{ANSWER_CLOSE if final else RETHINK}"


def format_response(thinking: str, answer: str) -> str:
    """A single long-CoT model's response: all thinking, then the answer."""
    return format_long_turn(thinking) + TURN_SEP + format_short_turn(answer, final=True)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{") : i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def _check_no_tags(body: str, where: str) -> None:
    for tag in TAGS:
        if tag in body:
            raise ProtocolError(f"{where}: unexpected {tag} inside the turn")


def parse_turn(role: Literal["long", "short"], text: str) -> ParsedTurn:
    """Parse one generated turn; raise ProtocolError naming what is wrong."""
    t = text.strip()
    if role == "long":
        if not t.startswith(THINK_OPEN):
            raise ProtocolError(f"long turn must start with {THINK_OPEN}, got {t[:20]!r}")
        if not t.endswith(THINK_CLOSE):
            raise ProtocolError(f"long turn has no closing {THINK_CLOSE}")
        body = t[len(THINK_OPEN) : -len(THINK_CLOSE)]
        _check_no_tags(body, "long turn")
        return ParsedTurn("think", body.strip("\n"))
    if not t.startswith(ANSWER_OPEN):
        raise ProtocolError(f"short turn must start with {ANSWER_OPEN}, got {t[:20]!r}")
    if t.endswith(RETHINK):
        body = t[len(ANSWER_OPEN) : -len(RETHINK)]
        _check_no_tags(body, "short turn")
        return ParsedTurn("rethink", body)
    if t.endswith(ANSWER_CLOSE):
        body = t[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
        _check_no_tags(body, "short turn")
        return ParsedTurn("final", body, extract_boxed(body))
    raise ProtocolError(f"short turn ends with neither {RETHINK} nor {ANSWER_CLOSE}")


def split_turns(transcript: str) -> list[str]:
    """Cut a transcript into turn texts at each opening tag, keeping the text exact."""
    cuts = []
    i = 0
    while i < len(transcript):
        j_think = transcript.find(THINK_OPEN, i)
        j_ans = transcript.find(ANSWER_OPEN, i)
        js = [j for j in (j_think, j_ans) if j != -1]
        if not js:
            break
        j = min(js)
        cuts.append(j)
        i = j + 1
    if not cuts:
        raise ProtocolError("transcript has no <think> or <answer> turn")
    if transcript[: cuts[0]].strip():
        raise ProtocolError(f"text before the first turn: {transcript[: cuts[0]][:30]!r}")
    bounds = cuts + [len(transcript)]
    return [transcript[a:b] for a, b in pairwise(bounds)]


def parse_transcript(transcript: str) -> list[ParsedTurn]:
    """Parse a whole episode (or a single model's response).

    The turns must alternate think/answer, every ``<answer>`` but the last must
    hand back with ``</rethink>``, and the last must be a final ``</answer>``.
    """
    turns = []
    for k, text in enumerate(split_turns(transcript)):
        role = "long" if text.startswith(THINK_OPEN) else "short"
        try:
            turns.append(parse_turn(role, text))
        except ProtocolError as exc:
            raise ProtocolError(f"turn {k + 1}: {exc}") from None
    for k, (a, b) in enumerate(pairwise(turns)):
        if (a.kind == "think") == (b.kind == "think"):
            raise ProtocolError(f"turns {k + 1} and {k + 2}: consecutive turns of the same model")
        if a.kind == "final":
            raise ProtocolError(f"turn {k + 1}: </answer> before the end of the episode")
    if turns[-1].kind != "final":
        raise ProtocolError("episode does not end with </answer>")
    return turns


def parse_response(response: str) -> tuple[str, ParsedTurn]:
    """A single model's response -> (thinking, final answer turn)."""
    turns = parse_transcript(response)
    if len(turns) != 2 or turns[0].kind != "think":
        raise ProtocolError(f"expected one <think> turn then one <answer> turn, got {len(turns)} turns")
    return turns[0].body, turns[1]


def answer_prefix(thinking: str) -> str:
    """The assistant text that forces an answer after (possibly partial) thinking."""
    return format_long_turn(thinking) + TURN_SEP


# --------------------------------------------------------------------------- episodes


@dataclass
class Turn:
    role: Literal["long", "short"]
    text: str
    n_tokens: int


@dataclass
class Episode:
    problem: str
    turns: list[Turn] = field(default_factory=list)
    answer: str | None = None
    stop_reason: Literal["answer", "turn_cap", "token_cap", "malformed", "running"] = "running"
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason != "running"

    @property
    def transcript(self) -> str:
        return TURN_SEP.join(t.text for t in self.turns)

    def tokens(self, role: str | None = None) -> int:
        return sum(t.n_tokens for t in self.turns if role is None or t.role == role)

    @property
    def well_formed(self) -> bool:
        return self.stop_reason == "answer"


def history_suffix(turns: Sequence[Turn]) -> str:
    """What follows the chat prompt before the next turn is generated."""
    return "".join(t.text + TURN_SEP for t in turns)


def run_episodes(
    problems: Sequence[str],
    long_model: GenerationBackend,
    short_model: GenerationBackend,
    *,
    max_turns: int = 6,
    max_new_tokens_long: int = 512,
    max_new_tokens_short: int = 128,
    max_episode_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[Episode]:
    """Run Long⊗Short episodes for a batch of problems, turn by turn.

    The long model opens; turns alternate until a short turn ends with
    ``</answer>``, a turn breaks the protocol, ``max_turns`` is reached, or the
    episode has used ``max_episode_tokens`` (long + short; each turn is capped at
    what is left, so an episode never generates more: RL's rollout cap L_R). An
    episode without ``</answer>`` is wrong. Each round is one batched generation
    call over the episodes still running.
    """
    if max_episode_tokens is not None and max_episode_tokens < 1:
        raise ValueError(f"run_episodes: max_episode_tokens must be at least 1, got {max_episode_tokens}")
    episodes = [Episode(p) for p in problems]
    for turn_idx in range(max_turns):
        role: Literal["long", "short"] = "long" if turn_idx % 2 == 0 else "short"
        active = [e for e in episodes if not e.done]
        if not active:
            break
        backend = long_model if role == "long" else short_model
        prompts = [
            backend.chat_prompt(SYSTEM_PROMPTS[role], e.problem) + history_suffix(e.turns) for e in active
        ]
        turn_cap = max_new_tokens_long if role == "long" else max_new_tokens_short
        caps: int | list[int] = (
            turn_cap if max_episode_tokens is None else [min(turn_cap, max_episode_tokens - e.tokens()) for e in active]
        )
        outs = backend.generate(
            prompts,
            max_new_tokens=caps,
            stop=STOP_STRINGS[role],
            temperature=temperature,
            top_p=top_p,
            seed=seed + turn_idx,
        )
        if len(outs) != len(prompts):
            raise RuntimeError(
                f"turn {turn_idx + 1}: the {role} model returned {len(outs)} replies for {len(prompts)} prompts"
            )
        for episode, out in zip(active, outs, strict=True):
            completion = out[0]
            episode.turns.append(Turn(role, completion.text, completion.n_tokens))
            spent = max_episode_tokens is not None and episode.tokens() >= max_episode_tokens
            try:
                parsed = parse_turn(role, completion.text)
            except ProtocolError as exc:
                # a turn cut off by the episode's budget is the budget's doing, not a protocol error
                cut = spent and completion.finish_reason == "length"
                episode.stop_reason, episode.error = ("token_cap", None) if cut else ("malformed", str(exc))
                continue
            if parsed.kind == "final":
                episode.stop_reason, episode.answer = "answer", parsed.answer
            elif spent:
                episode.stop_reason = "token_cap"
    for episode in episodes:
        if not episode.done:
            episode.stop_reason = "turn_cap"
    return episodes
