"""Cold start: turn scored long-CoT traces into Long⊗Short episodes (DESIGN §3, Cold start).

A thought with importance ``s_k >= theta`` is *important*: it stays verbatim in
a long-thought turn. Every other thought is compressed into a short-thought
turn. Consecutive thoughts of one kind merge into one turn, so an episode
alternates long and short turns::

    <think>\\n{important thoughts, exactly as in the trace}\\n</think>
    <answer>{terse form of the unimportant thoughts}</rethink>
    ...
    <answer>{terse form of the last unimportant thoughts} The final number is \\boxed{X}.</answer>

The long model always opens (an episode whose first thought is unimportant
starts with the empty long turn ``<think>\\n\\n</think>``) and the short model
always ends with the boxed reference answer. Every episode is checked with
``models.protocol.parse_transcript`` before it is kept.

Each turn becomes one SFT example for its model: D_long holds the ``<think>``
turns, D_short the ``<answer>`` turns, each with the transcript that precedes it
(``models.protocol.history_suffix``), so that training sees exactly the prompt
``run_episodes`` builds at inference: chat prompt(system[role], problem) + history.

Scored traces are ``{id, problem, answer, thoughts: [str], importance: [float]}``
where ``"".join(thoughts)`` is the thinking (the contract of
``tasks.chunking.chunk_trace``: each thought keeps the blank line after it).
Compressors map a batch of thought texts to terse texts: the demo teacher's own
terse forms, a model prompted to rewrite tersely, or the text verbatim.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transformers import PreTrainedTokenizerBase

from longshort.config import DEFAULT_FINAL_ANSWER_TEMPLATE, ColdStartConfig
from longshort.io import write_jsonl
from tasks.chunking import thinking_of
from models.protocol import (
    ANSWER_OPEN,
    STOP_STRINGS,
    SYSTEM_PROMPTS,
    TAGS,
    THINK_CLOSE,
    THINK_OPEN,
    TURN_SEP,
    ProtocolError,
    Turn,
    answer_prefix,
    format_long_turn,
    format_response,
    format_short_turn,
    history_suffix,
    parse_transcript,
)

if TYPE_CHECKING:
    from models.generation import GenerationBackend

log = logging.getLogger(__name__)

Compressor = Callable[[list[str]], list[str]]
"""A batch of thought texts -> their terse forms, in order."""

COMPRESSOR_PROMPT = (
    "Rewrite the given step of a chain of thought as tersely as possible. Keep every number, "
    "intermediate result and decision; drop restatements, hedging and filler words. "
    "Answer with the terse text only."
)
# A blank line separates paragraphs (the chunker's steps); see tasks.chunking._STEP_SEP.
_PARAGRAPH_SEP = re.compile(r"\n(?:[ \t\r]*\n)+")


@dataclass(frozen=True)
class ColdStartStats:
    n_episodes: int
    n_long: int  # rows in D_long
    n_short: int  # rows in D_short
    chars_long: int  # completion characters in D_long
    chars_short: int  # completion characters in D_short
    turns_per_episode: float  # mean
    turns_histogram: dict[int, int]  # number of turns -> episodes
    important_fraction: float  # thoughts with s_k >= theta / all thoughts
    trace_chars: int  # the long-CoT responses: <think>all thoughts</think><answer>final</answer>
    episode_chars: int  # the episodes' transcripts
    char_reduction: float  # 1 - episode_chars / trace_chars
    trace_tokens: int | None = None  # as trace_chars, in tokens, when a token counter is given
    episode_tokens: int | None = None
    token_reduction: float | None = None
    n_over_max_turns: int = 0  # episodes left out: more turns than inference allows (protocol.max_turns), even fitted
    n_fitted_to_max_turns: int = 0  # episodes whose least important runs became short turns to fit protocol.max_turns
    n_over_turn_tokens: int = 0  # episodes with a turn longer than its protocol.max_new_tokens_* cap (kept, warned)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- compressors


class UnknownThoughtError(KeyError):
    """The demo terse lookup was asked for a thought the teacher never wrote."""

    def __init__(self, index: int, text: str) -> None:
        super().__init__(index, text)
        self.index = index  # position in the compressor's batch
        self.text = text

    def __str__(self) -> str:
        return f"the demo teacher has no terse form for thought {self.text[:60]!r}"


class DemoTerseCompressor:
    """The demo teacher's own terse forms, looked up by thought text.

    Reads only ``text`` and ``terse`` of the rows' teacher thoughts; the hidden
    ``essential`` label is never touched. A thought that spans several teacher
    paragraphs (a chunk merged from several steps) gets their terse forms joined
    by a space.
    """

    def __init__(self, terse_of: dict[str, str]) -> None:
        self.terse_of = terse_of

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> DemoTerseCompressor:
        terse_of: dict[str, str] = {}
        for i, row in enumerate(rows):
            teacher = row.get("thoughts")
            where = f"row {i} (id {row.get('id')!r})"
            if not isinstance(teacher, list) or not all(isinstance(t, dict) for t in teacher):
                raise ValueError(f"{where}: field 'thoughts' must be the demo teacher's list of objects")
            for k, thought in enumerate(teacher):
                text, terse = thought.get("text"), thought.get("terse")
                if not isinstance(text, str) or not isinstance(terse, str):
                    raise ValueError(f"{where}: thoughts[{k}] needs string fields 'text' and 'terse'")
                if terse_of.setdefault(text.strip(), terse) != terse:
                    raise ValueError(f"{where}: thoughts[{k}] has two terse forms for one text {text[:40]!r}")
        return cls(terse_of)

    def __call__(self, texts: list[str]) -> list[str]:
        out = []
        for i, text in enumerate(texts):
            parts = [p.strip() for p in _PARAGRAPH_SEP.split(text) if p.strip()]
            missing = [p for p in parts if p not in self.terse_of]
            if missing:
                raise UnknownThoughtError(i, missing[0])
            out.append(" ".join(self.terse_of[p] for p in parts))
        return out


def verbatim_compressor(texts: list[str]) -> list[str]:
    """No compression: the short turn repeats the thought (an ablation baseline)."""
    return [t.strip() for t in texts]


def clean_terse(text: str) -> str:
    """A model's rewrite, made safe for a short turn: after any ``</think>``, without protocol tags."""
    if THINK_CLOSE in text:
        text = text[text.rfind(THINK_CLOSE) + len(THINK_CLOSE) :]
    for tag in TAGS:
        text = text.replace(tag, "")
    return text.strip()


class ModelCompressor:
    """Prompts a generation backend to rewrite each thought tersely, in one batched call.

    The model (the run's long-CoT base) opens every reply with ``<think>``, so its reply is started for
    it with an empty thinking turn and ``<answer>`` (``answer_prefix("")``) and stops at ``</answer>``:
    the rewrite is its answer. A rewrite cut off by ``max_new_tokens``, or empty, is no terse form of the
    thought: the thought stays verbatim (counted in a warning)."""

    def __init__(
        self, backend: GenerationBackend, system_prompt: str = COMPRESSOR_PROMPT, max_new_tokens: int = 256,
        seed: int = 0,
    ) -> None:  # fmt: skip
        self.backend = backend
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    def __call__(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        opening = answer_prefix("") + ANSWER_OPEN
        prompts = [self.backend.chat_prompt(self.system_prompt, t.strip()) + opening for t in texts]
        outs = self.backend.generate(
            prompts, max_new_tokens=self.max_new_tokens, stop=STOP_STRINGS["base"], temperature=0.0, seed=self.seed
        )
        terse, kept, empty = [], 0, 0
        for text, (out,) in zip(texts, outs, strict=True):
            rewrite = clean_terse(out.text) if out.finish_reason == "stop" else ""
            kept += out.finish_reason != "stop"
            empty += out.finish_reason == "stop" and not rewrite
            terse.append(rewrite or text.strip())
        if kept or empty:
            log.warning(
                "cold start: %d of %d compressions hit max_new_tokens=%d and %d were empty; those thoughts stay verbatim",
                kept, len(texts), self.max_new_tokens, empty,
            )  # fmt: skip
        return terse


def make_compressor(
    cfg: ColdStartConfig,
    rows: Sequence[dict[str, Any]] | None = None,
    backend: GenerationBackend | None = None,
    seed: int = 0,
) -> Compressor:
    """The configured compressor: ``demo_terse`` needs the demo rows, ``model`` a backend."""
    if cfg.compressor == "demo_terse":
        if rows is None:
            raise ValueError("cold_start.compressor is 'demo_terse' but no demo rows were given")
        return DemoTerseCompressor.from_rows(rows)
    if cfg.compressor == "model":
        if backend is None:
            raise ValueError("cold_start.compressor is 'model' but no generation backend was given")
        return ModelCompressor(backend, cfg.compressor_prompt or COMPRESSOR_PROMPT, cfg.max_new_tokens, seed=seed)
    return verbatim_compressor


# --------------------------------------------------------------------------- episodes


def runs(important: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of one kind: ``(first, end, important)`` with ``end`` exclusive."""
    out: list[tuple[int, int, bool]] = []
    for k, flag in enumerate(important):
        if out and out[-1][2] == flag:
            out[-1] = (out[-1][0], k + 1, flag)
        else:
            out.append((k, k + 1, flag))
    return out


def n_turns(important: Sequence[bool]) -> int:
    """How many turns :func:`episode_turns` makes of thoughts flagged ``important``: a turn per run, plus
    the empty long turn that opens before a first unimportant run and the final turn after a last important one."""
    if not important:
        return 2
    return len(runs(important)) + (not important[0]) + bool(important[-1])


def fit_to_turns(importance: Sequence[float], theta: float, max_turns: int) -> list[bool]:
    """Which thoughts stay long so that the episode has at most ``max_turns`` turns: those with s_k >= theta,
    less the important runs of least total importance (the later one on a tie), turned into short thoughts
    one at a time until the episode fits. Real traces have dozens of thoughts, and Monte Carlo noise scatters
    important ones among them: left out instead, most episodes would be (with 8 rollouts, θ = 0.1 and 6
    turns, most LIMO traces). An episode that cannot fit (``max_turns`` < 2) ends with every thought short,
    still over the cap: the caller leaves it out."""
    important = [s >= theta for s in importance]
    while n_turns(important) > max_turns and any(important):
        candidates = [(a, b) for a, b, flag in runs(important) if flag]
        a, b = min(reversed(candidates), key=lambda run: sum(importance[run[0] : run[1]]))
        important[a:b] = [False] * (b - a)
    return important


def episode_turns(
    thoughts: Sequence[str],
    importance: Sequence[float],
    theta: float,
    terse_texts: Sequence[str | None],
    answer: str,
    final_answer_template: str = DEFAULT_FINAL_ANSWER_TEMPLATE,
    important: Sequence[bool] | None = None,
) -> list[str]:
    """The turn texts of one episode.

    ``terse_texts[k]`` is the terse form of thought k (read only for thoughts with
    ``importance[k] < theta``). A run of important thoughts becomes one long turn,
    its texts joined exactly as in the trace (``"".join``; only the blank lines
    at the run's edges are dropped). A run of unimportant thoughts becomes one
    short turn, their terse forms joined by a space. The long model opens (with
    an empty long turn if the first run is unimportant); the last unimportant
    run is folded into the final answer turn, or a final turn is added after a
    last important run. ``important`` (e.g. from :func:`fit_to_turns`) replaces ``s_k >= theta`` as the flags.
    """
    if not (len(thoughts) == len(importance) == len(terse_texts)):
        raise ValueError(
            f"{len(thoughts)} thoughts, {len(importance)} importance values and {len(terse_texts)} terse texts"
        )
    final_text = final_answer_template.format(answer=answer)
    turns: list[str] = []
    flags = [s >= theta for s in importance] if important is None else list(important)
    if len(flags) != len(thoughts):
        raise ValueError(f"{len(thoughts)} thoughts and {len(flags)} importance flags")
    for k, (a, b, long_run) in enumerate(runs(flags)):
        if long_run:
            turns.append(format_long_turn("".join(thoughts[a:b]).strip()))
            continue
        if k == 0:
            turns.append(format_long_turn(""))
        terse = " ".join(t.strip() for t in terse_texts[a:b] if t and t.strip())
        if b == len(thoughts):
            turns.append(format_short_turn(f"{terse} {final_text}" if terse else final_text, final=True))
        else:
            turns.append(format_short_turn(terse, final=False))
    if not turns:
        turns.append(format_long_turn(""))
    if turns[-1].startswith(THINK_OPEN):
        turns.append(format_short_turn(final_text, final=True))
    return turns


def check_episode(turns: Sequence[str], answer: str, trace_id: str) -> None:
    """Raise ValueError naming the trace if the episode breaks the protocol or boxes another answer."""
    try:
        parsed = parse_transcript(TURN_SEP.join(turns))
    except ProtocolError as exc:
        raise ValueError(f"trace {trace_id!r}: cold-start episode breaks the protocol: {exc}") from None
    if parsed[0].kind != "think":
        raise ValueError(f"trace {trace_id!r}: cold-start episode does not open with a long turn")
    if parsed[-1].answer != answer.strip():
        raise ValueError(f"trace {trace_id!r}: episode boxes {parsed[-1].answer!r}, reference is {answer!r}")


# --------------------------------------------------------------------------- datasets


def _check_row(i: int, row: dict[str, Any]) -> tuple[str, list[str], list[float]]:
    trace_id = row.get("id")
    where = f"scored row {i} (id {trace_id!r})"
    for name in ("id", "problem", "answer"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ValueError(f"{where}: field '{name}' must be a non-empty string")
    thoughts, importance = row.get("thoughts"), row.get("importance")
    if not isinstance(thoughts, list) or not thoughts or not all(isinstance(t, str) for t in thoughts):
        raise ValueError(f"{where}: field 'thoughts' must be a non-empty list of strings (the thought texts)")
    if not isinstance(importance, list) or len(importance) != len(thoughts):
        n = len(importance) if isinstance(importance, list) else type(importance).__name__
        raise ValueError(f"{where}: field 'importance' must hold one number per thought ({len(thoughts)}), got {n}")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in importance):
        raise ValueError(f"{where}: field 'importance' must hold finite numbers")
    response = row.get("response")
    if isinstance(response, str) and "".join(thoughts) != thinking_of(response):
        raise ValueError(f"{where}: the thoughts joined with '' are not the thinking of its 'response'")
    return trace_id, thoughts, [float(s) for s in importance]


def build_cold_start(
    scored_rows: Sequence[dict[str, Any]],
    cfg: ColdStartConfig,
    compressor: Compressor,
    count_tokens: Callable[[str], int] | None = None,
    max_turns: int | None = None,
    max_turn_tokens: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], ColdStartStats]:
    """D_long, D_short and their statistics from scored traces.

    Inference ends an episode at ``max_turns`` turns (``protocol.max_turns``) and a turn at its cap
    (``max_turn_tokens``: ``protocol.max_new_tokens_long`` and ``_short``), without an answer: an episode
    that needs more would teach a shape that is always scored wrong. So an episode with more turns is
    fitted (:func:`fit_to_turns`: its least important runs of long thoughts become short ones). An episode
    with a turn over its cap (counted with ``count_tokens``; not checked without it) is kept, with a warning
    to raise the cap, and counted in the statistics: leaving it out could leave nothing to train on (a test
    profile's caps are far below its traces' turns), and a turn cannot be shortened without rewriting it.

    Each row is ``{id, turn, problem, role, history, completion}``: ``history`` is the
    transcript before turn ``turn`` (``history_suffix`` of the earlier turns),
    ``completion`` the turn itself. All unimportant thoughts of all traces go to
    the compressor in one batch. ``count_tokens`` (e.g. a backend's) adds token
    totals to the statistics.
    """
    checked = [_check_row(i, row) for i, row in enumerate(scored_rows)]
    scored = [[s >= cfg.theta for s in importance] for _, _, importance in checked]
    flags = [
        fit_to_turns(importance, cfg.theta, max_turns) if max_turns is not None else important
        for (_, _, importance), important in zip(checked, scored, strict=True)
    ]
    fitted = [trace_id for (trace_id, _, _), f, important in zip(checked, flags, scored, strict=True) if f != important]
    to_compress: list[tuple[int, int]] = []  # (row, thought) of every thought that goes to a short turn
    for i, kept in enumerate(flags):
        to_compress += [(i, k) for k, long_thought in enumerate(kept) if not long_thought]
    try:
        terse_batch = compressor([checked[i][1][k] for i, k in to_compress])
    except UnknownThoughtError as exc:
        i, k = to_compress[exc.index]
        raise ValueError(f"trace {checked[i][0]!r}, thought {k}: {exc}") from None
    if len(terse_batch) != len(to_compress):
        raise ValueError(f"compressor returned {len(terse_batch)} texts for {len(to_compress)} thoughts")
    terse: list[list[str | None]] = [[None] * len(thoughts) for _, thoughts, _ in checked]
    for (i, k), text in zip(to_compress, terse_batch, strict=True):
        terse[i][k] = text

    d_long: list[dict[str, Any]] = []
    d_short: list[dict[str, Any]] = []
    histogram: dict[int, int] = {}
    n_important = n_thoughts = trace_chars = episode_chars = trace_tokens = episode_tokens = 0
    over_cap: list[str] = []
    over_tokens: list[str] = []
    for row, (trace_id, thoughts, importance), terse_texts, kept in zip(scored_rows, checked, terse, flags, strict=True):
        turns = episode_turns(
            thoughts, importance, cfg.theta, terse_texts, row["answer"], cfg.final_answer_template, important=kept
        )
        check_episode(turns, row["answer"], trace_id)
        if max_turns is not None and len(turns) > max_turns:
            over_cap.append(trace_id)
            continue
        if max_turn_tokens is not None and count_tokens is not None and any(
            count_tokens(text) > max_turn_tokens[k % 2] for k, text in enumerate(turns)
        ):
            over_tokens.append(trace_id)
        history: list[Turn] = []
        for k, text in enumerate(turns):
            role: Literal["long", "short"] = "long" if k % 2 == 0 else "short"
            example = {"id": trace_id, "turn": k, "problem": row["problem"], "role": role,
                       "history": history_suffix(history), "completion": text}  # fmt: skip
            (d_long if role == "long" else d_short).append(example)
            history.append(Turn(role, text, 0))  # token counts play no part in the history text
        histogram[len(turns)] = histogram.get(len(turns), 0) + 1
        n_thoughts += len(thoughts)
        n_important += sum(s >= cfg.theta for s in importance)
        trace = format_response("".join(thoughts).strip(), cfg.final_answer_template.format(answer=row["answer"]))
        transcript = TURN_SEP.join(turns)
        trace_chars += len(trace)
        episode_chars += len(transcript)
        if count_tokens is not None:
            trace_tokens += count_tokens(trace)
            episode_tokens += count_tokens(transcript)

    if fitted:
        log.warning(
            "cold start: %d of %d episodes had more than protocol.max_turns=%d turns; their least important runs "
            "of long thoughts became short turns (first: %s)",
            len(fitted), len(checked), max_turns, ", ".join(fitted[:5]),
        )  # fmt: skip
    if over_cap:
        log.warning(
            "cold start: left out %d of %d episodes with more than protocol.max_turns=%d turns (first: %s)",
            len(over_cap), len(checked), max_turns, ", ".join(over_cap[:5]),
        )  # fmt: skip
    if over_tokens:
        assert max_turn_tokens is not None
        log.warning(
            "cold start: %d of %d episodes have a turn longer than its cap, protocol.max_new_tokens_long=%d or "
            "protocol.max_new_tokens_short=%d tokens, which inference would cut off: raise the cap (first: %s)",
            len(over_tokens), len(checked), *max_turn_tokens, ", ".join(over_tokens[:5]),
        )  # fmt: skip
    if checked and len(over_cap) == len(checked):
        raise ValueError(f"cold start: every episode has more than protocol.max_turns={max_turns} turns")
    n = len(checked) - len(over_cap)
    stats = ColdStartStats(
        n_over_max_turns=len(over_cap),
        n_fitted_to_max_turns=len(fitted),
        n_over_turn_tokens=len(over_tokens),
        n_episodes=n,
        n_long=len(d_long),
        n_short=len(d_short),
        chars_long=sum(len(r["completion"]) for r in d_long),
        chars_short=sum(len(r["completion"]) for r in d_short),
        turns_per_episode=(len(d_long) + len(d_short)) / n if n else 0.0,
        turns_histogram=dict(sorted(histogram.items())),
        important_fraction=n_important / n_thoughts if n_thoughts else 0.0,
        trace_chars=trace_chars,
        episode_chars=episode_chars,
        char_reduction=1.0 - episode_chars / trace_chars if trace_chars else 0.0,
        trace_tokens=trace_tokens if count_tokens else None,
        episode_tokens=episode_tokens if count_tokens else None,
        token_reduction=(1.0 - episode_tokens / trace_tokens if trace_tokens else 0.0) if count_tokens else None,
    )
    log.info(
        "cold start: %d episodes -> %d long, %d short examples; %.1f turns/episode; %.0f%% thoughts important; "
        "%.0f%% fewer characters than the traces",
        n, stats.n_long, stats.n_short, stats.turns_per_episode, 100 * stats.important_fraction,
        100 * stats.char_reduction,
    )  # fmt: skip
    return d_long, d_short, stats


def pair_sft_examples(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], role: Literal["long", "short"]
) -> list[dict[str, str]]:
    """``[{prompt, completion}]`` for ``tasks.sft.train_sft``.

    prompt = chat prompt(SYSTEM_PROMPTS[role], problem) + history: the same text
    ``run_episodes`` feeds the model before this turn (see tasks.base_model.base_sft_examples).
    """
    examples = []
    for i, row in enumerate(rows):
        if row.get("role") != role:
            raise ValueError(f"row {i} (id {row.get('id')!r}): role {row.get('role')!r} in a {role!r} dataset")
        chat = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPTS[role]}, {"role": "user", "content": row["problem"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        examples.append({"prompt": chat + row["history"], "completion": row["completion"]})
    return examples


def write_cold_start(
    out_dir: Path, d_long: Sequence[dict[str, Any]], d_short: Sequence[dict[str, Any]]
) -> tuple[Path, Path]:
    """Write ``d_long.jsonl`` and ``d_short.jsonl`` atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = out_dir / "d_long.jsonl", out_dir / "d_short.jsonl"
    write_jsonl(paths[0], d_long)
    write_jsonl(paths[1], d_short)
    return paths
