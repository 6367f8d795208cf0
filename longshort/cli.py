"""The ``longshort`` command."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Long⊗Short: two models that reason together with far fewer tokens.", no_args_is_help=True)
# to a file or a pipe rich would wrap at 80 columns, splitting table rows and paths: keep lines whole there
console = Console() if sys.stdout.isatty() else Console(width=160, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)  # an error stays on one line, however long its path

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="profile name in configs/ or a YAML path")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. sft_base.epochs=1")]


def _fail(exc: BaseException) -> NoReturn:
    """Print ``error: MESSAGE`` to stderr (the message as written, no markup, no traceback) and exit 2."""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(2)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's or the environment's fault, not a bug: the CLI prints them in one line.

    A bad profile (ConfigError) or data file (DataError), a missing file, an output that cannot be
    written (OutputError), a service that does not answer (ServiceUnavailable). Anything else keeps
    its traceback. Evaluated only when an exception is being handled, so the imports cost nothing otherwise.
    """
    from longshort.config import ConfigError  # noqa: PLC0415
    from longshort.endpoints import ServiceUnavailable  # noqa: PLC0415
    from longshort.io import DataError, OutputError  # noqa: PLC0415

    return ConfigError, DataError, OutputError, ServiceUnavailable, FileNotFoundError


def _pipeline_errors() -> tuple[type[BaseException], ...]:
    """What a pipeline run adds: an unloadable model, a registry or DVC step that fails."""
    from longshort.registry import RegistryError  # noqa: PLC0415
    from models.factory import ModelLoadError  # noqa: PLC0415
    from tasks.versioning import DVCError  # noqa: PLC0415

    return (*_input_errors(), ModelLoadError, RegistryError, DVCError)


def _run_pipeline(profile: str, overrides: list[str] | None) -> dict:
    from longshort.config import load_profile  # noqa: PLC0415
    from longshort.preflight import preflight  # noqa: PLC0415

    try:
        # fail fast, before Prefect starts, writing nothing (the flow repeats it at its top, for deployment runs)
        preflight(load_profile(profile, overrides))
    except _input_errors() as exc:
        _fail(exc)
    from flows.pipeline import pipeline  # noqa: PLC0415

    try:
        return pipeline(profile=profile, overrides=overrides)
    except _pipeline_errors() as exc:
        _fail(exc)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as pkg_version  # noqa: PLC0415

    console.print(f"longshort {pkg_version('longshort')}")


@app.command()
def run(profile: ProfileOpt = "demo", set_: SetOpt = None) -> None:
    """Run the whole pipeline for a profile (cached stages, tracked in MLflow)."""
    _print_summary(_run_pipeline(profile, set_))


SYSTEMS = (
    ("long-CoT base", "long_cot_base"),
    ("truncation baseline (1 model, GRPO)", "truncation_baseline"),
    ("Long⊗Short SFT", "long_short_sft"),
    ("Long⊗Short RL", "long_short_rl"),
)


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def _with_ci(m: dict, name: str, pattern: str) -> str:
    """``m[name]`` in percent and, when the run logged it, its 95% interval (``name_ci_low``/``_ci_high``)."""
    from tasks.metrics import interval_text  # noqa: PLC0415

    if m.get(name) is None:
        return "—"
    low, high = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
    interval = None if low is None or high is None else {"low": low, "high": high}
    return interval_text(m.get(name), interval, fmt=pattern)


def _print_summary(summary: dict) -> None:
    from longshort.config import HELDOUT  # noqa: PLC0415

    m = summary["metrics"]
    table = Table(title=f"longshort pipeline — profile {summary['profile']} — held-out problems")
    cols = ("system", "accuracy % [95% CI]", "Δ accuracy vs base, points", "mean tokens", "tokens vs base, %",
            "tokens (correct)", "tokens (wrong)", "turns")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, slug in SYSTEMS:
        p = f"{HELDOUT}.{slug}"
        if f"{p}.accuracy" not in m:
            continue
        base = slug == "long_cot_base"
        table.add_row(
            name, _with_ci(m, f"{p}.accuracy", ".1f"), "" if base else _with_ci(m, f"{p}.accuracy_diff_vs_ref", "+.1f"),
            _fmt(m[f"{p}.mean_tokens"], ".1f"), "100" if base else _with_ci(m, f"{p}.token_ratio_vs_ref", ".1f"),
            _fmt(m.get(f"{p}.mean_tokens_correct"), ".1f"), _fmt(m.get(f"{p}.mean_tokens_wrong"), ".1f"),
            _fmt(m.get(f"{p}.turns"), ".2f"),
        )  # fmt: skip
    if "base_nothink_accuracy" in m:
        table.add_row(
            "long-CoT base, empty <think>", _fmt(100 * m["base_nothink_accuracy"], ".1f"), "",
            _fmt(m["base_nothink_mean_tokens"], ".1f"), "", "", "", "",
        )  # fmt: skip
    console.print(table)
    from tasks.intervals import CONFIDENCE, N_RESAMPLES  # noqa: PLC0415

    console.print(
        f"{CONFIDENCE:.0%} CI: percentile bootstrap over the held-out problems ({N_RESAMPLES:,} resamples); a system "
        "and the base are resampled in pairs, on the same problems."
    )
    if "importance_auroc" in m:
        console.print(
            f"thought importance: AUROC {m['importance_auroc']:.3f} against the teacher's hidden labels "
            f"({m['importance_auroc_traces']:.0f} held-out traces); acc_0 {m.get('score_heldout_acc_0', float('nan')):.2f}, "
            f"acc_n {m.get('score_heldout_acc_n', float('nan')):.2f}"
        )
    if "rl_probe_reward_gain" in m:
        ci = ""
        if "rl_probe_reward_gain_ci_low" in m:
            ci = f" [95% CI {m['rl_probe_reward_gain_ci_low']:+.2f}, {m['rl_probe_reward_gain_ci_high']:+.2f}]"
        console.print(
            f"RL on the fixed probe batch, SFT pair -> RL pair: reward {m['rl_probe_reward_start']:.2f} -> "
            f"{m['rl_probe_reward_end']:.2f} (gain {m['rl_probe_reward_gain']:+.2f}{ci}), accuracy "
            f"{m['rl_probe_accuracy_start']:.1%} -> {m['rl_probe_accuracy_end']:.1%}, tokens "
            f"{m['rl_probe_tokens_start']:.1f} -> {m['rl_probe_tokens_end']:.1f}"
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
    summary = _run_pipeline(profile, set_)
    if summary.get("report"):
        console.print(Path(summary["report"]).read_text(encoding="utf-8"), markup=False, highlight=False)
        console.print(f"plots and tables: {Path(summary['report']).parent}")
    _print_summary(summary)


@app.command()
def solve(
    problem: Annotated[str, typer.Argument(help="the problem text")],
    long: Annotated[Optional[Path], typer.Option(help="long-thought model: a local folder (with --short)")] = None,
    short: Annotated[Optional[Path], typer.Option(help="short-thought model: a local folder (with --long)")] = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="a registered pair, e.g. models:/longshort-pair/3 (default without folders: "
                          "longshort-pair@production, else the newest version)"),
    ] = None,  # fmt: skip
    profile: ProfileOpt = "demo",
    set_: SetOpt = None,
) -> None:
    """Solve one problem with a long-thought and a short-thought model, printing each turn.

    Without --long/--short it runs a registered pair from the profile's MLflow registry (as ``compare`` finds it),
    decoded with the settings registered with it, as the served pair answers. With folders, decoding follows the
    profile's ``generation.temperature`` (by default its ``evaluate.temperature``; greedy at 0),
    ``generation.top_p`` and ``run.seed``.
    """
    from longshort.config import ConfigError, load_profile  # noqa: PLC0415

    try:
        cfg = load_profile(profile, set_)
        if not problem.strip():
            raise ConfigError("the problem text is empty")
        if (long is None) != (short is None):
            raise ConfigError("--long and --short go together (or give neither, to run a registered pair)")
        if long is not None and model is not None:
            raise ConfigError("give --long and --short, or --model, not both")
        for option, folder in (("--long", long), ("--short", short)):
            if folder is not None and not folder.is_dir():
                raise ConfigError(f"{option} {folder}: no such folder (a saved model with its tokenizer)")
    except ConfigError as exc:
        _fail(exc)
    if long is None:
        episode = _solve_registered(problem, model, profile, set_)
    else:
        episode = _solve_folders(problem, long, short, cfg)
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


def _solve_folders(problem: str, long: Path, short: Path, cfg: Any) -> Any:
    from longshort.config import ConfigError  # noqa: PLC0415
    from models.factory import ModelLoadError  # noqa: PLC0415
    from models.generation import close_backend, make_pair_backends  # noqa: PLC0415
    from models.protocol import run_episodes  # noqa: PLC0415

    seed = cfg.run.seed
    try:
        with console.status("loading models"):
            long_backend, short_backend = make_pair_backends(
                long, short, cfg.base_model, cfg.generation, seed, same=short.resolve() == long.resolve()
            )  # ./m and /abs/m are one model: one backend (one vLLM engine), not two
    except (ConfigError, ModelLoadError, OSError) as exc:  # pickle weights, custom code not allowed, no vLLM
        # ModelLoadError's message starts with the folder; put the option that named it in front
        failed = getattr(exc, "path", None)
        named = (("--long", long), ("--short", short))
        options = [o for o, folder in named if failed and Path(failed).resolve() == folder.resolve()]
        _fail(ModelLoadError(f"{' and '.join(options)} {exc}", path=failed) if options else exc)
    with console.status("solving"):
        (episode,) = run_episodes(
            [problem],
            long_backend,
            short_backend,
            max_turns=cfg.protocol.max_turns,
            max_new_tokens_long=cfg.protocol.max_new_tokens_long,
            max_new_tokens_short=cfg.protocol.max_new_tokens_short,
            temperature=cfg.generation.temperature,
            top_p=cfg.generation.top_p,
            seed=seed,
        )
    close_backend(long_backend)
    close_backend(short_backend)
    return episode


def _solve_registered(problem: str, model: str | None, profile: str, set_: list[str] | None) -> Any:
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    from longshort import registry  # noqa: PLC0415
    from longshort.config import ConfigError  # noqa: PLC0415
    from longshort.endpoints import ServiceUnavailable  # noqa: PLC0415
    from models.factory import ModelLoadError  # noqa: PLC0415
    from models.pair import LongShortPair  # noqa: PLC0415

    # the registered settings decode the pair: an override of them would be silently ignored, so it is refused
    ignored = [item for item in set_ or [] if not item.startswith(("run.workspace=", "tracking."))]
    with contextlib.ExitStack() as stack:
        try:
            if ignored:
                raise ConfigError(f"--set {', --set '.join(ignored)}: a registered pair decodes with the settings "
                                  "registered with it (only run.workspace and tracking.* find the registry); give "
                                  "--long and --short model folders to decode with the profile's")  # fmt: skip
            client = registry.client_for_profile(profile, set_)
            uri, what = registry.pair_to_solve(client, model)
            with console.status(f"fetching {what}"):
                long, short, settings = stack.enter_context(registry.pair_files(uri))
        except (ConfigError, registry.RegistryError, ServiceUnavailable, MlflowException) as exc:
            _fail(exc)
        console.print(f"pair: {what}", highlight=False)
        try:
            with console.status("loading models"):
                pair = LongShortPair().load(long, short, settings)
        except (ValueError, ModelLoadError, OSError) as exc:  # ConfigError is a ValueError
            _fail(exc)
        try:
            with console.status("solving"):
                (episode,) = pair.solve([problem])
        finally:
            pair.close()
    return episode


@app.command()
def synthesize(
    params: Annotated[Path, typer.Option(help="params.yaml with a 'demo' section")] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/demo"),
) -> None:
    """Write the demo task's train/held-out splits (the DVC 'synthesize' stage)."""
    from tasks.synthesize import synthesize_demo  # noqa: PLC0415
    from tasks.versioning import read_params_demo  # noqa: PLC0415

    try:
        cfg = read_params_demo(params)
    except (OSError, ValueError) as exc:
        _fail(exc)
    try:
        files = synthesize_demo(cfg, out)
    except (OSError, ValueError) as exc:  # OutputError; ConfigError: the settings allow too few problems
        _fail(exc)
    console.print(json.dumps({"train": files.train, "heldout": files.heldout, "n_train": files.n_train}))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="sft_base | chunk | score | cold_start")],
    profile: ProfileOpt = "demo",
    data: Annotated[Path, typer.Option(help="the DVC data folder (train.jsonl, heldout.jsonl, stage folders)")] = Path(
        "data/demo"
    ),
    params: Annotated[Path, typer.Option(help="params.yaml whose 'demo' section synthesized --data")] = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one data stage outside Prefect, as `dvc repro` does (the same code as the flow's task).

    Only for a profile whose data are the demo splits that dvc.yaml's synthesize stage writes (data.source demo,
    data.demo equal to params.yaml's 'demo' section); any other profile runs with `longshort run`.
    """
    from flows.dvc_stages import require_dvc_data, require_splits, run_data_stage  # noqa: PLC0415
    from longshort.config import load_profile  # noqa: PLC0415

    try:
        cfg = load_profile(profile, set_)
        require_dvc_data(cfg, params, profile, set_ or [])
        require_splits(name, data, params)
        record = run_data_stage(name, cfg, data)
    except (ValueError, OSError) as exc:  # ConfigError, DataError, ModelLoadError; OutputError, a missing file
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
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    from longshort import registry  # noqa: PLC0415
    from longshort.config import ConfigError  # noqa: PLC0415
    from longshort.endpoints import ServiceUnavailable  # noqa: PLC0415

    try:
        client = registry.client_for_profile(profile, set_)
        decision = registry.compare(run_id, tolerance, client)
    except (ConfigError, registry.RegistryError, ServiceUnavailable, MlflowException) as exc:
        _fail(exc)  # MlflowException: the registry failed (e.g. a 5xx on the @production lookup)
    console.print(registry.comparison_table(decision))


@app.command()
def promote(
    run_id: Annotated[str, typer.Argument(help="MLflow run that registered the candidate pair")],
    tolerance: ToleranceOpt = 0.02,
    profile: ProfileOpt = "demo",
    set_: SetOpt = None,
) -> None:
    """Move @production to RUN_ID's pair (longshort-long, -short and -pair) if it passes the gate; else refuse (exit 1)."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    from longshort import registry  # noqa: PLC0415
    from longshort.config import ConfigError  # noqa: PLC0415
    from longshort.endpoints import ServiceUnavailable  # noqa: PLC0415

    try:
        client = registry.client_for_profile(profile, set_)
        decision = registry.promote(run_id, tolerance, client)
    except registry.PromotionRefused as exc:
        console.print(registry.comparison_table(exc.decision))
        current = exc.decision.production
        stays = f"stays at v{current.version}" if current else "stays unset"
        console.print(f"[bold red]refused:[/] @{registry.PRODUCTION} {stays}")
        raise typer.Exit(1) from None
    except (ConfigError, registry.RegistryError, ServiceUnavailable, MlflowException) as exc:
        _fail(exc)  # RegistryError: also a failed alias move, with what was put back; MlflowException: a lookup
    console.print(registry.comparison_table(decision))
    tags = decision.candidate.tags
    if not decision.promoted:  # already @production: exit 0, its promoted_at/promoted_over left as they were
        prod = f"@{registry.PRODUCTION}"
        done = f"moved {prod} on {', '.join(decision.moved)} to it" if decision.moved else "nothing moved"
        console.print(f"{registry.PAIR_MODEL} v{decision.candidate.version} is already at {prod}; {done}")
        return
    console.print(
        f"[green]promoted[/] {registry.PAIR_MODEL} v{decision.candidate.version} "
        f"({registry.LONG_MODEL} v{tags['pair.long_version']}, {registry.SHORT_MODEL} v{tags['pair.short_version']}) "
        f"to @{registry.PRODUCTION}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
