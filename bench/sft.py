"""SFT throughput: non-padding tokens trained per second by ``tasks.sft.train_sft`` (TRL SFTTrainer).

    .venv/bin/python bench/sft.py [--steps 100] [--repeats 1] [--threads N] [--quick]

Builds the demo profile's tokenizer and tiny Llama model (configs/demo.yaml: 3 layers, 96 hidden,
~0.5 M parameters) from the demo task's training rows, then trains the base model as the
``sft_base`` stage does (same examples, batch size, max_length, learning rate, seed) for a fixed
number of steps, twice per repeat, from the same initial weights, alternating the order, after a
short warm-up run of each:

* ``plain``: the loss from the model's full logits (``train_sft(loss="plain")``, opt-in; ``auto``
  picks it for the demo's 600-token vocabulary);
* ``fused``: TRL's chunked fused LM head (``loss="fused"``, TRL's default and the pipeline's).

It prints tokens/s for each (TRL's ``num_tokens``: the attention-mask tokens, prompt and completion,
of the batches trained, divided by the Trainer's ``train_runtime``, which excludes tokenising the
dataset and saving the model), seconds per step, the CPU time of the whole ``train_sft`` call (a
steadier figure than wall time on a busy machine), the speedup plain / fused, and checks that both
compute the same training: the logged losses and the final weights must agree within float noise.
``--quick`` is a short check (fewer rows and steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from longshort.config import DemoTaskConfig, ModelConfig, SFTConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="training steps per run (a multiple of --logging-steps)")
    ap.add_argument("--rows", type=int, default=3000, help="demo training rows (configs/demo.yaml: 3000)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs (order alternates)")
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--modes", default="plain,fused", help="comma-separated: plain, fused, auto")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", type=Path, help="where runs write (default: a temp dir, removed)")
    ap.add_argument("--quick", action="store_true", help="a short check: 400 rows, 20 steps")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.steps = 400, 20
    args.steps = max(args.logging_steps, args.steps // args.logging_steps * args.logging_steps)
    logging.basicConfig(level=logging.WARNING)

    import torch  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from models.factory import build_tiny_model  # noqa: PLC0415
    from models.tokenizer import build_tokenizer  # noqa: PLC0415
    from tasks.base_model import base_sft_examples, tokenizer_corpus  # noqa: PLC0415
    from tasks.demo import demo_rows  # noqa: PLC0415
    from tasks import sft as sft_module  # noqa: PLC0415
    from tasks.sft import train_sft  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    # TRL logs ``num_tokens`` (attention-mask tokens trained so far) with each loss; train_sft's history
    # keeps only the loss (the count restarts on resume), so catch it here as it is logged.
    logged_tokens: dict[int, int] = {}
    on_log = sft_module._LossHistory.on_log

    def on_log_with_tokens(self, args_, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "num_tokens" in logs:
            logged_tokens[state.global_step] = int(logs["num_tokens"])
        return on_log(self, args_, state, control, logs=logs, **kwargs)

    sft_module._LossHistory.on_log = on_log_with_tokens
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    rows, _ = demo_rows(DemoTaskConfig(**{**demo["data"]["demo"], "n_train": args.rows}))
    tokenizer = build_tokenizer(tokenizer_corpus(rows), demo["tokenizer"]["vocab_size"])
    model_cfg = ModelConfig(**demo["base_model"])
    examples = base_sft_examples(tokenizer, rows)
    sft = SFTConfig(**{**demo["sft_base"], "max_steps": args.steps, "save_steps": 10**6, "logging_steps": args.logging_steps})
    seed = demo["run"]["seed"]
    n_params = build_tiny_model(model_cfg.tiny, tokenizer, seed=seed).num_parameters()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"model: tiny llama, {n_params:,} parameters, vocab {len(tokenizer)}; data: {len(examples)} demo rows; "
        f"{args.steps} steps of batch {sft.batch_size}, max_length {sft.max_length}, lr {sft.learning_rate}"
    )

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-sft-")
    root = args.workdir or Path(tmp.name)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    runs: dict[str, dict] = {}
    try:
        # warm-up: the first train_sft in a process pays one-time costs (lazy imports, first kernels)
        warm = SFTConfig(**{**sft.model_dump(), "max_steps": 2, "logging_steps": 1})
        for mode in modes:
            train_sft(examples[:64], build_tiny_model(model_cfg.tiny, tokenizer, seed=seed), tokenizer, warm,
                      root / f"warmup-{mode}", seed=seed, loss=mode)  # fmt: skip
        for r in range(args.repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                out = root / f"{mode}-{r}"
                model = build_tiny_model(model_cfg.tiny, tokenizer, seed=seed)  # the same initial weights every run
                logged_tokens.clear()
                start, cpu = time.perf_counter(), time.process_time()
                result = train_sft(examples, model, tokenizer, sft, out, seed=seed, loss=mode)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                history = [{**h, "num_tokens": logged_tokens.get(h["step"])} for h in json.loads((out / "loss_history.json").read_text())]
                tokens = history[-1]["num_tokens"]
                rate = tokens / result.train_runtime_s
                rates[mode].append(rate)
                runs[mode] = {"history": history, "weights": load_file(str(Path(result.model_dir) / "model.safetensors"))}
                print(
                    f"  repeat {r + 1} {mode:>6}: train_runtime {result.train_runtime_s:7.2f} s "
                    f"({result.train_runtime_s / result.steps * 1000:6.1f} ms/step), {tokens:,} tokens, "
                    f"{rate:8.0f} tok/s; train_sft wall {wall:6.2f} s, CPU {cpu:6.2f} s; final loss {history[-1]['loss']:.4f}"
                )
    finally:
        if tmp is not None:
            tmp.cleanup()

    med = {m: statistics.median(v) for m, v in rates.items()}
    for m in modes:
        print(f"{m:>6}: median {med[m]:.0f} non-padding tokens/s")
    if "plain" in med and "fused" in med:
        print(f"speedup plain / fused: {med['plain'] / med['fused']:.2f}x (load average now {os.getloadavg()[0]:.1f})")
        a, b = runs["plain"], runs["fused"]
        loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a["history"], b["history"]))
        same_tokens = [x["num_tokens"] for x in a["history"]] == [y["num_tokens"] for y in b["history"]]
        w_diff = max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])
        w_scale = max(a["weights"][k].abs().max().item() for k in a["weights"])
        print(f"same batches (num_tokens at every log): {same_tokens}")
        print(f"max |loss plain - loss fused| over {len(a['history'])} logged losses: {loss_diff:.2e}")
        print(f"max |weight plain - weight fused| after {args.steps} steps: {w_diff:.2e} (max |weight| {w_scale:.2f})")
        if not same_tokens or loss_diff > 1e-3:
            sys.exit("plain and fused losses differ: the two paths do not train the same thing")


if __name__ == "__main__":
    main()
