"""Cost of multi-token stop strings per ``generate`` call of the transformers backend, built per call vs once.

    .venv/bin/python bench/stop_strings.py [--tokenizer PATH] [--calls 6] [--max-new-tokens 8]

A turn of the Long⊗Short protocol ends at ``</think>``, ``</rethink>`` or ``</answer>``. With a tokenizer where
such a tag is several tokens (Qwen2.5 and Llama-3.1: ``</think>`` is ``</``, ``think``, ``>``) the backend stops on
it with transformers' ``StopStringCriteria``, whose constructor reads every token of the vocabulary. Passed as
``generate(stop_strings=...)`` it is built again on every call (every turn of every batch); the backend now
builds it once per set of stops and passes it as a stopping criterion.

``--tokenizer`` is a ``tokenizer.json`` file or a folder with one (default: the demo profile's tokenizer, whose
tags are single tokens, so it has no string stops unless ``--stops`` names longer strings). The model is a tiny
randomly initialised Qwen2 sized for the tokenizer (what it generates does not matter: every call asks for the
same ``--max-new-tokens`` greedy tokens for one prompt). Each of ``--calls`` calls is timed twice, alternating:
with the backend's criterion cache cleared before the call (the old cost, built per call) and kept (built once,
before the first timed call). Prints the median milliseconds per call of each and their ratio, measured in one run.

``--cut-tokens N`` (0: off) then times how a completion of N tokens that ends with the last of ``--stops`` is cut
after it (``models.generation.cut_at_stop``, the fewest ids covering the stop, found by bisection) against the
scan it replaced (decode every prefix until one covers it), checks they agree, and prints both and their ratio.
"""

from __future__ import annotations

import argparse
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


def load_tokenizer(path: str | None):
    """A ``tokenizer.json`` (or a folder holding one) as a fast tokenizer with end and pad tokens; else the demo's."""
    if path is None:
        from bench.generation import build_demo_model  # noqa: PLC0415
        from longshort.config import DemoTaskConfig  # noqa: PLC0415
        from tasks.demo import demo_rows  # noqa: PLC0415

        return build_demo_model(demo_rows(DemoTaskConfig(n_train=200, n_heldout=1))[0], "cpu", 0)[1]
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(file))
    vocab = tok.get_vocab()
    end = next((t for t in ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>") if t in vocab), None)
    if end is None:
        raise SystemExit(f"{file}: no end-of-turn token among <|im_end|>, <|eot_id|>, </s>, <|endoftext|>")
    tok.eos_token = end
    tok.pad_token = tok.pad_token or end
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="tokenizer.json or a folder with one (default: the demo tokenizer)")
    ap.add_argument("--stops", default="</think>,</rethink>,</answer>", help="comma-separated stop strings")
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--cut-tokens", type=int, default=4096, help="length of the completion cut at a stop (0: off)")
    args = ap.parse_args()

    import torch  # noqa: PLC0415

    from longshort.config import TinyModelConfig  # noqa: PLC0415
    from models.factory import build_tiny_model  # noqa: PLC0415
    from models.generation import TransformersBackend, single_token_id  # noqa: PLC0415

    torch.set_num_threads(1)
    tok = load_tokenizer(args.tokenizer)
    model = build_tiny_model(
        TinyModelConfig(architecture="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256), tok,
    )  # fmt: skip
    backend = TransformersBackend(model, tok, batch_size=1, device="cpu")
    stops = [s for s in args.stops.split(",") if s]
    string_stops = [s for s in stops if single_token_id(tok, s) is None]
    prompt = "Start with 3. Then (1) add 4. What is the final number?\n<think>\n"  # a plain prompt: no chat template needed

    def call(cleared: bool) -> float:
        if cleared:
            backend._stop_criteria.clear()
        start = time.perf_counter()
        backend.generate([prompt], max_new_tokens=args.max_new_tokens, stop=stops)
        return time.perf_counter() - start

    call(False)  # warm-up: builds the criterion (and transformers' own caches) once
    per_call, once = [], []
    for i in range(args.calls):
        for cleared in ((True, False) if i % 2 == 0 else (False, True)):
            (per_call if cleared else once).append(call(cleared))
    a, b = statistics.median(per_call), statistics.median(once)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch threads 1")
    print(f"tokenizer: {args.tokenizer or 'demo'} ({len(tok)} tokens); string stops: {string_stops or 'none'}")
    print(f"{args.calls} calls of {args.max_new_tokens} greedy tokens, one prompt")
    print("| stop-string criterion | ms per call (median) |")
    print("|---|---|")
    print(f"| built per call (generate(stop_strings=...)) | {a * 1e3:.1f} |")
    print(f"| built once per backend | {b * 1e3:.1f} |")
    print(f"ratio: {a / b:.1f}x")
    if args.cut_tokens:
        cut_timing(tok, stops[-1], args.cut_tokens)


def cut_timing(tok, stop: str, n_tokens: int) -> None:
    """A completion of ``n_tokens`` ids whose text ends with ``stop``, cut by bisection and by the old scan."""
    from models.generation import cut_at_stop  # noqa: PLC0415

    def scan(ids: list[int]) -> tuple[str, int] | None:  # the code cut_at_stop replaced
        text = tok.decode(ids, skip_special_tokens=False)
        at = text.find(stop)
        if at == -1:
            return None
        text = text[: at + len(stop)]
        return text, next(k for k in range(1, len(ids) + 1) if len(tok.decode(ids[:k])) >= len(text))

    sentence = "Let me verify the sum again: 12 + 35 = 47, and 47 - 9 = 38, so the running value is 38. "
    stop_ids = tok(stop, add_special_tokens=False)["input_ids"]
    body = tok(sentence * (n_tokens // 10), add_special_tokens=False)["input_ids"][: n_tokens - len(stop_ids)]
    ids = body + stop_ids
    timed = {}
    for name, fn in (("scan", scan), ("bisect", lambda x: cut_at_stop(tok, x, [stop]))):
        start = time.perf_counter()
        timed[name] = (fn(ids), time.perf_counter() - start)
    if timed["scan"][0] != timed["bisect"][0]:
        raise SystemExit(f"the two cuts differ: {timed['scan'][0][1]} vs {timed['bisect'][0][1]} ids")
    a, b = timed["scan"][1], timed["bisect"][1]
    kept = timed["bisect"][0][1]
    print(f"cut a {len(ids)}-token completion after {stop!r} ({len(stop_ids)} tokens): both keep {kept} ids")
    print(f"| cut | ms |\n|---|---|\n| decode every prefix (before) | {a * 1e3:.1f} |\n| bisection | {b * 1e3:.1f} |")
    print(f"ratio: {a / b:.1f}x")


if __name__ == "__main__":
    main()
