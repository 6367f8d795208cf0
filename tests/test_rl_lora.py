"""RL on the real profiles' terms: LoRA adapters on frozen weights, resume from adapter checkpoints, and
log-probabilities computed only where tokens are trained (large vocabularies)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longshort.config import LoraConfig, ModelConfig, ProtocolConfig
from models.factory import load_model
import tasks.rl as rl
from tasks.rl import RLConfig, TurnSequence, _pad, _token_logps, train_pair_rl

PROTOCOL = ProtocolConfig(max_turns=2, max_new_tokens_long=16, max_new_tokens_short=16)
LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
CFG = RLConfig(
    rounds=1, steps_per_round=2, prompts_per_step=2, group_size=4, learning_rate=3e-2, kl_coef=0.05,
    efficiency="kimi", format_weight=0.5, checkpoint_every=1, keep_checkpoints=4, temperature=1.0, seed=3,
    lora=LORA, gradient_checkpointing=True,
)  # fmt: skip


def _problems(demo_rows_small) -> list[dict]:
    train, _ = demo_rows_small
    return [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in train[:8]]


@pytest.fixture(scope="module")
def lora_run(protocol_pair, demo_rows_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl-lora")
    result = train_pair_rl(protocol_pair, protocol_pair, _problems(demo_rows_small), CFG, out, protocol=PROTOCOL)
    return out, result


def test_lora_rl_trains_only_the_adapted_layers_and_saves_plain_merged_models(protocol_pair, lora_run):
    out, result = lora_run
    assert [h["role"] for h in result.history] == ["long", "long", "short", "short"]
    assert any(h["grad_norm"] > 0 for h in result.history)
    start = load_file(str(Path(protocol_pair) / "model.safetensors"))
    for role in ("long", "short"):
        saved = load_file(str(out / role / "model.safetensors"))
        assert saved.keys() == start.keys()  # a plain transformers model: no lora_A/lora_B keys
        changed = {k for k in saved if not torch.equal(saved[k], start[k])}
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    # the checkpoints hold the adapters only, not whole models
    ckpt = out / "checkpoints" / "step-000004" / "long"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def test_lora_rl_resumes_from_its_adapter_checkpoint(protocol_pair, demo_rows_small, lora_run, tmp_path: Path):
    """Steps 3-4 rerun from the step-2 checkpoint (start weights + saved adapters, optimizer, RNG)
    give the same models as the uninterrupted run."""
    out, result = lora_run
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-000002", resumed_dir / "checkpoints" / "step-000002")
    resumed = train_pair_rl(protocol_pair, protocol_pair, _problems(demo_rows_small), CFG, resumed_dir,
                            protocol=PROTOCOL)  # fmt: skip
    assert resumed.resumed_from_step == 2
    assert [(h["reward/total"], h["tokens/total"]) for h in resumed.history] == [
        (h["reward/total"], h["tokens/total"]) for h in result.history
    ]
    for role in ("long", "short"):
        a = load_file(str(out / role / "model.safetensors"))
        b = load_file(str(resumed_dir / role / "model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fresh_adapters_do_not_depend_on_what_drew_from_the_rng_before(protocol_pair, demo_rows_small, tmp_path):
    """A fresh pipeline (SFT drew from torch's RNG first) and one whose upstream stages came from the cache
    start RL from the same adapters: the run's seed draws them."""
    runs = []
    for before in (1, 2):
        torch.manual_seed(before)
        out = tmp_path / f"after-{before}"
        runs.append(train_pair_rl(protocol_pair, protocol_pair, _problems(demo_rows_small), CFG.model_copy(
            update={"steps_per_round": 1}), out, protocol=PROTOCOL))  # fmt: skip
    assert [h["reward/total"] for h in runs[0].history] == [h["reward/total"] for h in runs[1].history]
    for role in ("long", "short"):
        a = load_file(str(tmp_path / "after-1" / role / "model.safetensors"))
        b = load_file(str(tmp_path / "after-2" / role / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


SEQS = [
    TurnSequence(input_ids=[5, 9, 12, 7, 30, 41, 8], loss_mask=[0, 0, 0, 1, 1, 1, 0], episode=0),
    TurnSequence(input_ids=[5, 9, 33, 2, 11], loss_mask=[0, 0, 1, 1, 0], episode=1),
]


@pytest.mark.parametrize("path", ["sliced", "kept columns"])
def test_log_probs_of_the_trained_positions_only_match_the_full_logits(protocol_pair, monkeypatch, path):
    """Above the logits budget (as with a 150k vocabulary) the loss takes the trained positions only: a slice of
    positions at a time, recomputed in backward (Llama/Qwen), or the trained columns (other architectures)."""
    model, tok = load_model(ModelConfig(), path=protocol_pair)
    ids, attn, mask = _pad(SEQS, tok.pad_token_id)
    mask = mask[:, 1:]
    full, full_entropy = _token_logps(model, ids, attn, 0.7)
    monkeypatch.setattr(rl, "_FULL_LOGITS_MAX_BYTES", 0)  # slices of one position
    if path == "kept columns":
        monkeypatch.setattr(rl, "_PLAIN_HEAD_TYPES", frozenset())
    kept, kept_entropy = _token_logps(model, ids, attn, 0.7, mask)
    on = mask.bool()
    assert torch.allclose(kept[on], full[on], atol=1e-5) and torch.allclose(kept_entropy[on], full_entropy[on], atol=1e-5)
    assert not kept[:, 0].any()  # column 0 predicts an untrained token in both rows: never computed
    if path == "sliced":
        assert not kept[~on].any() and not kept_entropy[~on].any()  # only trained positions, not whole columns
    # the loss's gradient is the same either way, in the trunk and in the head
    grads = []
    for use_kept in (False, True):
        model.zero_grad()
        logps, _ = _token_logps(model, ids, attn, 0.7, mask if use_kept else None)
        (logps * mask).sum().backward()
        grads.append((model.model.embed_tokens.weight.grad.clone(), model.lm_head.weight.grad.clone()))
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0], grads[1]))


def test_sliced_log_probs_of_the_reference_run_with_the_adapters_off(protocol_pair, monkeypatch):
    """The KL reference of a LoRA run (the adapters switched off) gives the starting model's log-probs on the
    sliced path too, and leaves the adapters on for training."""
    from peft import get_peft_model  # noqa: PLC0415

    start, tok = load_model(ModelConfig(), path=protocol_pair)
    ids, attn, mask = _pad(SEQS, tok.pad_token_id)
    mask = mask[:, 1:]
    expected, _ = _token_logps(start, ids, attn, 0.7)
    wrapped = get_peft_model(load_model(ModelConfig(), path=protocol_pair)[0], rl.peft_lora(LORA))
    seeded = torch.Generator().manual_seed(0)
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=seeded)  # adapters that change the outputs
    monkeypatch.setattr(rl, "_FULL_LOGITS_MAX_BYTES", 0)
    with torch.no_grad():
        ref, _ = _token_logps(rl._AdaptersOff(wrapped), ids, attn, 0.7, mask)
        adapted, _ = _token_logps(wrapped.get_base_model(), ids, attn, 0.7, mask)
    on = mask.bool()
    assert torch.allclose(ref[on], expected[on], atol=1e-5)
    assert (adapted[on] - expected[on]).abs().max() > 1e-2
