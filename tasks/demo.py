"""The built-in demo task (DESIGN §6): arithmetic chains and an R1-style teacher.

A problem starts from a number and applies a few numbered additions and
subtractions. The teacher writes a verbose long chain of thought the way
R1-distilled models do: it restates the problem, plans, sometimes takes a detour
it then corrects, does the one essential computation, and then double-checks
it several times. Each thought carries a hidden ``essential`` label that no
training stage reads; evaluation uses it to measure how well Monte Carlo
scoring finds the essential thoughts. Each thought also has a terse form, the
way a short-thought model would say it.

Everything is a pure function of the config and its seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

from longshort.config import ConfigError, DemoTaskConfig
from models.protocol import format_response

NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
VERB = {"+": "add", "-": "subtract"}


@dataclass(frozen=True)
class DemoProblem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def id(self) -> str:
        key = f"{self.start}|" + ",".join(f"{s}{v}" for s, v in self.ops)
        return "demo-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    @property
    def text(self) -> str:
        steps = ", ".join(f"({i + 1}) {VERB[s]} {v}" for i, (s, v) in enumerate(self.ops))
        return f"Start with {self.start}. Then {steps}. What is the final number?"

    def values(self) -> list[int]:
        """The running values: start, after op 1, ..., after the last op."""
        out = [self.start]
        for sign, v in self.ops:
            out.append(out[-1] + v if sign == "+" else out[-1] - v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]


@dataclass(frozen=True)
class Thought:
    kind: str  # restate | plan | detour | compute | verify | backcheck | conclude
    text: str
    terse: str
    essential: bool


def sample_problem(rng: random.Random, cfg: DemoTaskConfig) -> DemoProblem:
    """A chain whose running value stays within [0, max_value]."""
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    value = rng.randint(0, cfg.max_value)
    start = value
    ops: list[tuple[str, int]] = []
    for _ in range(n_ops):
        choices = [("+", v) for v in range(1, cfg.max_operand + 1) if value + v <= cfg.max_value]
        choices += [("-", v) for v in range(1, cfg.max_operand + 1) if value - v >= 0]
        sign, v = rng.choice(choices)
        value = value + v if sign == "+" else value - v
        ops.append((sign, v))
    return DemoProblem(start, tuple(ops))


def count_problems(cfg: DemoTaskConfig) -> int:
    """How many distinct problems ``sample_problem`` can draw: chains of ``min_ops..max_ops`` operations
    (operands ``1..max_operand``) whose running value stays within ``[0, max_value]``, from every start."""
    values = range(cfg.max_value + 1)
    moves = [v for v in range(-cfg.max_operand, cfg.max_operand + 1) if v]
    chains = [1] * len(values)  # chains[v]: the chains of the current length that start at v
    total = 0
    for n_ops in range(1, cfg.max_ops + 1):
        chains = [sum(chains[v + m] for m in moves if 0 <= v + m <= cfg.max_value) for v in values]
        if n_ops >= cfg.min_ops:
            total += sum(chains)
    return total


def _too_many(cfg: DemoTaskConfig, possible: int, detail: str) -> ConfigError:
    return ConfigError(
        f"demo task: cannot draw {cfg.n_train}+{cfg.n_heldout} distinct problems with max_value={cfg.max_value}, "
        f"max_operand={cfg.max_operand}, ops {cfg.min_ops}..{cfg.max_ops}: data.demo.n_train + n_heldout = "
        f"{cfg.n_train + cfg.n_heldout} but {detail} (lower n_train/n_heldout or raise max_value/max_operand/max_ops)"
    )


def generate_splits(cfg: DemoTaskConfig) -> tuple[list[DemoProblem], list[DemoProblem]]:
    """Disjoint train and held-out problems. Held-out is drawn first, so growing
    ``n_train`` never changes the held-out set.

    Asking for more problems than the settings allow is a ConfigError naming the fields."""
    possible = count_problems(cfg)
    if cfg.n_train + cfg.n_heldout > possible:
        raise _too_many(cfg, possible, f"the settings allow only {possible} distinct problems")
    rng = random.Random(cfg.seed)
    seen: set[DemoProblem] = set()
    heldout: list[DemoProblem] = []
    train: list[DemoProblem] = []
    attempts = 0
    limit = 200 * (cfg.n_train + cfg.n_heldout)
    while len(heldout) < cfg.n_heldout or len(train) < cfg.n_train:
        attempts += 1
        if attempts > limit:  # possible, but too close to all of them to draw at random
            raise _too_many(
                cfg, possible, f"only {len(seen)} of the {possible} distinct problems turned up in {limit} random draws"
            )
        p = sample_problem(rng, cfg)
        if p in seen:
            continue
        seen.add(p)
        (heldout if len(heldout) < cfg.n_heldout else train).append(p)
    return train, heldout


def _op_text(sign: str, v: int) -> str:
    return f"{VERB[sign]} {v}"


def _eq(a: int, sign: str, v: int, b: int) -> str:
    return f"{a} {sign} {v} = {b}"


def _step(i: int, problem: DemoProblem, vals: list[int]) -> str:
    """``(2) add 5: 13 + 5 = 18`` — the step names its operation the way the problem does,
    so a small model finds what to compute by matching ``(2)`` in the problem."""
    sign, v = problem.ops[i]
    return f"({i + 1}) {_op_text(sign, v)}: {_eq(vals[i], sign, v, vals[i + 1])}"


def teacher_thoughts(problem: DemoProblem, rng: random.Random, cfg: DemoTaskConfig) -> list[Thought]:
    """An R1-style long trace, one thought per paragraph."""
    vals = problem.values()
    n = len(problem.ops)
    thoughts = [
        Thought(
            "restate",
            f"Okay, so we start with {problem.start} and we have to apply {NUMBER_WORDS[n - 1]} operations, "
            "one after the other, in the order they are given. We need the final number.",
            f"Start {problem.start}, {NUMBER_WORDS[n - 1]} ops.",
            False,
        ),
        Thought(
            "plan",
            "So the plan is to go through the operations one at a time, keeping a running value.",
            "Go in order.",
            False,
        ),
    ]
    if rng.random() < cfg.detour_rate:
        if rng.random() < 0.5:
            text = (
                "Hmm, maybe I should do the subtractions first and the additions later? "
                "No, that is not allowed, the operations have to be applied in the given order."
            )
        else:
            text = (
                "Hmm, maybe I can just add up all the numbers in the problem? "
                "But no, some of the operations are subtractions, so that would be wrong."
            )
        thoughts.append(Thought("detour", text, "Not that way.", False))
    steps = " ".join(_step(i, problem, vals) + "." for i in range(n))
    thoughts.append(Thought("compute", f"Let me compute step by step. {steps}", steps, True))
    checked = [i for i in range(n) if rng.random() < cfg.verify_rate] or [n - 1]
    for i in checked:
        thoughts.append(
            Thought(
                "verify",
                f"Wait, let me double-check step {_step(i, problem, vals)}. Yes, that is right.",
                "Checked.",
                False,
            )
        )
    back = []
    for i in range(n - 1, -1, -1):
        s, v = problem.ops[i]
        inv = "-" if s == "+" else "+"
        back.append(f"({i + 1}) {_eq(vals[i + 1], inv, v, vals[i])}")
    thoughts.append(
        Thought(
            "backcheck",
            f"Let me verify by undoing the steps backwards: {', '.join(back)}. "
            f"That matches the start, {problem.start}.",
            "Backwards ok.",
            False,
        )
    )
    thoughts.append(
        Thought("conclude", f"So the answer is {problem.answer}.", f"Answer {problem.answer}.", False)
    )
    return thoughts


def answer_text(answer: int) -> str:
    return f"The final number is \\boxed{{{answer}}}."


def teacher_row(problem: DemoProblem, cfg: DemoTaskConfig) -> dict:
    """One training row: the public fields the pipeline reads plus the hidden labels."""
    # Seed per problem so a row does not depend on which other rows were generated.
    rng = random.Random(f"{cfg.seed}:{problem.id}")
    thoughts = teacher_thoughts(problem, rng, cfg)
    response = format_response("\n\n".join(t.text for t in thoughts), answer_text(problem.answer))
    return {
        "id": problem.id,
        "problem": problem.text,
        "answer": str(problem.answer),
        "response": response,
        "thoughts": [asdict(t) for t in thoughts],  # hidden: evaluation only
    }


def demo_rows(cfg: DemoTaskConfig) -> tuple[list[dict], list[dict]]:
    train, heldout = generate_splits(cfg)
    return [teacher_row(p, cfg) for p in train], [teacher_row(p, cfg) for p in heldout]
