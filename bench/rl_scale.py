"""Does the real profiles' RL fit one GPU? One alternating round on a 7B/8B-shaped pair, timed, peak memory.

    python bench/rl_scale.py --shape qwen2.5-7b --tokenizer DIR --train FILE [--json OUT]

No machine here reaches the hub, so the pair is a randomly initialised model with the shape of the profile's
base model (Qwen2.5-7B: 7.6 B parameters, 152,064-token vocabulary; Llama-3.1-8B: 8.0 B, 128,256), in the
profile's dtype, with the demo tokenizer padded by filler tokens to that vocabulary. Everything else is the
profile's RL as configured (``tasks.rl.train_pair_rl``: LoRA adapters on frozen bf16 weights, activation
checkpointing, log-probabilities of the trained tokens only) except the sizes given by flags: a round of one
step per model, ``--prompts`` x the profile's G episodes. Random weights never write a stop tag, so the long
model's first turn runs to its cap (``--long-tokens``) and, unclosed, ends the episode: the long step trains
``--prompts`` x G sequences of that length (the heavier of the two: the short model's turns are shorter, its
history is context without logits), and the short step has nothing to train. The figures say whether memory
fits and what a step costs; rewards are meaningless here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {  # the config.json of the hub models, without their weights
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, max_position_embeddings=32768,
                                 tie_word_embeddings=False)),
    "llama3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=8, vocab_size=128256, rope_theta=5e5, max_position_embeddings=131072,
                                  tie_word_embeddings=False)),
    "tiny": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096)),  # a CPU dry run
}  # fmt: skip


def main() -> None:
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from longshort.config import ModelConfig, ProtocolConfig, load_profile  # noqa: PLC0415
    from tasks.rl import train_pair_rl  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    ap.add_argument("--profile", default=None, help="whose RL settings (default: the shape's profile; qwen2.5-7b for tiny)")
    ap.add_argument("--tokenizer", required=True, help="a demo model folder (its tokenizer is padded to the vocabulary)")
    ap.add_argument("--train", required=True, help="training problems (synthesize/*/train.jsonl)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=2048)
    ap.add_argument("--short-tokens", type=int, default=512)
    ap.add_argument("--rollouts", choices=("models", "vllm"), default="models",
                    help="sample episodes with the training models (model.generate) or with the profile's vLLM engines")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="default: $OUT/rl_scale.json when OUT is set")
    args = ap.parse_args()
    out_json = args.json or (Path(os.environ["OUT"]) / "rl_scale.json" if os.environ.get("OUT") else None)
    profile = load_profile(args.profile or ("qwen2.5-7b" if args.shape == "tiny" else args.shape))
    cuda = torch.cuda.is_available()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rl-scale-"))
    t0 = time.perf_counter()

    kind, shape = SHAPES[args.shape]
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.add_tokens([f"<filler{i}>" for i in range(shape["vocab_size"] - len(tok))])
    config = AutoConfig.for_model(kind, **shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)  # fmt: skip
    dtype = getattr(torch, profile.base_model.dtype)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = work / "pair"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    del model
    if cuda:
        torch.cuda.empty_cache()
    t_built = time.perf_counter()

    rl = profile.rl.model_copy(update={
        "rounds": 1, "steps_per_round": 1, "prompts_per_step": args.prompts, "probe_problems": 0,
        "easy_filter": False, "checkpoint_every": 1, "length_target": args.long_tokens + args.short_tokens,
    })  # fmt: skip
    protocol = ProtocolConfig(max_turns=2, max_new_tokens_long=args.long_tokens, max_new_tokens_short=args.short_tokens)
    model_cfg = ModelConfig(source="pretrained", name_or_path=str(model_dir), dtype=profile.base_model.dtype)
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()[: 4 * args.prompts]]
    problems = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in rows]
    steps: list[dict] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_rl = time.perf_counter()
    step_start = [t_rl]

    def on_step(m: dict) -> None:
        now = time.perf_counter()
        keep = ("role", "trained_tokens", "tokens/total", "tokens/long", "tokens/short", "turns", "loss", "grad_norm")
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None  # this process's tensors
        free, total = torch.cuda.mem_get_info() if cuda else (0, 0)  # the whole GPU: vLLM's engine processes too
        steps.append({"s": round(now - step_start[0], 2), "peak_gpu_memory_gib": peak,
                      "gpu_memory_in_use_gib": round((total - free) / 2**30, 2) if cuda else None,
                      **{k: m[k] for k in keep if k in m}})  # fmt: skip
        step_start[0] = now
        print(f"[rl] step {len(steps)} ({m.get('role')}): {steps[-1]}", flush=True)

    generation = profile.generation.model_copy(update={"backend": "vllm"}) if args.rollouts == "vllm" else None
    result = train_pair_rl(model_dir, model_dir, problems, rl, work / "rl", on_step, protocol=protocol,
                           model_cfg=model_cfg, generation=generation)  # fmt: skip
    t_end = time.perf_counter()
    report = {
        "shape": args.shape, "profile": profile.run.name, "parameters": n_params, "dtype": profile.base_model.dtype,
        "vocab_size": shape["vocab_size"], "lora": rl.lora.model_dump() if rl.lora else None,
        "gradient_checkpointing": rl.gradient_checkpointing, "micro_batch_size": rl.micro_batch_size,
        "episodes_per_step": args.prompts * rl.group_size, "max_new_tokens": [args.long_tokens, args.short_tokens],
        "rollouts": args.rollouts, "vllm_gpu_memory_utilization": rl.vllm_gpu_memory_utilization,
        "steps": steps, "build_and_save_s": round(t_built - t0, 1),
        "rl_s": round(t_end - t_rl, 1), "load_and_final_save_s": round(t_end - t_rl - sum(s["s"] for s in steps), 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        **gpu_fields(torch), "saved": [result.long_dir, result.short_dir],
    }  # fmt: skip
    write_report(report, out_json)


def gpu_fields(torch) -> dict:  # noqa: ANN001
    """The GPU a report was measured on (the machine's architecture without one), and its memory."""
    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else platform.machine(),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}  # fmt: skip


def write_report(report: dict, out_json: Path | None) -> None:
    """Print the report as JSON and, with ``out_json``, write it there."""
    print(json.dumps(report, indent=1))
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
