"""Checkpoints of the alternating RL stage: both models, both optimizers, step, RNG states, metrics.

A checkpoint is written to ``out_dir/checkpoints/.tmp-step-NNNNNN`` and then renamed
with ``os.replace`` to ``step-NNNNNN``, so a process killed while saving leaves either
the previous checkpoint or a stray ``.tmp-*`` folder (removed at the next start), never
a half-written ``step-*``. Weights are safetensors; ``optim.pt`` holds only tensors and
plain containers and is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longshort.io import fault_point, replace_tree

CHECKPOINTS = "checkpoints"


def save_models(models: Mapping[str, Any], tokenizers: Mapping[str, Any], root: Path) -> None:
    """``root/<role>/`` = safetensors weights + tokenizer, for every role in ``models``."""
    for role, model in models.items():
        model.save_pretrained(root / role, safe_serialization=True)
        tokenizers[role].save_pretrained(root / role)


def save_checkpoint(
    out_dir: Path,
    step: int,
    models: Mapping[str, Any],
    tokenizers: Mapping[str, Any],
    optimizers: Mapping[str, torch.optim.Optimizer],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``out_dir/checkpoints/step-NNNNNN`` atomically and keep only the last ``keep``."""
    root = out_dir / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_models(models, tokenizers, tmp)
    blob = {role: opt.state_dict() for role, opt in optimizers.items()} | {"torch_rng": torch.get_rng_state()}
    torch.save(blob, tmp / "optim.pt")
    np_state = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    (tmp / "state.json").write_text(json.dumps(state | {"rng": rng}))
    replace_tree(tmp, final)  # a `final` is there only when the same step is saved twice
    fault_point(f"rl-checkpoint:{step}")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def last_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint; stray ``.tmp-*`` folders from a killed save are removed."""
    root = out_dir / CHECKPOINTS
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted(root.glob("step-*"))
    return done[-1] if done else None


def restore_checkpoint(ckpt: Path, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Load the optimizers' state and the RNG states; return the saved state dict (step, history, …)."""
    state = json.loads((ckpt / "state.json").read_text())
    blob = torch.load(ckpt / "optim.pt", weights_only=True)
    for role, opt in optimizers.items():
        opt.load_state_dict(blob[role])
    py = state["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(blob["torch_rng"])
    return state


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Sequence[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
