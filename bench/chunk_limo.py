"""How the rule chunker cuts real R1-distill traces: thoughts per trace and their sizes.

    .venv/bin/python bench/chunk_limo.py [PATH] [--min-chars N] [--vocab-size V]

PATH is a jsonl of ``{problem, answer, response}`` rows (default: the LIMO traces
of DeepSeek-R1-Distill-Qwen-32B in the shared data folder). Every trace must
chunk without error and join back to itself exactly; the script prints the
distribution of thoughts per trace and of characters and tokens per thought.

No Qwen tokenizer is available offline, so tokens are counted with a byte-level
BPE trained on the traces themselves: a proxy, said so in the output.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from longshort.io import iter_jsonl, require_str  # noqa: E402
from tasks.chunking import DEFAULT_MARKERS, chunk_by_rules, split_steps, thinking_of  # noqa: E402

DEFAULT_PATH = REPO.parent / "shared" / "data" / "cold_start" / "limo_r1_distill_qwen32b.jsonl"


def load_traces(path: Path) -> list[str]:
    return [thinking_of(require_str(path, lineno, row, "response")) for lineno, row in iter_jsonl(path)]


def proxy_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts``; stands in for the model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def describe(name: str, values: list[int] | np.ndarray) -> str:
    v = np.asarray(values, dtype=float)
    return (
        f"{name:<22} n={v.size:<6d} min={v.min():<7.0f} median={np.median(v):<8.1f} "
        f"mean={v.mean():<8.1f} p90={np.percentile(v, 90):<8.1f} max={v.max():.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--min-chars", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args(argv)

    traces = load_traces(args.path)
    t0 = time.perf_counter()
    chunked = [chunk_by_rules(t, DEFAULT_MARKERS, args.min_chars) for t in traces]
    chunk_s = time.perf_counter() - t0
    for i, (trace, thoughts) in enumerate(zip(traces, chunked)):
        if "".join(t.text for t in thoughts) != trace:
            raise SystemExit(f"{args.path}: trace {i + 1}: thoughts do not join back to the trace")

    t0 = time.perf_counter()
    tok = proxy_tokenizer(traces, args.vocab_size)
    train_s = time.perf_counter() - t0
    texts = [t.text for thoughts in chunked for t in thoughts]
    tokens = [len(e.ids) for e in tok.encode_batch(texts)]
    trace_tokens = [len(e.ids) for e in tok.encode_batch(traces)]

    print(f"file: {args.path}")
    print(f"traces: {len(traces)}, all chunked and joined back exactly; rules with min_chars={args.min_chars}, "
          f"{len(DEFAULT_MARKERS)} default markers; chunking took {chunk_s:.2f} s")  # fmt: skip
    vocab = tok.get_vocab_size()
    print(f"tokens: PROXY byte-level BPE trained on these {len(traces)} traces in {train_s:.1f} s, vocab {vocab} "
          f"(asked {args.vocab_size}); no Qwen tokenizer offline, real counts will differ")  # fmt: skip
    if vocab < args.vocab_size:
        print("        the corpus ran out of merges: every word in it is one token, so counts are likely low")
    print(describe("steps per trace", [len(split_steps(t)) for t in traces]))
    print(describe("thoughts per trace", [len(c) for c in chunked]))
    print(describe("chars per thought", [len(t) for t in texts]))
    print(describe("tokens per thought", tokens))
    print(describe("tokens per trace", trace_tokens))
    types = collections.Counter(t.type for thoughts in chunked for t in thoughts)
    total = sum(types.values())
    print("thought types: " + ", ".join(f"{k} {v / total:.1%}" for k, v in types.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
