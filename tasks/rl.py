"""Multi-turn GRPO for the Long⊗Short pair, alternating rounds (DESIGN §3, "Multi-turn RL").

For r in 1..R: train the long model for ``steps_per_round`` steps while the short
model is frozen, then the short model while the long one is frozen. A rollout is
a whole episode (``models.protocol.run_episodes``) in which the trained model and
its frozen partner write alternate turns; each problem is played G times at
temperature > 0. Rewards are ``tasks.rewards`` (correctness, format, efficiency).

GRPO (DeepSeekMath, arXiv 2402.03300, eq. 3) as used here:

* advantage per episode, per problem group:  A_i = (r_i − mean_g r) / (std_g r + 1e-4),
  with the unbiased (n − 1) standard deviation, as TRL's GRPOTrainer computes it;
* strictly on-policy, one update per batch, so the ratio π/π_old is 1 and the loss is
  L = −Σ_tokens A·log π(t) / N_tokens  (+ β·k3 KL to the frozen starting model),
  normalised over all trained tokens of the batch (DAPO's token-level mean), written as
  −A·exp(logp − stopgrad(logp)) so its gradient is −A·∇logp (the logged ``loss`` is the
  surrogate's value, −mean A over tokens, plus the KL term); log π uses logits / temperature,
  the distribution the rollouts were sampled from (top-p is not applied);
* k3 KL estimator (Schulman 2020): exp(ref − logp) − (ref − logp) − 1.

Only the trained model's turns get loss. Each of its turns is scored exactly as it
was sampled: prompt ids = tokenize(chat_prompt(SYSTEM_PROMPTS[role], problem) +
history_suffix(previous turns)), completion ids = the ids the backend generated
(``Completion.token_ids``). Partner turns appear only inside those prompts.

Why not TRL's GRPOTrainer with ``rollout_func`` + ``env_mask`` (TRL 1.16, checked
in the installed package): the hook itself runs without vLLM, but each sample is a
single (prompt_ids, completion_ids) pair. A multi-turn episode would have to be
flattened into one completion in which the trained model's earlier turns are its
generated ids while, at generation time, later turns were conditioned on the
*re-tokenized* transcript, so the scored sequence is not the sampled one (BPE merges
across turn boundaries); splitting turns into separate samples breaks GRPO's
fixed groups of ``num_generations`` (episodes have different numbers of turns).
A GRPOTrainer also trains one model, so alternation would mean rebuilding trainers
per phase, and a single atomic checkpoint of both models, both optimizers, the
round/role and RNG states would sit outside the Trainer's own checkpointing. The
loop below is ~300 lines, typed, and scores exactly what was sampled.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.checkpoint

from longshort.config import ConfigError, GenerationConfig, ModelConfig, ProtocolConfig, RLConfig
from longshort.io import replace_tree
from models.factory import load_model
from models.generation import (
    Completion,
    GenerationBackend,
    TransformersBackend,
    close_backend,
    prompt_token_ids,
    resolve_backend,
    save_engine_weights,
)
from models.protocol import SYSTEM_PROMPTS, Episode, history_suffix, run_episodes
from tasks.answers import is_correct
from tasks.rewards import reward_components, weighted_total
from tasks.rl_checkpoint import changed_settings, last_checkpoint, restore_checkpoint, save_checkpoint, save_models
from tasks.sft import peft_lora

log = logging.getLogger(__name__)

Role = Literal["long", "short"]
ROLES: tuple[Role, Role] = ("long", "short")
ADV_EPS = 1e-4
PROBE_SEED_OFFSET = 7_777  # the probe's sampling seed, apart from the training steps' (seed + 1000·(step+1))



@dataclass
class RLResult:
    long_dir: str
    short_dir: str
    steps: int
    history: list[dict[str, Any]]
    resumed_from_step: int | None
    n_problems: int  # after the easy filter
    runtime_s: float
    probes: list[dict[str, Any]] = field(default_factory=list)  # ``probe`` at step 0 and every probe_every


@dataclass
class TurnSequence:
    """One trained turn: ``input_ids`` = prompt + generated ids; ``loss_mask`` marks the generated ones."""

    input_ids: list[int]
    loss_mask: list[int]
    episode: int
    sampler_logps: list[float] | None = None  # per generated id, under the engine that sampled it (vLLM)


# --------------------------------------------------------------------------- rollouts


class RecordingBackend:
    """A backend that keeps every completion it returns, in call order (to recover token ids)."""

    def __init__(self, inner: GenerationBackend):
        self.inner = inner
        self.name = inner.name
        self.calls: list[list[Completion]] = []

    def chat_prompt(self, system: str, user: str) -> str:
        return self.inner.chat_prompt(system, user)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[list[Completion]]:
        outs = self.inner.generate(prompts, **kwargs)
        self.calls.append([o[0] for o in outs])
        return outs


def turn_completions(
    episodes: Sequence[Episode], role: Role, calls: Sequence[list[Completion]]
) -> list[dict[int, Completion]]:
    """Map each episode's turns of ``role`` to the completions that wrote them: [{turn index: completion}].

    ``run_episodes`` calls a role's backend once per turn of that role, over the
    episodes still running, in episode order; so call j holds turn 2j (long) or
    2j+1 (short) of every episode that has that many turns.
    """
    out: list[dict[int, Completion]] = [{} for _ in episodes]
    for j, completions in enumerate(calls):
        t = 2 * j + (0 if role == "long" else 1)
        playing = [i for i, e in enumerate(episodes) if len(e.turns) > t]
        if len(playing) != len(completions):
            raise RuntimeError(f"turn {t}: {len(completions)} completions recorded for {len(playing)} episodes")
        for i, c in zip(playing, completions, strict=True):
            if episodes[i].turns[t].text != c.text or episodes[i].turns[t].role != role:
                raise RuntimeError(f"episode {i} turn {t}: recorded completion does not match the turn")
            out[i][t] = c
    return out


def trained_turn_sequences(
    episodes: Sequence[Episode], role: Role, completions: Sequence[Mapping[int, Completion]], tokenizer
) -> list[TurnSequence]:
    """The sequences that carry loss: one per turn of ``role``; only its generated ids are unmasked.
    A completion's sampler log-probs (vLLM) go with its turn when there is one per generated id."""
    seqs = []
    for i, (episode, by_turn) in enumerate(zip(episodes, completions, strict=True)):
        chat = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPTS[role]}, {"role": "user", "content": episode.problem}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for t, turn in enumerate(episode.turns):
            if turn.role != role:
                continue
            completion, lps = list(by_turn[t].token_ids), list(by_turn[t].logprobs)
            if not completion:
                continue
            prompt = tokenizer(chat + history_suffix(episode.turns[:t]), add_special_tokens=False)["input_ids"]
            seqs.append(TurnSequence(prompt + completion, [0] * len(prompt) + [1] * len(completion), i,
                                     lps if len(lps) == len(completion) else None))  # fmt: skip
    return seqs


def _zero_spread(rewards: Sequence[float], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards as [groups, G] (float64) and which groups' rewards are all equal (to 1e-9)."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    return r, (r.amax(dim=1) - r.amin(dim=1)) <= 1e-9


def group_advantages(rewards: Sequence[float], group_size: int) -> list[float]:
    """A_i = (r_i − mean_g) / (std_g + 1e-4) over consecutive groups of ``group_size`` (unbiased std).

    A group whose rewards are all equal gets exactly 0, not the rounding of its mean divided by 1e-4."""
    r, flat = _zero_spread(rewards, group_size)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + ADV_EPS)
    return adv.masked_fill(flat.unsqueeze(1), 0.0).flatten().tolist()


def zero_spread_share(rewards: Sequence[float], group_size: int) -> float:
    """The share of groups whose G rewards are all equal: no signal, every advantage 0 (``group_advantages``).

    Equal rewards, not a zero standard deviation: in float32 eight rewards of 2.6 have a std of 2.6e-7."""
    return float(_zero_spread(rewards, group_size)[1].double().mean())


def pass_rates(
    problems: Sequence[Mapping[str, str]],
    long_backend,
    short_backend,
    cfg: RLConfig,
    protocol: ProtocolConfig,
) -> list[float]:
    """Fraction of G sampled episodes per problem whose final answer is correct."""
    episodes = run_episodes(
        [p["problem"] for p in problems for _ in range(cfg.group_size)],
        long_backend,
        short_backend,
        **_episode_kwargs(cfg, protocol),
        seed=cfg.seed - 1,
    )
    hits = [is_correct(e.answer, p["answer"]) for e, p in zip(episodes, _repeat(problems, cfg.group_size), strict=True)]
    return [sum(hits[k : k + cfg.group_size]) / cfg.group_size for k in range(0, len(hits), cfg.group_size)]


def _repeat(items: Sequence, n: int) -> list:
    return [x for x in items for _ in range(n)]


def _episode_kwargs(cfg: RLConfig, protocol: ProtocolConfig) -> dict[str, Any]:
    cap = cfg.length_target if cfg.cap_rollout_at_length_target else None
    return dict(
        max_turns=protocol.max_turns,
        max_new_tokens_long=min(protocol.max_new_tokens_long, cap or protocol.max_new_tokens_long),
        max_new_tokens_short=min(protocol.max_new_tokens_short, cap or protocol.max_new_tokens_short),
        max_episode_tokens=cap,  # L_R = L_T: generation stops there, the episode's turns together
        temperature=cfg.temperature,
    )


# --------------------------------------------------------------------------- loss


# Largest fp32 logits tensor (micro-batch x length x vocab) that the loss takes whole. Above it (a 150k-token
# vocabulary over long episodes) only the positions that predict trained tokens are projected onto the vocabulary,
# in slices of at most this many bytes of logits, and each slice's logits are recomputed in the backward pass
# instead of kept: a Qwen2.5-7B micro-batch of 4 x 4,096 trained tokens would otherwise hold ~10 GB per fp32 copy
# of its logits (the projection, its log-softmax, the entropy's temporaries and their gradients: several copies).
_FULL_LOGITS_MAX_BYTES = 256 * 2**20
# Architectures whose logits are exactly ``get_output_embeddings()(get_decoder()(...).last_hidden_state)``
# (no soft-capping or logit scale): the sliced path splits the model there. Others take the kept-columns path.
_PLAIN_HEAD_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def _logps_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and the entropy at each position of ``logits`` ([..., vocab] -> [...], [...]), at the temperature."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def _slice_logps(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_logps_and_entropy`` of the head's logits at ``hidden``'s positions ([n, d] -> [n], [n])."""
    return _logps_and_entropy(head(hidden), targets, temperature)


def _trained_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_token_logps`` at the trained positions only, the head applied a slice of positions at a time under
    activation checkpointing (the trick of Liger's fused linear cross-entropy, in plain PyTorch): peak memory
    holds one slice's logits, not the micro-batch's. Untrained positions are 0."""
    batch, length = input_ids.shape
    vocab = model.config.get_text_config().vocab_size
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows, cols = loss_mask.bool().nonzero(as_tuple=True)  # position j predicts x_{j+1}
    hidden, targets = hidden[rows, cols], input_ids[rows, cols + 1]
    head = model.get_output_embeddings()
    size = max(1, _FULL_LOGITS_MAX_BYTES // (vocab * 4))
    parts = []
    for start in range(0, len(targets), size):
        args = (head, hidden[start : start + size], targets[start : start + size], temperature)
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(_slice_logps, *args, use_reentrant=False))
        else:
            parts.append(_slice_logps(*args))
    logps = torch.zeros(batch, length - 1, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logps)
    if parts:
        logps = logps.index_put((rows, cols), torch.cat([p[0] for p in parts]))
        entropy = entropy.index_put((rows, cols), torch.cat([p[1] for p in parts]))
    return logps, entropy


def _token_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(x_t | x_<t) at the sampling temperature, and the entropy, for t ≥ 1.

    With ``loss_mask`` (``[batch, length - 1]``, 1 where x_t is trained) and logits too big to build
    whole, only the trained positions are computed (``_trained_logps``; for other architectures, the
    columns some row trains, through ``logits_to_keep``); the others are 0.
    """
    batch, length = input_ids.shape
    vocab = model.config.get_text_config().vocab_size
    keep = None
    if loss_mask is not None and batch * (length - 1) * vocab * 4 > _FULL_LOGITS_MAX_BYTES:
        if model.config.model_type in _PLAIN_HEAD_TYPES:
            return _trained_logps(model, input_ids, attention_mask, temperature, loss_mask)
        keep = loss_mask.any(0).nonzero().squeeze(-1)  # column j: the logits at j predict x_{j+1}
    if keep is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets = input_ids[:, 1:]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        targets = input_ids[:, keep + 1]
    logps, entropy = _logps_and_entropy(logits, targets, temperature)
    if keep is not None:
        full = torch.zeros(batch, length - 1, dtype=logps.dtype, device=logps.device)
        logps = full.index_copy(1, keep, logps)
        entropy = full.detach().index_copy(1, keep, entropy)
    return logps, entropy


def _pad(seqs: Sequence[TurnSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for k, s in enumerate(seqs):  # right padding: positions start at 0 as at generation
        n = len(s.input_ids)
        ids[k, :n] = torch.tensor(s.input_ids)
        attn[k, :n] = 1
        mask[k, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
    return ids, attn, mask


def _sampler_logps(seqs: Sequence[TurnSequence], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's log-probabilities laid out like ``_token_logps`` (position j predicts id j + 1), and a mask
    of the trained tokens that have one (a sequence without them, or a NaN, gets no correction)."""
    mu = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    has = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for k, s in enumerate(seqs):
        if not s.sampler_logps:
            continue
        positions = [j for j in range(len(s.input_ids) - 1) if s.loss_mask[j + 1]]
        if len(positions) != len(s.sampler_logps):
            raise ValueError(f"sequence {k}: {len(s.sampler_logps)} sampler log-probs for {len(positions)} trained ids")
        values = torch.tensor(s.sampler_logps, dtype=torch.float32)
        known = ~torch.isnan(values)
        mu[k, positions] = torch.nan_to_num(values, nan=0.0)
        has[k, positions] = known.float()
    return mu, has


def policy_update(
    model,
    ref_model,
    optimizer: torch.optim.Optimizer,
    seqs: Sequence[TurnSequence],
    advantages: Sequence[float],
    pad_id: int,
    cfg: RLConfig,
) -> dict[str, float]:
    """One on-policy GRPO step over all trained turns; returns loss, KL, entropy, grad norm.

    Turns sampled by another engine (``TurnSequence.sampler_logps``) have each token's term weighted by
    min(π_θ(t) / π_sampler(t), ``rl.vllm_importance_sampling_cap``), detached (truncated importance
    sampling, Yao et al. 2025; TRL's ``vllm_importance_sampling_mode="token_truncate"``): vLLM's kernels
    sample from a slightly different distribution than the one trained. Then ``is_ratio`` (the mean
    ratio before the cap) and ``is_capped`` (the share capped), over the tokens corrected, are reported too.

    With β = 0 (or no reference model) and ``rl.skip_zero_advantage``, turns whose advantage is 0 are left out of
    the forward/backward: their terms are 0, so the gradient is the same (the mean still divides by every trained
    token), and ``updated_tokens`` counts the tokens that went through. ``entropy`` is the mean over those, and is left
    out when there are none."""
    n_tokens = sum(sum(s.loss_mask) for s in seqs)
    kl_on = ref_model is not None and cfg.kl_coef > 0
    if cfg.skip_zero_advantage and not kl_on:
        seqs = [s for s in seqs if advantages[s.episode] != 0.0]
    n_updated = sum(sum(s.loss_mask) for s in seqs)
    stats = {"loss": 0.0, "kl": 0.0, "entropy": 0.0,
             "trained_tokens": float(n_tokens), "updated_tokens": float(n_updated)}  # fmt: skip
    if n_tokens == 0:
        return stats | {"grad_norm": 0.0}
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    is_sums = {"ratio": 0.0, "capped": 0.0, "tokens": 0.0}
    for start in range(0, len(seqs), cfg.micro_batch_size):
        chunk = seqs[start : start + cfg.micro_batch_size]
        ids, attn, mask = (x.to(device) for x in _pad(chunk, pad_id))
        mask = mask[:, 1:]
        adv = torch.tensor([advantages[s.episode] for s in chunk], dtype=torch.float32, device=device).unsqueeze(1)
        logps, entropy = _token_logps(model, ids, attn, cfg.temperature, mask)
        # ratio = exp(logp - logp.detach()) = 1 on-policy; its gradient is ∇logp
        per_token = -adv * torch.exp(logps - logps.detach())
        cap = cfg.vllm_importance_sampling_cap
        if cap is not None and any(s.sampler_logps for s in chunk):
            mu, has = (x.to(device) for x in _sampler_logps(chunk, ids.shape[1]))
            ratio = torch.exp((logps.detach() - mu) * has)  # 1 where there is no sampler log-prob
            per_token = per_token * torch.clamp(ratio, max=cap)
            counted = mask * has
            is_sums["ratio"] += float((ratio * counted).sum())
            is_sums["capped"] += float(((ratio > cap).float() * counted).sum())
            is_sums["tokens"] += float(counted.sum())
        if kl_on:
            with torch.no_grad():
                ref_logps, _ = _token_logps(ref_model, ids, attn, cfg.temperature, mask)
            delta = ref_logps - logps
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + cfg.kl_coef * kl
            stats["kl"] += float((kl.detach() * mask).sum()) / n_tokens
        loss = (per_token * mask).sum() / n_tokens
        loss.backward()
        stats["loss"] += float(loss.detach())
        stats["entropy"] += float((entropy * mask).sum()) / n_updated
    if not n_updated:
        del stats["entropy"]  # no token went through: not measured (0 would read as a collapse)
    if not seqs:  # every turn skipped: the zero gradient they would have given, so that the optimizer steps as it
        for param in model.parameters():  # would have (AdamW's momentum still moves the weights)
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    model.eval()
    if is_sums["tokens"]:
        stats |= {"is_ratio": is_sums["ratio"] / is_sums["tokens"], "is_capped": is_sums["capped"] / is_sums["tokens"]}
    return stats | {"grad_norm": float(grad_norm)}


# --------------------------------------------------------------------------- the loop


def phase_of(step: int, cfg: RLConfig) -> tuple[int, Role]:
    """(round, role) of a 0-based global step: round r trains long, then short."""
    block = step // cfg.steps_per_round
    return block // 2, ROLES[block % 2]


def _check_problems(problems: Sequence[Mapping[str, Any]]) -> None:
    for k, p in enumerate(problems):
        for key in ("problem", "answer"):
            if not isinstance(p.get(key), str):
                raise ValueError(f"problems[{k}]: field {key!r} must be a string, got {type(p.get(key)).__name__}")
    if not problems:
        raise ValueError("RL needs at least one problem")


@dataclass
class _Pair:
    models: dict[str, Any]  # what trains (with LoRA: the model with its adapters injected)
    tokenizers: dict[str, Any]
    backends: dict[str, GenerationBackend] = field(default_factory=dict)  # what generates: the models, or vLLM engines
    adapters: dict[str, Any] = field(default_factory=dict)  # with LoRA: peft's wrapper of each model
    engine_weights_dir: Path | None = None  # with vLLM engines: where a trained model's weights pass to its engine
    devices: dict[str, torch.device] = field(default_factory=dict)  # with engines: where each model trains
    refs: dict[str, Any] = field(default_factory=dict)  # full-weight reference models (kl_coef > 0), placed as models

    def place(self, role: Role, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        """With vLLM engines only the trained model needs the accelerator: its partner plays through its
        engine, so its weights (and optimizer state) wait in host memory until its own phase (15 GB of a
        7B pair's GPU memory), and so does its full-weight reference model when there is one."""
        if self.engine_weights_dir is None:
            return
        for r, model in self.models.items():
            want = self.devices[r] if r == role else torch.device("cpu")
            if r in self.refs and next(self.refs[r].parameters()).device != want:
                self.refs[r].to(want)  # the KL term runs the reference next to the model it holds back
            if next(model.parameters()).device != want:
                model.to(want)  # the same Parameter objects: the optimizer keeps its references
                for state in optimizers[r].state.values():  # as Optimizer.load_state_dict places it: all but "step"
                    for key, value in state.items():
                        if key != "step" and torch.is_tensor(value):
                            state[key] = value.to(want)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sync_engine(self, role: Role) -> None:
        """Give ``role``'s vLLM engine the model's current weights (nothing when the model generates itself)."""
        if self.engine_weights_dir is None:
            return
        path = save_engine_weights(self.models[role], self.engine_weights_dir / f"{role}.safetensors")
        self.backends[role].load_weights(path)  # type: ignore[attr-defined] - a VLLMBackend
        path.unlink()  # a 7B model's file is ~15 GB

    def savable(self) -> dict[str, Any]:
        """What a checkpoint saves: the adapters with LoRA, else the whole models."""
        return self.adapters or self.models

    def merged(self) -> dict[str, Any]:
        """The trained models as plain transformers models (LoRA folded into the weights)."""
        return {r: a.merge_and_unload() for r, a in self.adapters.items()} if self.adapters else self.models


class _AdaptersOff:
    """The model a LoRA model started from, for the KL term: the same weights with the adapters off."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model
        self.config = peft_model.get_base_model().config

    def __call__(self, **inputs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model.get_base_model()(**inputs)

    def get_decoder(self) -> Callable[..., Any]:
        return self._off(self.peft_model.get_base_model().get_decoder())

    def get_output_embeddings(self) -> Callable[..., Any]:
        return self._off(self.peft_model.get_base_model().get_output_embeddings())

    def _off(self, module: Any) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.peft_model.disable_adapter():
                return module(*args, **kwargs)

        return run


def _load_pair(
    long_dir: Path, short_dir: Path, model_cfg: ModelConfig, cfg: RLConfig | None = None, adapters: Path | None = None
) -> _Pair:
    """Both models. With ``cfg.lora`` each gets fresh adapters, or those saved under ``adapters/<role>``."""
    pair = _Pair({}, {})
    for role, path in zip(ROLES, (long_dir, short_dir), strict=True):
        model, tokenizer = load_model(model_cfg, path=path)
        if cfg is not None and cfg.lora is not None:
            from peft import PeftModel, get_peft_model  # noqa: PLC0415

            if adapters is not None:
                wrapped = PeftModel.from_pretrained(model, str(adapters / role), is_trainable=True)
            else:
                # lora_A is drawn from the global RNG: seed it from the run, not from whatever ran before in
                # this process (a fresh pipeline and one whose SFT stages came from the cache must agree)
                torch.manual_seed(cfg.seed + ROLES.index(role))
                wrapped = get_peft_model(model, peft_lora(cfg.lora))
            pair.adapters[role] = wrapped
            model = wrapped.get_base_model()  # the adapters are injected into its modules
        if cfg is not None and cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pair.models[role], pair.tokenizers[role] = model, tokenizer
        pair.backends[role] = TransformersBackend(model, tokenizer)
    return pair


_TURN_MARGIN = 32  # tokens per turn for the separators and re-tokenization the turn caps do not count


def rollout_context_tokens(
    problems: Sequence[Mapping[str, Any]], tokenizer: Any, cfg: RLConfig, protocol: ProtocolConfig
) -> int:
    """The longest context an RL episode can reach: the longest chat prompt plus every turn at its cap, or
    plus L_T when the rollout is capped there (plus a margin per turn either way)."""
    kw = _episode_kwargs(cfg, protocol)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPTS[role]}, {"role": "user", "content": p["problem"]}],
            tokenize=False, add_generation_prompt=True,
        )
        for p in problems
        for role in ROLES
    ]  # fmt: skip
    longest = max(len(ids) for ids in prompt_token_ids(tokenizer, prompts))
    turn = max(kw["max_new_tokens_long"], kw["max_new_tokens_short"])
    generated = kw["max_turns"] * turn
    if kw["max_episode_tokens"] is not None:
        generated = min(generated, kw["max_episode_tokens"])
    return longest + generated + kw["max_turns"] * _TURN_MARGIN


def engine_context(episode_context: int, profile_limit: int | None, model_limit: int | None) -> int | None:
    """The ``max_model_len`` of an RL engine: the longest context an episode reaches (:func:`rollout_context_tokens`),
    or the profile's ``generation.max_model_len`` where that is shorter (it wins: a cap the user set). vLLM reserves
    KV cache for one whole ``max_model_len`` sequence at start, so a profile's 32k (set for evaluation's long
    episodes) would make an RL engine's share of the GPU hold 32k tokens where episodes reach ~5k. None (the
    model's own context) when the episodes reach it anyway."""
    if profile_limit is not None:
        return min(episode_context, profile_limit)
    return episode_context if model_limit is None or episode_context < model_limit else None


def _start_engines(
    pair: _Pair,
    paths: Mapping[str, Path],
    gen: GenerationConfig,
    cfg: RLConfig,
    model_cfg: ModelConfig,
    context: int,
    weights_dir: Path,
) -> None:
    """Put a vLLM engine in front of each model: rollouts, probes and the easy filter sample from them.

    Each engine starts from ``paths[role]`` and takes ``rl.vllm_gpu_memory_utilization`` of the GPU;
    both stay up, next to the model being trained. After each update the trained model's weights go
    to its engine (:meth:`_Pair.sync_engine`), so every step samples from the current policy.
    """
    from models.generation import VLLMBackend  # noqa: PLC0415 - the GPU path

    # an engine refuses to start unless its share is free: the models wait in host memory meanwhile, and
    # ``_Pair.place`` brings back only the one a step trains
    pair.devices = {r: next(m.parameters()).device for r, m in pair.models.items()}
    for model in [*pair.models.values(), *pair.refs.values()]:
        model.to("cpu")  # VLLMBackend frees what they leave in the CUDA cache before the engine starts
    engine_gen = gen.model_copy(update={"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization})
    for role in ROLES:
        limit = getattr(pair.models[role].config, "max_position_embeddings", None)
        max_len = engine_context(context, gen.max_model_len, limit)
        pair.backends[role] = VLLMBackend(
            str(paths[role]), model_cfg, engine_gen, seed=cfg.seed, tensor_parallel_size=gen.tensor_parallel_size,
            max_model_len=max_len, weight_updates=True, sample_logprobs=cfg.vllm_importance_sampling_cap is not None,
        )  # fmt: skip
    pair.engine_weights_dir = weights_dir


def score_episodes(
    episodes: Sequence[Episode], references: Sequence[str], cfg: RLConfig, role: Role | None
) -> tuple[dict[str, list[float]], list[float]]:
    """Each reward term per episode and the weighted total, as a training step of ``role`` scores them
    (``role`` None: lengths are the episode's tokens whatever ``length_of`` says)."""
    total = [e.tokens() for e in episodes]
    over_cap = [cfg.cap_rollout_at_length_target and n > cfg.length_target for n in total]
    parts = reward_components(
        [None if cut else e.answer for e, cut in zip(episodes, over_cap, strict=True)],
        list(references),
        [e.transcript for e in episodes],
        total if cfg.length_of == "episode" or role is None else [e.tokens(role) for e in episodes],
        group_size=cfg.group_size,
        efficiency=cfg.efficiency,
        length_target=cfg.length_target,
        alpha=cfg.alpha,
    )
    # L_R = L_T: rollouts stop at the cap (run_episodes); a longer episode from elsewhere counts as cut off there,
    # so neither correct nor well formed
    parts["format"] = [0.0 if cut else f for f, cut in zip(parts["format"], over_cap, strict=True)]
    weights = {"correctness": cfg.correctness_weight, "format": cfg.format_weight, "efficiency": cfg.efficiency_weight}
    return parts, weighted_total(parts, weights)


def probe(
    step: int, problems: Sequence[Mapping[str, str]], pair: _Pair, cfg: RLConfig, protocol: ProtocolConfig
) -> dict[str, float]:
    """The pair's mean reward on a FIXED batch: G episodes per probe problem, same seed at every probe.

    A training step's reward is measured on freshly drawn prompts, so its curve is noisy; the probe
    plays the same problems with the same sampling seed each time, so differences between probes
    are the models' (common random numbers). Step 0 is the starting (SFT) pair. Lengths are
    the episode's tokens (long + short) whatever ``length_of`` says.
    """
    rows = _repeat(problems, cfg.group_size)
    episodes = run_episodes(
        [p["problem"] for p in rows],
        pair.backends["long"],
        pair.backends["short"],
        **_episode_kwargs(cfg, protocol),
        seed=cfg.seed + PROBE_SEED_OFFSET,
    )
    parts, rewards = score_episodes(episodes, [p["answer"] for p in rows], cfg, None)
    g = cfg.group_size
    return {
        "step": step,
        "reward": float(np.mean(rewards)),
        "problem_rewards": [float(np.mean(rewards[i : i + g])) for i in range(0, len(rewards), g)],  # probe order
        "accuracy": float(np.mean(parts["correctness"])),
        "tokens": float(np.mean([e.tokens() for e in episodes])),
        "turns": float(np.mean([len(e.turns) for e in episodes])),
    }


def probe_gain(probes: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, float]:
    """The mean probe reward's change from the first probe (the SFT pair) to the last, with a 95% interval
    resampling the probe problems in pairs (each played by both pairs with the same seed): ``rl_probe_reward_gain``
    and ``_ci_low``/``_ci_high``. Empty with fewer than two probes or probes without per-problem rewards."""
    from tasks.intervals import bootstrap_interval  # noqa: PLC0415

    if len(probes) < 2 or "problem_rewards" not in probes[0] or "problem_rewards" not in probes[-1]:
        return {}
    start, end = probes[0]["problem_rewards"], probes[-1]["problem_rewards"]
    out = {"rl_probe_reward_gain": math.fsum(end) / len(end) - math.fsum(start) / len(start)}
    ci = bootstrap_interval(end, reference=start, seed=seed)
    if ci is not None:
        out |= {"rl_probe_reward_gain_ci_low": ci[0], "rl_probe_reward_gain_ci_high": ci[1]}
    return out


def rl_step(
    step: int,
    batch: Sequence[Mapping[str, str]],
    pair: _Pair,
    refs: Mapping[str, Any],
    optimizers: Mapping[str, torch.optim.Optimizer],
    cfg: RLConfig,
    protocol: ProtocolConfig,
) -> dict[str, Any]:
    """Roll out G episodes per problem with the pair, score them, update the trained model once."""
    round_idx, role = phase_of(step, cfg)
    recorder = RecordingBackend(pair.backends[role])
    backends = {r: recorder if r == role else pair.backends[r] for r in ROLES}
    rows = _repeat(batch, cfg.group_size)
    episodes = run_episodes(
        [p["problem"] for p in rows],
        backends["long"],
        backends["short"],
        **_episode_kwargs(cfg, protocol),
        seed=cfg.seed + 1000 * (step + 1),
    )
    parts, rewards = score_episodes(episodes, [p["answer"] for p in rows], cfg, role)
    total = [e.tokens() for e in episodes]
    advantages = group_advantages(rewards, cfg.group_size)
    turns = turn_completions(episodes, role, recorder.calls)
    seqs = trained_turn_sequences(episodes, role, turns, pair.tokenizers[role])
    stats = policy_update(
        pair.models[role], refs.get(role), optimizers[role], seqs, advantages, pair.tokenizers[role].pad_token_id, cfg
    )
    pair.sync_engine(role)  # the next rollouts sample from the updated policy (on-policy)
    correct = [c == 1.0 for c in parts["correctness"]]
    metrics: dict[str, Any] = {"step": step + 1, "round": round_idx, "role": role}
    metrics |= {f"reward/{k}": float(np.mean(v)) for k, v in parts.items()}
    metrics |= {
        "reward/total": float(np.mean(rewards)),
        "reward/zero_std_groups": zero_spread_share(rewards, cfg.group_size),
        "accuracy": float(np.mean(correct)),
        "tokens/long": float(np.mean([e.tokens("long") for e in episodes])),
        "tokens/short": float(np.mean([e.tokens("short") for e in episodes])),
        "tokens/total": float(np.mean(total)),
        "turns": float(np.mean([len(e.turns) for e in episodes])),
    }
    for name, keep in (("correct", True), ("wrong", False)):
        lengths = [n for n, c in zip(total, correct, strict=True) if c == keep]
        if lengths:
            metrics[f"tokens/{name}"] = float(np.mean(lengths))
    metrics |= {k: v for k, v in stats.items() if k != "kl" or role in refs}
    return metrics


def quarter_means(history: Sequence[Mapping[str, Any]], fields: Mapping[str, str]) -> dict[str, float]:
    """``rl_{name}_first_quarter`` / ``rl_{name}_last_quarter``: a field's mean over the first and the last
    quarter of the RL steps (at least one step each). Each step samples new prompts, so one step's
    reward is noisy; these say whether training moved it."""
    q = max(1, len(history) // 4)
    out: dict[str, float] = {}
    for name, key in fields.items():
        for part, steps in (("first", history[:q]), ("last", history[-q:])):
            out[f"rl_{name}_{part}_quarter"] = sum(float(h[key]) for h in steps) / len(steps)
    return out


def train_pair_rl(
    long_dir: str | Path,
    short_dir: str | Path,
    problems: Sequence[Mapping[str, Any]],
    cfg: RLConfig,
    out_dir: str | Path,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    *,
    protocol: ProtocolConfig = ProtocolConfig(),
    model_cfg: ModelConfig = ModelConfig(),
    probe_problems: Sequence[Mapping[str, Any]] = (),
    generation: GenerationConfig | None = None,
) -> RLResult:
    """Alternating multi-turn GRPO; resumes from ``out_dir``'s last checkpoint when there is one.

    ``problems`` are ``{"problem", "answer"}`` rows. ``on_step`` gets each step's metrics
    after that step's checkpoint (if one is due): ``step`` (1-based), ``round``, ``role``
    (a string), ``reward/{correctness,format,efficiency,total,zero_std_groups}``, ``accuracy``,
    ``tokens/{long,short,total}`` (means per episode), ``tokens/{correct,wrong}`` (when there
    are such episodes), ``turns``, ``loss``, ``kl`` (when β > 0), ``entropy``,
    ``trained_tokens``, ``updated_tokens``, ``grad_norm``. Final models: ``out_dir/long``, ``out_dir/short``.

    With ``cap_rollout_at_length_target`` an episode stops generating at L_T tokens, its turns
    together (``run_episodes``' ``max_episode_tokens``); one cut off there has no answer and is wrong.

    With ``probe_problems`` (best kept out of ``problems``), ``probe`` measures the pair on them
    before the first step, every ``cfg.probe_every`` steps and after the last: ``RLResult.probes``.

    ``generation`` picks how episodes are sampled (``models.generation.resolve_backend``): on vLLM,
    each model gets an engine whose weights follow training step by step; otherwise (and when
    ``generation`` is None) the training models generate with ``model.generate``.
    """
    t0 = time.time()
    _check_problems(problems)
    if probe_problems:
        _check_problems(probe_problems)
    out_dir = Path(out_dir)
    engines = generation is not None and resolve_backend(generation) == "vllm"  # a ConfigError before any loading
    ckpt = last_checkpoint(out_dir)
    if cfg.lora is not None:  # the starting models, with the checkpoint's adapters
        paths = {"long": Path(long_dir), "short": Path(short_dir)}
        pair = _load_pair(paths["long"], paths["short"], model_cfg, cfg, adapters=ckpt)
    else:
        paths = {r: ckpt / r if ckpt else Path(d) for r, d in zip(ROLES, (long_dir, short_dir), strict=True)}
        pair = _load_pair(paths["long"], paths["short"], model_cfg, cfg)
    refs: dict[str, Any] = {}
    if cfg.kl_coef > 0:  # the reference is always the stage's starting model
        refs = {
            r: _AdaptersOff(pair.adapters[r]) if pair.adapters
            else load_model(model_cfg, path=p, device=next(pair.models[r].parameters()).device)[0]
            for r, p in zip(ROLES, (long_dir, short_dir), strict=True)
        }  # fmt: skip
        pair.refs = {r: m for r, m in refs.items() if isinstance(m, torch.nn.Module)}  # not _AdaptersOff: no own weights
    if engines:
        assert generation is not None
        context = rollout_context_tokens([*problems, *probe_problems], pair.tokenizers["long"], cfg, protocol)
        try:  # inside: an engine that started is shut down when the next one fails to
            _start_engines(pair, paths, generation, cfg, model_cfg, context, out_dir / ".engine-weights")
            if ckpt and pair.adapters:  # the engines hold the starting weights; the checkpoint's adapters change them
                for role in ROLES:
                    pair.sync_engine(role)
            return _train(pair, refs, problems, probe_problems, cfg, protocol, out_dir, ckpt, on_step, t0)
        finally:
            for role in ROLES:
                close_backend(pair.backends[role])
    return _train(pair, refs, problems, probe_problems, cfg, protocol, out_dir, ckpt, on_step, t0)


def _train(
    pair: _Pair,
    refs: Mapping[str, Any],
    problems: Sequence[Mapping[str, Any]],
    probe_problems: Sequence[Mapping[str, Any]],
    cfg: RLConfig,
    protocol: ProtocolConfig,
    out_dir: Path,
    ckpt: Path | None,
    on_step: Callable[[dict[str, Any]], None] | None,
    t0: float,
) -> RLResult:
    """``train_pair_rl``'s loop, once the pair (and its engines) are up."""
    total_steps = 2 * cfg.rounds * cfg.steps_per_round
    optimizers = {
        r: torch.optim.AdamW(
            [p for p in pair.models[r].parameters() if p.requires_grad], lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
        )
        for r in ROLES
    }
    torch.manual_seed(cfg.seed)
    state: dict[str, Any] = {}
    if ckpt:
        state = restore_checkpoint(ckpt, optimizers)
        log.info("RL: resuming from %s (step %d of %d)", ckpt, state["step"], total_steps)
        if changed := changed_settings(state["config"], cfg.model_dump(mode="json")):
            log.warning("RL: resuming %s with changed settings %s", ckpt, changed)
        pool_idx = state["pool"]
    elif cfg.easy_filter:
        rates = pass_rates(problems, pair.backends["long"], pair.backends["short"], cfg, protocol)
        pool_idx = [k for k, rate in enumerate(rates) if rate > 0.5]
        log.info("RL easy filter: kept %d of %d problems (pass rate > 0.5)", len(pool_idx), len(problems))
        if not pool_idx:
            raise ConfigError(  # the profile asks for what this pair cannot give: say which field, not a traceback
                f"rl.easy_filter kept none of {len(problems)} problems (pass rate > 0.5 under the starting pair); "
                "set rl.easy_filter: false, or train the pair longer first"
            )
    else:
        pool_idx = list(range(len(problems)))
    history: list[dict[str, Any]] = state.get("history", [])
    probes: list[dict[str, Any]] = state.get("probes", [])
    start = state.get("step", 0)
    if probe_problems and start == 0:
        probes.append(probe(0, probe_problems, pair, cfg, protocol))
        log.info("RL probe before training: %s", probes[-1])

    for step in range(start, total_steps):
        pick = random.Random(cfg.seed * 1_000_003 + step)  # the batch depends on (seed, step) only
        chosen = pick.sample(range(len(pool_idx)), min(cfg.prompts_per_step, len(pool_idx)))
        pair.place(phase_of(step, cfg)[1], optimizers)
        metrics = rl_step(step, [problems[pool_idx[k]] for k in chosen], pair, refs, optimizers, cfg, protocol)
        history.append(metrics)
        log.info("RL step %d/%d (%s): %s", step + 1, total_steps, metrics["role"], metrics)
        if probe_problems and ((step + 1) % cfg.probe_every == 0 or step + 1 == total_steps):
            probes.append(probe(step + 1, probe_problems, pair, cfg, protocol))
            log.info("RL probe after step %d: %s", step + 1, probes[-1])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps:
            round_idx, role = phase_of(step, cfg)
            saved = {"step": step + 1, "round": round_idx, "role": role, "pool": pool_idx, "history": history}
            saved["probes"] = probes
            saved["config"] = cfg.model_dump(mode="json")
            save_checkpoint(out_dir, step + 1, pair.savable(), pair.tokenizers, optimizers, saved, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(metrics)

    final_tmp = out_dir / ".tmp-final"
    shutil.rmtree(final_tmp, ignore_errors=True)
    save_models(pair.merged(), pair.tokenizers, final_tmp)
    for role in ROLES:
        replace_tree(final_tmp / role, out_dir / role)
    shutil.rmtree(final_tmp, ignore_errors=True)
    return RLResult(
        long_dir=str(out_dir / "long"),
        short_dir=str(out_dir / "short"),
        steps=total_steps,
        history=history,
        resumed_from_step=start if ckpt else None,
        n_problems=len(pool_idx),
        runtime_s=time.time() - t0,
        probes=probes,
    )
