"""Generation throughput of the transformers backend (``models.generation.TransformersBackend``) at batch 1, 8, 32.

    .venv/bin/python bench/generation.py [--device auto|cpu|cuda] [--prompts 32] [--max-new-tokens 256] [--quick]

Builds the demo profile's tokenizer and tiny Llama model (configs/demo.yaml: 3 layers, 96 hidden,
~0.5 M parameters, randomly initialised: throughput does not need a trained model, and ``--model DIR``
takes a saved one instead), then generates greedily for the same ``--prompts`` held-out demo
problems (the base model's chat prompts, as ``evaluate_base`` sends them) with the backend's
``batch_size`` set to each batch size in turn, so every batch size does the same work: ``prompts x
max_new_tokens`` new tokens. Every row is forced to run to ``max_new_tokens``: the backend always
stops a row at EOS (its interface has no ignore-EOS switch), so the model's generation config
suppresses the EOS and pad tokens (``suppress_tokens``, one logits processor; no stop strings are
passed). Each batch size is timed ``--repeats`` times, alternating the order, after one warm-up call;
it prints generated tokens/s, milliseconds per decoding step, and the speedup over batch 1.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402


def build_demo_model(rows: list[dict], device: str, seed: int):
    """The demo profile's tokenizer and a randomly initialised tiny model, as the sft_base stage builds them."""
    from longshort.config import ModelConfig  # noqa: PLC0415
    from models.factory import build_tiny_model  # noqa: PLC0415
    from models.tokenizer import build_tokenizer  # noqa: PLC0415

    try:
        from tasks.base_model import tokenizer_corpus  # noqa: PLC0415
    except ImportError:  # a GPU machine without TRL/datasets: the same corpus, written out
        from models.protocol import SYSTEM_PROMPTS  # noqa: PLC0415

        def tokenizer_corpus(rows: list[dict]) -> list[str]:
            return [r["problem"] + "\n" + r["response"] for r in rows] + list(SYSTEM_PROMPTS.values())

    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    tokenizer = build_tokenizer(tokenizer_corpus(rows), demo["tokenizer"]["vocab_size"])
    model = build_tiny_model(ModelConfig(**demo["base_model"]).tiny, tokenizer, seed=seed)
    return model, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per timed pass (every batch size gets the same)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per prompt (forced)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", help="a saved model directory (default: the demo-size model, untrained)")
    ap.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a short check: 32 prompts, 16 new tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats = 32, 16, 1
    logging.basicConfig(level=logging.WARNING)

    import torch  # noqa: PLC0415

    from longshort.config import DemoTaskConfig  # noqa: PLC0415
    from models.generation import TransformersBackend  # noqa: PLC0415
    from models.protocol import SYSTEM_PROMPTS  # noqa: PLC0415
    from tasks.demo import demo_rows  # noqa: PLC0415

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    train, heldout = demo_rows(DemoTaskConfig(**{**demo["data"]["demo"], "n_heldout": max(args.prompts, 1)}))
    if args.model:
        from models.factory import load_pretrained  # noqa: PLC0415

        model, tokenizer = load_pretrained(args.model)
        what = args.model
    else:
        model, tokenizer = build_demo_model(train, device, args.seed)
        what = "demo-size tiny llama, random init"
    # Force every row to max_new_tokens: never pick EOS or the model's other end ids (the backend stops at them) or
    # pad (dropped from completions). A hook on the logits, since the backend decodes with a generation config of
    # its own (a saved generation_config's suppress_tokens does not reach it).
    end_ids = model.generation_config.eos_token_id
    end_ids = [] if end_ids is None else [end_ids] if isinstance(end_ids, int) else list(end_ids)
    never = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id, *end_ids} - {None})

    def no_end(_module, _inputs, output):  # noqa: ANN001, ANN202
        output.logits[..., never] = float("-inf")
        return output

    model.register_forward_hook(no_end)
    backend = TransformersBackend(model, tokenizer, batch_size=1, device=device)
    prompts = [backend.chat_prompt(SYSTEM_PROMPTS["base"], r["problem"]) for r in heldout[: args.prompts]]
    prompt_tokens = [backend.count_tokens(p) for p in prompts]
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    if device == "cuda":
        gpu = torch.cuda.get_device_name(0)
        where = f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; device: {where}"
    )
    print(
        f"model: {what}, {model.num_parameters():,} parameters, vocab {len(tokenizer)}; {len(prompts)} prompts of "
        f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens, {args.max_new_tokens} new tokens each (forced), greedy"
    )

    def timed(batch: int) -> tuple[float, int]:
        backend.batch_size = batch
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = backend.generate(prompts, max_new_tokens=args.max_new_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, sum(c[0].n_tokens for c in out)

    timed(max(sizes))  # warm-up (allocator, kernels, first-call overheads)
    expected = len(prompts) * args.max_new_tokens
    rates: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(args.repeats):
        for b in sizes if r % 2 == 0 else sizes[::-1]:
            seconds, tokens = timed(b)
            if tokens != expected:  # the rates would compare different amounts of work
                raise SystemExit(f"batch {b} generated {tokens} tokens, not {expected}: a row stopped early")
            rates[b].append(tokens / seconds)
            steps = -(-len(prompts) // b) * args.max_new_tokens  # decoding steps: passes x tokens
            print(
                f"  repeat {r + 1} batch {b:>3}: {seconds:7.2f} s, {tokens} tokens, {tokens / seconds:9.1f} tok/s, "
                f"{seconds / steps * 1000:6.2f} ms per decoding step"
            )
    med = {b: statistics.median(v) for b, v in rates.items()}
    base = sizes[0]
    for b in sizes:
        print(f"batch {b:>3}: median {med[b]:9.1f} generated tokens/s, {med[b] / med[base]:6.2f}x batch {base}")
    print(f"(load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
