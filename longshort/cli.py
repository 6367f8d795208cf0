"""The ``longshort`` command."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Long⊗Short: two models that reason together with far fewer tokens.", no_args_is_help=True)
console = Console()

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="profile name in configs/ or a YAML path")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. sft_base.epochs=1")]


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as pkg_version  # noqa: PLC0415

    console.print(f"longshort {pkg_version('longshort')}")


@app.command()
def run(profile: ProfileOpt = "demo", set_: SetOpt = None) -> None:
    """Run the whole pipeline for a profile (cached stages, tracked in MLflow)."""
    from longshort.config import ConfigError, load_profile  # noqa: PLC0415

    try:
        load_profile(profile, set_)  # fail fast, before Prefect starts
    except ConfigError as exc:
        _fail(exc)
    from flows.pipeline import pipeline  # noqa: PLC0415

    summary = pipeline(profile=profile, overrides=set_)
    _print_summary(summary)


SYSTEMS = (("long-CoT base", "long_cot_base"), ("Long⊗Short SFT", "long_short_sft"), ("Long⊗Short RL", "long_short_rl"))


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def _print_summary(summary: dict) -> None:
    m = summary["metrics"]
    table = Table(title=f"longshort pipeline — profile {summary['profile']} — demo held-out problems")
    for col in ("system", "accuracy", "mean tokens", "vs base", "tokens (correct)", "tokens (wrong)", "turns"):
        table.add_column(col, justify="left" if col == "system" else "right")
    base_tokens = m.get("demo_heldout.long_cot_base.mean_tokens")
    for name, slug in SYSTEMS:
        p = f"demo_heldout.{slug}"
        if f"{p}.accuracy" not in m:
            continue
        ratio = m[f"{p}.mean_tokens"] / base_tokens if base_tokens else None
        table.add_row(
            name, _fmt(m[f"{p}.accuracy"], ".1%"), _fmt(m[f"{p}.mean_tokens"], ".1f"), _fmt(ratio, ".0%"),
            _fmt(m.get(f"{p}.mean_tokens_correct"), ".1f"), _fmt(m.get(f"{p}.mean_tokens_wrong"), ".1f"),
            _fmt(m.get(f"{p}.turns"), ".2f"),
        )  # fmt: skip
    if "base_nothink_accuracy" in m:
        table.add_row(
            "long-CoT base, empty <think>", _fmt(m["base_nothink_accuracy"], ".1%"),
            _fmt(m["base_nothink_mean_tokens"], ".1f"), "", "", "", "",
        )  # fmt: skip
    console.print(table)
    if "importance_auroc" in m:
        console.print(
            f"thought importance: AUROC {m['importance_auroc']:.3f} against the teacher's hidden labels "
            f"({m['importance_auroc_traces']:.0f} held-out traces); acc_0 {m.get('score_heldout_acc_0', float('nan')):.2f}, "
            f"acc_n {m.get('score_heldout_acc_n', float('nan')):.2f}"
        )
    times = ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_times_s"].items())
    console.print(
        f"flow time {summary['flow_time_s']:.1f} s; tasks from cache: {summary['cache_hits']}/{summary['n_stages']}"
        f" (stage compute times: {times})"
    )
    if summary.get("report"):
        console.print(f"report: {summary['report']}")
    console.print(f"MLflow run {summary.get('mlflow_run_id')} in {summary.get('tracking_uri')}")
    for key, name in (("base_model_version", "longshort-base"), ("pair_version", "longshort-pair")):
        if key in summary:
            console.print(f"registered model {name} version {summary[key]}")


@app.command()
def evaluate(profile: ProfileOpt = "demo", set_: SetOpt = None) -> None:
    """Evaluate every system of a profile side by side (runs, or reuses from cache, what it needs)."""
    from longshort.config import ConfigError, load_profile  # noqa: PLC0415

    try:
        load_profile(profile, set_)
    except ConfigError as exc:
        _fail(exc)
    from flows.pipeline import pipeline  # noqa: PLC0415

    summary = pipeline(profile=profile, overrides=set_)
    if summary.get("report"):
        console.print(Path(summary["report"]).read_text(encoding="utf-8"), markup=False, highlight=False)
        console.print(f"plots and tables: {Path(summary['report']).parent}")
    _print_summary(summary)


@app.command()
def solve(
    problem: Annotated[str, typer.Argument(help="the problem text")],
    long: Annotated[Path, typer.Option(help="long-thought model: a local folder")],
    short: Annotated[Path, typer.Option(help="short-thought model: a local folder")],
    profile: ProfileOpt = "demo",
    set_: SetOpt = None,
) -> None:
    """Solve one problem with a long-thought and a short-thought model, printing each turn."""
    from longshort.config import ConfigError, load_profile  # noqa: PLC0415
    from models.generation import make_backend  # noqa: PLC0415
    from models.protocol import run_episodes  # noqa: PLC0415

    try:
        cfg = load_profile(profile, set_)
    except ConfigError as exc:
        _fail(exc)
    with console.status("loading models"):
        long_backend = make_backend(long, cfg.base_model, cfg.generation, cfg.run.seed)
        short_backend = long_backend if short == long else make_backend(short, cfg.base_model, cfg.generation)
    with console.status("solving"):
        (episode,) = run_episodes(
            [problem],
            long_backend,
            short_backend,
            max_turns=cfg.protocol.max_turns,
            max_new_tokens_long=cfg.protocol.max_new_tokens_long,
            max_new_tokens_short=cfg.protocol.max_new_tokens_short,
        )
    for k, turn in enumerate(episode.turns, start=1):
        style = "cyan" if turn.role == "long" else "green"
        console.rule(f"turn {k} · {turn.role} · {turn.n_tokens} tokens", style=style)
        console.print(turn.text, markup=False, highlight=False)
    console.rule()
    console.print(
        f"answer: {episode.answer}   stop: {episode.stop_reason}   "
        f"tokens: long {episode.tokens('long')} + short {episode.tokens('short')} = {episode.tokens()}"
    )
    if episode.error:
        console.print(f"[yellow]protocol error:[/] {episode.error}")


@app.command()
def synthesize(
    params: Annotated[Path, typer.Option(help="params.yaml with a 'demo' section")] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/demo"),
) -> None:
    """Write the demo task's train/held-out splits (the DVC 'synthesize' stage)."""
    from pydantic import ValidationError  # noqa: PLC0415

    from longshort.config import DemoTaskConfig  # noqa: PLC0415
    from tasks.synthesize import synthesize_demo  # noqa: PLC0415

    try:
        section = (yaml.safe_load(params.read_text()) or {}).get("demo", {})
        cfg = DemoTaskConfig.model_validate(section)
    except (OSError, yaml.YAMLError) as exc:
        _fail(exc)
    except ValidationError as exc:
        _fail(ValueError(f"{params}: section 'demo': {exc}"))
    files = synthesize_demo(cfg, out)
    console.print(json.dumps({"train": files.train, "heldout": files.heldout, "n_train": files.n_train}))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="sft_base | chunk | score | cold_start")],
    profile: ProfileOpt = "demo",
    data: Annotated[Path, typer.Option(help="the DVC data folder (train.jsonl, heldout.jsonl, stage folders)")] = Path(
        "data/demo"
    ),
    set_: SetOpt = None,
) -> None:
    """Run one data stage outside Prefect, as `dvc repro` does (the same code as the flow's task)."""
    from flows.dvc_stages import run_data_stage  # noqa: PLC0415
    from longshort.config import ConfigError, load_profile  # noqa: PLC0415

    try:
        cfg = load_profile(profile, set_)
        record = run_data_stage(name, cfg, data)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    console.print(json.dumps({"stage": record.stage, "outputs": record.outputs, "metrics": record.metrics}))


ToleranceOpt = Annotated[float, typer.Option(help="accuracy the candidate may lose against production (0.02 = 2 points)")]


@app.command()
def compare(
    run_id: Annotated[Optional[str], typer.Argument(help="MLflow run that registered the candidate pair (default: newest)")] = None,
    tolerance: ToleranceOpt = 0.02,
    profile: ProfileOpt = "demo",
    set_: SetOpt = None,
) -> None:
    """Print the candidate pair and longshort-pair@production side by side, with the promotion gate's verdict."""
    from longshort import registry  # noqa: PLC0415
    from longshort.config import ConfigError  # noqa: PLC0415

    try:
        client = registry.client_for_profile(profile, set_)
        decision = registry.compare(run_id, tolerance, client)
    except (ConfigError, registry.RegistryError) as exc:
        _fail(exc)
    console.print(registry.comparison_table(decision))


@app.command()
def promote(
    run_id: Annotated[str, typer.Argument(help="MLflow run that registered the candidate pair")],
    tolerance: ToleranceOpt = 0.02,
    profile: ProfileOpt = "demo",
    set_: SetOpt = None,
) -> None:
    """Move longshort-pair@production to RUN_ID's pair if it passes the gate; otherwise refuse (exit 1)."""
    from longshort import registry  # noqa: PLC0415
    from longshort.config import ConfigError  # noqa: PLC0415

    try:
        client = registry.client_for_profile(profile, set_)
        decision = registry.promote(run_id, tolerance, client)
    except registry.PromotionRefused as exc:
        console.print(registry.comparison_table(exc.decision))
        current = exc.decision.production.version if exc.decision.production else "none"
        console.print(f"[bold red]refused:[/] @{registry.PRODUCTION} stays at v{current}")
        raise typer.Exit(1) from None
    except (ConfigError, registry.RegistryError) as exc:
        _fail(exc)
    console.print(registry.comparison_table(decision))
    console.print(f"[green]promoted[/] {registry.PAIR_MODEL} v{decision.candidate.version} to @{registry.PRODUCTION}")


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    app()


if __name__ == "__main__":
    main()
