"""Monte Carlo scoring throughput: rollouts that share their prefix vs naive per-rollout generation.

    .venv/bin/python bench/score_prefix.py [--model DIR] [--traces 24] [--rollouts 4] [--repeats 2]

Without ``--model`` it first trains a demo-size base model (configs/demo.yaml's
model and tokenizer sizes) on a few hundred demo rows for a few minutes, under
``--workdir``. Then it scores the same traces with the same config and seeds
twice per repeat, alternating the order:

* ``shared``:   ``score_traces`` as the pipeline runs it: each prefix is encoded once
  and its N rollouts continue from that KV cache;
* ``separate``: N generation passes, each re-encoding every prefix (one rollout per pass);

and, for reference, ``copied`` (N copies of each prefix in one batch, Hugging
Face's ``num_return_sequences``). It prints rollout tokens per second for each,
the speedup of ``shared`` over ``separate``, checks that greedy decoding gives
the same acc_k on both paths, and reports the AUROC of the importance scores
against the demo teacher's hidden ``essential`` labels (evaluation only).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from longshort.config import DemoTaskConfig, GenerationConfig, ModelConfig, SFTConfig, TokenizerConfig, load_profile  # noqa: E402
from models.generation import make_backend  # noqa: E402
from tasks.chunking import split_steps, thinking_of  # noqa: E402
from tasks.demo import demo_rows  # noqa: E402
from tasks.importance import ScoreConfig, auroc, score_traces  # noqa: E402


def train_model(workdir: Path, n_rows: int, steps: int, seed: int) -> str:
    """A demo-size base model trained briefly on ``n_rows`` demo rows; returns its directory."""
    from tasks.base_model import train_base_model  # noqa: PLC0415

    # only the sections we need, so the script does not depend on the rest of the profile schema
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    rows, _ = demo_rows(DemoTaskConfig(**{**demo["data"]["demo"], "n_train": n_rows, "n_heldout": 50}))
    sft = SFTConfig(**{**demo["sft_base"], "max_steps": steps, "save_steps": 10_000, "logging_steps": 20})
    model_cfg, tok_cfg = ModelConfig(**demo["base_model"]), TokenizerConfig(**demo["tokenizer"])
    result = train_base_model(rows, model_cfg, tok_cfg, sft, workdir, seed=seed)
    print(f"trained {result.steps} steps in {result.train_runtime_s:.0f} s, loss {result.train_loss:.3f}")
    return result.model_dir


def bench_traces(n: int, seed: int) -> tuple[list[dict], list[list[bool]]]:
    """Held-out demo traces cut into thoughts by the chunker's step 1 (blank lines), and the hidden labels."""
    _, heldout = demo_rows(DemoTaskConfig(n_train=50, n_heldout=max(n, 1), seed=seed))
    traces, labels = [], []
    for row in heldout[:n]:
        thoughts = split_steps(thinking_of(row["response"]))
        hidden = [t["essential"] for t in row["thoughts"]]  # evaluation only
        assert len(thoughts) == len(hidden), row["id"]
        traces.append({"id": row["id"], "problem": row["problem"], "answer": row["answer"], "thoughts": thoughts})
        labels.append(hidden)
    return traces, labels


def timed(backend, traces, cfg, prefix):
    start = time.perf_counter()
    scored = score_traces(backend, traces, cfg, prefix=prefix)
    seconds = time.perf_counter() - start
    tokens = sum(sum(s.rollout_tokens) * s.n_rollouts for s in scored)
    return scored, seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a saved model directory (default: train one)")
    ap.add_argument("--workdir", type=Path, default=REPO / "workspace" / "bench-score-prefix")
    ap.add_argument("--train-rows", type=int, default=600)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--traces", type=int, default=24)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="rollout cap (the forced answer turn)")
    ap.add_argument("--batch-size", type=int, default=100, help="rows per generate batch (demo.yaml: 100)")
    ap.add_argument("--copied", action="store_true", help="also time the num_return_sequences-style path")
    ap.add_argument("--threads", type=int, help="torch threads (1 avoids OpenMP thrashing on a loaded machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = args.model or train_model(args.workdir, args.train_rows, args.train_steps, args.seed)
    backend = make_backend(model_dir, ModelConfig(), GenerationConfig(backend="transformers", batch_size=args.batch_size))
    traces, labels = bench_traces(args.traces, seed=4321)
    n_prefixes = sum(len(t["thoughts"]) + 1 for t in traces)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"model: {model_dir} ({backend.model.num_parameters():,} parameters)")
    print(
        f"traces: {len(traces)}, prefixes: {n_prefixes}, rollouts per prefix: {args.rollouts}, "
        f"max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}, answer probe {load_profile('demo').score.answer_probe!r}"
    )

    # Greedy: both paths must give the same rollouts, hence the same acc_k.
    probe = load_profile("demo").score.answer_probe  # the forced-answer start the pipeline uses
    common = dict(n_rollouts=args.rollouts, max_new_tokens=args.max_new_tokens, shard_size=len(traces), seed=args.seed,
                  answer_probe=probe)  # fmt: skip
    greedy = ScoreConfig(**common, temperature=0.0)
    g_shared, _, _ = timed(backend, traces, greedy, "shared")
    g_separate, _, _ = timed(backend, traces, greedy, "separate")
    same = all(a.acc == b.acc and a.rollout_tokens == b.rollout_tokens for a, b in zip(g_shared, g_separate))
    print(f"greedy acc_k and rollout tokens equal on both paths: {same}")

    cfg = ScoreConfig(**common)  # sampled, temperature 0.7
    modes = ["shared", "separate"] + (["copied"] if args.copied else [])
    rates: dict[str, list[float]] = {m: [] for m in modes}
    scored_shared = None
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            scored, seconds, tokens = timed(backend, traces, cfg, mode)
            rates[mode].append(tokens / seconds)
            print(f"  repeat {r + 1} {mode:>8}: {seconds:7.2f} s, {tokens:7.0f} rollout tokens, {tokens / seconds:7.1f} tok/s")
            if mode == "shared":
                scored_shared = scored
    med = {m: statistics.median(v) for m, v in rates.items()}
    for m in modes:
        print(f"{m:>8}: median {med[m]:.1f} rollout tokens/s")
    print(f"speedup shared / separate: {med['shared'] / med['separate']:.2f}x (load average now {os.getloadavg()[0]:.1f})")
    if args.copied:
        print(f"speedup shared / copied:   {med['shared'] / med['copied']:.2f}x")

    scores = [s for st in scored_shared for s in st.importance]
    flat = [y for ys in labels for y in ys]
    acc0 = statistics.mean(st.acc[0] for st in scored_shared)
    accn = statistics.mean(st.acc[-1] for st in scored_shared)
    print(f"sampled run: mean acc_0 {acc0:.2f}, mean acc_n {accn:.2f}, AUROC(importance, essential) {auroc(scores, flat):.3f}")
    if not same:
        sys.exit("greedy rollouts differ between the shared and separate paths")


if __name__ == "__main__":
    main()
