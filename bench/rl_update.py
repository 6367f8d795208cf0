"""One GRPO update of a real profile's RL on one GPU: peak memory and time by turn length, and the weight hand-off.

    python bench/rl_update.py --shape qwen2.5-7b [--trained 1024,4096,8192] [--json OUT]

``bench/rl_scale.py`` times whole steps, whose rollouts through ``model.generate`` take minutes at long turns;
this script measures the update alone, so the profile's full turn lengths fit in a few minutes. On a randomly
initialised model with the shape of the profile's base model (no machine here reaches the hub), in the
profile's dtype, with the profile's RL settings (LoRA adapters on frozen weights, activation checkpointing, its
micro-batch), ``tasks.rl.policy_update`` trains one micro-batch of turns of ``--prompt`` context tokens and
``--trained`` generated tokens, random ids, once per way of computing the trained tokens' log-probabilities:

* ``sliced``: the trained positions only, the head applied a slice at a time and recomputed in backward
  (``tasks.rl._trained_logps``, what Llama/Qwen models take);
* ``columns``: the logits of every column some row trains, whole (``logits_to_keep``; what other
  architectures take, and what Llama/Qwen took before the sliced path).

It reports the peak memory the update allocates above the resident model, adapters and optimizer state
(PyTorch's allocator) and the update's time. The optimizer steps at learning rate 0, so every update sees
the same weights, and the two ways must give the same gradient norm and entropy (to bf16 rounding). Then the weight
hand-off to a vLLM engine after each update: ``models.generation.save_engine_weights`` (adapters folded
in, one safetensors file) and reading that file back onto the GPU tensor by tensor (what an engine's
``load_weights`` reads; vLLM itself is not needed for this part).

``--zero-share S`` (default 0.5; 0 turns it off) then times one update of 4 micro-batches of turns of the first
``--trained`` length in which a share S of the episodes have advantage 0 (groups whose rewards were all equal),
with ``rl.skip_zero_advantage`` off, then on: the same gradient (grad norms and loss compared), in less time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from rl_scale import REPO, SHAPES, gpu_fields, write_report  # bench/rl_scale.py: the hub models' shapes, its report

sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch  # noqa: PLC0415
    from peft import get_peft_model  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    import tasks.rl as rl  # noqa: PLC0415
    from longshort.config import load_profile  # noqa: PLC0415
    from models.generation import save_engine_weights  # noqa: PLC0415
    from tasks.sft import peft_lora  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    ap.add_argument("--profile", default=None, help="whose RL settings (default: the shape's profile; qwen2.5-7b for tiny)")
    ap.add_argument("--prompt", type=int, default=512, help="context tokens before each trained turn")
    ap.add_argument("--trained", default="1024,4096,8192", help="trained tokens per turn, comma-separated")
    ap.add_argument("--ways", default="sliced,columns")
    ap.add_argument("--no-handoff", action="store_true", help="skip the engine weight hand-off")
    ap.add_argument("--zero-share", type=float, default=0.5,
                    help="share of episodes with advantage 0 in the skip check (0: no check)")
    ap.add_argument("--logits-budget-mib", type=float, default=None,
                    help="tasks.rl._FULL_LOGITS_MAX_BYTES in MiB: logits taken whole below it, the slice size above it")
    ap.add_argument("--json", type=Path, default=None, help="default: $OUT/rl_update.json when OUT is set")
    args = ap.parse_args()
    out_json = args.json or (Path(os.environ["OUT"]) / "rl_update.json" if os.environ.get("OUT") else None)
    profile = load_profile(args.profile or ("qwen2.5-7b" if args.shape == "tiny" else args.shape))
    cfg = profile.rl
    if args.logits_budget_mib is not None:
        rl._FULL_LOGITS_MAX_BYTES = int(args.logits_budget_mib * 2**20)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    kind, shape = SHAPES[args.shape]
    config = AutoConfig.for_model(kind, **shape, pad_token_id=0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, profile.base_model.dtype))
    if cfg.lora is not None:  # as tasks.rl._load_pair: adapters injected into the model's own modules
        model = get_peft_model(model, peft_lora(cfg.lora)).get_base_model()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    # learning rate 0: the optimizer's state is allocated as in training, but every way sees the same weights
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    built_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)

    def advantages(n: int) -> list[float]:  # a group's worth: positive and negative, summing to about 0
        return [1.0, -1.0] * (n // 2) + [0.5] * (n % 2)

    def turns(trained: int, n: int = cfg.micro_batch_size) -> list[rl.TurnSequence]:
        seqs = []
        for k in range(n):
            ids = torch.randint(1, shape["vocab_size"], (args.prompt + trained,), generator=gen).tolist()
            seqs.append(rl.TurnSequence(ids, [0] * args.prompt + [1] * trained, episode=k))
        return seqs

    rl.policy_update(model, None, optimizer, turns(64), advantages(cfg.micro_batch_size), 0, cfg)  # warm-up
    plain_heads = rl._PLAIN_HEAD_TYPES
    rows = []
    for trained in [int(x) for x in args.trained.split(",")]:
        seqs = turns(trained)
        for way in args.ways.split(","):
            rl._PLAIN_HEAD_TYPES = plain_heads if way == "sliced" else frozenset()  # a bench switch, not a setting
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated() if cuda else 0
            row = {"trained_tokens": trained, "context_tokens": args.prompt, "sequences": len(seqs), "way": way}
            t = time.perf_counter()
            try:
                stats = rl.policy_update(model, None, optimizer, seqs, advantages(len(seqs)), 0, cfg)
                if cuda:
                    torch.cuda.synchronize()
                row |= {"s": round(time.perf_counter() - t, 2), "loss": stats["loss"], "grad_norm": stats["grad_norm"],
                        "entropy": stats["entropy"]}  # fmt: skip
            except torch.OutOfMemoryError as exc:
                row |= {"s": round(time.perf_counter() - t, 2), "error": f"out of memory: {str(exc).splitlines()[0]}"}
                optimizer.zero_grad(set_to_none=True)
            if cuda:
                row |= {"peak_above_resident_gib": round((torch.cuda.max_memory_allocated() - resident) / 2**30, 2),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}  # fmt: skip
            rows.append(row)
            print(f"[update] {row}", flush=True)
    rl._PLAIN_HEAD_TYPES = plain_heads

    skip_rows = []
    if args.zero_share > 0:  # one update with a share of zero-advantage episodes, without and with skipping them
        trained = int(args.trained.split(",")[0])
        seqs = turns(trained, 4 * cfg.micro_batch_size)
        n_zero = round(args.zero_share * len(seqs))
        adv = [0.0] * n_zero + advantages(len(seqs) - n_zero)
        for skip in (False, True):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            skip_cfg = cfg.model_copy(update={"skip_zero_advantage": skip})
            stats = rl.policy_update(model, None, optimizer, seqs, adv, 0, skip_cfg)
            if cuda:
                torch.cuda.synchronize()
            row = {"skip_zero_advantage": skip, "trained_tokens": trained, "sequences": len(seqs), "zero_advantage": n_zero,
                   "s": round(time.perf_counter() - t, 2), "loss": stats["loss"], "grad_norm": stats["grad_norm"],
                   "updated_tokens": stats["updated_tokens"], "all_tokens": stats["trained_tokens"]}  # fmt: skip
            skip_rows.append(row)
            print(f"[skip] {row}", flush=True)
        print(f"[skip] time ratio, skipping / not: {skip_rows[1]['s'] / skip_rows[0]['s']:.3f}; grad norm "
              f"{skip_rows[1]['grad_norm']:.6g} / {skip_rows[0]['grad_norm']:.6g}", flush=True)  # fmt: skip

    handoff = None
    if not args.no_handoff:
        tmp = tempfile.TemporaryDirectory(prefix="engine-weights-")
        path = Path(tmp.name) / "long.safetensors"
        t = time.perf_counter()
        save_engine_weights(model, path)
        saved_s = time.perf_counter() - t
        t = time.perf_counter()
        n_bytes = 0
        with safe_open(str(path), framework="pt", device="cpu") as f:  # as EngineWeightsLoader reads it
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = f.get_tensor(name).to(device)
                n_bytes += tensor.numel() * tensor.element_size()
        if cuda:
            torch.cuda.synchronize()
        handoff = {"file_gib": round(path.stat().st_size / 2**30, 2), "save_s": round(saved_s, 1),
                   "read_to_gpu_s": round(time.perf_counter() - t, 1), "tensors_gib": round(n_bytes / 2**30, 2)}  # fmt: skip
        tmp.cleanup()
        print(f"[handoff] {handoff}", flush=True)

    report = {
        "shape": args.shape, "profile": profile.run.name, "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": profile.base_model.dtype, "vocab_size": shape["vocab_size"],
        "lora": cfg.lora.model_dump() if cfg.lora else None, "gradient_checkpointing": cfg.gradient_checkpointing,
        "micro_batch_size": cfg.micro_batch_size, "slice_budget_mib": rl._FULL_LOGITS_MAX_BYTES / 2**20,
        "resident_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None,
        "build_s": round(built_s, 1), "updates": rows, "skip_zero_advantage": skip_rows, "handoff": handoff,
        **gpu_fields(torch), "torch": torch.__version__,
    }  # fmt: skip
    write_report(report, out_json)


if __name__ == "__main__":
    main()
