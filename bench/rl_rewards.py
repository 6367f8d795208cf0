"""The RL efficiency rewards side by side, from one SFT pair: held-out accuracy and tokens per variant.

    .venv/bin/python bench/rl_rewards.py [--profile demo] [--efficiency kimi,truncation,laser,laser-d]
                                         [--temperature 0.5,1.0] [--set section.field=value ...] [--json OUT]

Runs ``flows.pipeline.pipeline`` (what ``longshort run`` runs) once per variant, each in a fresh Python
process, with ``--set rl.efficiency=NAME`` (and ``rl.temperature=T`` when ``--temperature`` is given) on top of
the profile and the common ``--set`` overrides. Everything but the RL settings is the same, so after a
``make run`` every stage before RL comes from the cache and each variant computes only RL, the evaluation and
the registration: on the demo, about three minutes per variant on two cores.

Each variant is its own MLflow run in the profile's experiment (compare them in the UI: the runs differ only in
``rl.efficiency`` / ``rl.temperature``) and registers a candidate ``longshort-pair`` version; nothing is promoted.
To keep them out of the profile's workspace, pass ``--set run.workspace=DIR`` (then the first variant trains
everything before RL too).

The table gives, per variant, the RL pair on the held-out problems (accuracy, its difference to the long-CoT
base in points, mean tokens long + short and their share of the base's, turns), the reward, tokens and accuracy
on the fixed probe batch before and after RL (the reward's scale depends on the efficiency reward, so compare it
within a row), the RL stage's seconds, and whether the row meets issue 3's target: accuracy within 2 points of
the base with at most 30% of its tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import REPO, run_once  # bench/pipeline.py: one pipeline run in a fresh process, its summary back

sys.path.insert(0, str(REPO))
from longshort.config import HELDOUT  # noqa: E402

MAX_ACCURACY_DROP = 0.02  # issue 3: within 2 points of the base
MAX_TOKEN_SHARE = 0.30  # issue 3: at most 30% of the base's tokens


@dataclass(frozen=True)
class Row:
    variant: str
    accuracy: float
    accuracy_delta: float  # RL pair - base, as a fraction
    tokens: float
    tokens_long: float
    tokens_short: float
    token_share: float  # RL pair / base
    turns: float
    probe_reward_start: float | None  # the fixed probe batch before the first step / after the last
    probe_reward_end: float | None
    probe_tokens_start: float | None
    probe_tokens_end: float | None
    probe_accuracy_start: float | None
    probe_accuracy_end: float | None
    rl_time_s: float | None
    recomputed: list[str]

    @property
    def meets_target(self) -> bool:
        return self.accuracy_delta >= -MAX_ACCURACY_DROP and self.token_share <= MAX_TOKEN_SHARE


def row_from_summary(variant: str, summary: dict) -> Row:
    """One table row from the summary ``flows.pipeline.pipeline`` returns."""
    m = summary["metrics"]
    base, rl = f"{HELDOUT}.long_cot_base", f"{HELDOUT}.long_short_rl"
    return Row(
        variant=variant,
        accuracy=m[f"{rl}.accuracy"],
        accuracy_delta=m[f"{rl}.accuracy"] - m[f"{base}.accuracy"],
        tokens=m[f"{rl}.mean_tokens"],
        tokens_long=m[f"{rl}.mean_tokens_long"],
        tokens_short=m[f"{rl}.mean_tokens_short"],
        token_share=m[f"{rl}.mean_tokens"] / m[f"{base}.mean_tokens"],
        turns=m[f"{rl}.turns"],
        probe_reward_start=m.get("rl_probe_reward_start"),
        probe_reward_end=m.get("rl_probe_reward_end"),
        probe_tokens_start=m.get("rl_probe_tokens_start"),
        probe_tokens_end=m.get("rl_probe_tokens_end"),
        probe_accuracy_start=m.get("rl_probe_accuracy_start"),
        probe_accuracy_end=m.get("rl_probe_accuracy_end"),
        rl_time_s=summary["stage_times_s"].get("rl"),
        recomputed=summary["recomputed"],
    )


def _opt(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def _span(start: float | None, end: float | None, pattern: str) -> str:
    return f"{_opt(start, pattern)} → {_opt(end, pattern)}"


def print_table(rows: list[Row]) -> None:
    print(
        f"{'variant':<18} {'accuracy':>8} {'Δ base':>7} {'tokens':>7} {'long':>6} {'short':>6} {'vs base':>7} "
        f"{'turns':>5} {'probe reward':>15} {'probe tokens':>15} {'probe accuracy':>15} {'RL s':>6}  "
        "target (≤2 pts, ≤30%)"
    )
    for r in rows:
        print(
            f"{r.variant:<18} {r.accuracy:8.1%} {100 * r.accuracy_delta:+7.1f} {r.tokens:7.1f} {r.tokens_long:6.1f} "
            f"{r.tokens_short:6.1f} {r.token_share:7.1%} {r.turns:5.2f} "
            f"{_span(r.probe_reward_start, r.probe_reward_end, '.3f'):>15} "
            f"{_span(r.probe_tokens_start, r.probe_tokens_end, '.1f'):>15} "
            f"{_span(r.probe_accuracy_start, r.probe_accuracy_end, '.1%'):>15} {_opt(r.rl_time_s, '6.0f')}  "
            f"{'met' if r.meets_target else 'not met'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--efficiency", default="kimi,truncation,laser,laser-d", help="comma-separated rl.efficiency values")
    ap.add_argument("--temperature", default="", help="comma-separated rl.temperature values (default: the profile's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="common section.field=value overrides")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    effs = [e.strip() for e in args.efficiency.split(",") if e.strip()]
    temps = [t.strip() for t in args.temperature.split(",") if t.strip()] or [None]

    root = Path(tempfile.mkdtemp(prefix="bench-rl-rewards-"))
    print(f"profile {args.profile}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; logs in {root}")
    rows: list[Row] = []
    for eff in effs:
        for temp in temps:
            name = eff if temp is None else f"{eff} T={temp}"
            extra = [f"rl.efficiency={eff}", *([f"rl.temperature={temp}"] if temp is not None else [])]
            summary = run_once(args.profile, [*args.overrides, *extra], root, name.replace(" ", "_"), verbose=False)
            rows.append(row_from_summary(name, summary))
            print(f"  {name}: computed {', '.join(summary['recomputed']) or 'nothing (all from cache)'}", flush=True)
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"meets_target": r.meets_target} for r in rows], indent=1))


if __name__ == "__main__":
    main()
