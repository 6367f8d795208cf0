"""Alternating multi-turn GRPO: advantages, loss masking, an end-to-end round, kill and resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_prompt, fit_completions, protocol_turns
from longshort.config import ConfigError, ModelConfig, ProtocolConfig
from models.factory import load_model
from models.generation import Completion, TransformersBackend
from models.protocol import TURN_SEP, Episode, Turn, format_long_turn, format_short_turn
from tasks.rl import (
    RLConfig,
    TurnSequence,
    group_advantages,
    pass_rates,
    _load_pair,
    phase_of,
    policy_update,
    probe,
    probe_gain,
    quarter_means,
    trained_turn_sequences,
    train_pair_rl,
    turn_completions,
    zero_spread_share,
)

PROTOCOL = ProtocolConfig(max_turns=2, max_new_tokens_long=16, max_new_tokens_short=16)
CFG = RLConfig(
    rounds=1, steps_per_round=1, prompts_per_step=2, group_size=4, learning_rate=3e-3, kl_coef=0.05,
    efficiency="kimi", format_weight=0.5, checkpoint_every=1, temperature=1.0, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def solving_pair(protocol_pair, demo_rows_small, tmp_path_factory) -> str:
    """``protocol_pair`` fitted on to ``train[:2]`` until the pair solves those two problems (nll < 0.01):
    ``protocol_pair`` alone writes the protocol but solves none of its problems at T=1."""
    train, _ = demo_rows_small
    return fit_completions(protocol_pair, protocol_turns(train[:2]), 60, tmp_path_factory.mktemp("solving-pair"))[0]


@pytest.fixture(scope="module")
def problems(demo_rows_small) -> list[dict]:
    train, _ = demo_rows_small
    return [{"problem": r["problem"], "answer": r["answer"]} for r in train[8:14]]


def _weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_group_advantages_by_hand():
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5; group 2: std 0 → all 0
    got = group_advantages([1, 0, 0, 0, 2, 2, 2, 2], group_size=4)
    d = 0.5 + 1e-4
    assert got == pytest.approx([0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 2.0], group_size=4)


def test_groups_without_signal_are_counted_by_equal_rewards_not_by_a_float32_std():
    """With the default weights a group of eight correct short episodes scores 1 + 0.1 + 0.5 = 2.6 each; in float32
    their std is 2.6e-7, and such groups were counted as carrying signal (the qwen2.5-7b profile has G = 8)."""
    r = 1.0 + 0.1 * 1.0 + 1.0 * 0.5
    assert float(torch.tensor([r] * 8).std()) != 0.0  # what the old metric tested
    rewards = [r] * 8 + [2.1] * 8 + [0.1] * 8 + [2.6] * 7 + [2.1]
    assert zero_spread_share(rewards, 8) == 0.75
    assert zero_spread_share([1, 0, 0, 0, 2, 2, 2, 2], 4) == 0.5


def test_phase_schedule_alternates_long_then_short():
    cfg = RLConfig(rounds=2, steps_per_round=3)
    assert [phase_of(s, cfg) for s in range(12)] == (
        [(0, "long")] * 3 + [(0, "short")] * 3 + [(1, "long")] * 3 + [(1, "short")] * 3
    )


def test_only_the_trained_roles_tokens_carry_loss(demo_tokenizer):
    tok = demo_tokenizer
    problem = "Start with 3. Then (1) add 4. What is the final number?"
    texts = [("long", format_long_turn("3 + 4 = 7")), ("short", "<answer>7 so far</rethink>"),
             ("long", format_long_turn("check 7")), ("short", format_short_turn("\\boxed{7}", True))]  # fmt: skip
    ids = {t: tuple(tok(text, add_special_tokens=False)["input_ids"]) for t, (_, text) in enumerate(texts)}
    ep_full = Episode(problem, [Turn(r, x, len(ids[t])) for t, (r, x) in enumerate(texts)], "7", "answer")
    ep_short = Episode(problem, [Turn(r, x, len(ids[t])) for t, (r, x) in enumerate(texts[:2])], None, "malformed")
    ep_one = Episode(problem, [Turn("long", "<think> oops", 3)], None, "malformed")
    episodes = [ep_full, ep_short, ep_one]

    # the short backend was called for turn 1 of episodes 0 and 1, then for turn 3 of episode 0
    completion = {t: Completion(texts[t][1], len(ids[t]), "stop", ids[t]) for t in (1, 3)}
    calls = [[completion[1], completion[1]], [completion[3]]]
    by_turn = turn_completions(episodes, "short", calls)
    assert [{t: c.token_ids for t, c in d.items()} for d in by_turn] == [{1: ids[1], 3: ids[3]}, {1: ids[1]}, {}]

    seqs = trained_turn_sequences(episodes, "short", by_turn, tok)
    assert [s.episode for s in seqs] == [0, 0, 1]
    for seq, t in zip(seqs, (1, 3, 1)):
        n = sum(seq.loss_mask)
        assert n == len(ids[t]) and seq.loss_mask[-n:] == [1] * n and 1 not in seq.loss_mask[:-n]
        assert tok.decode(seq.input_ids[-n:]) == texts[t][1]  # the loss covers exactly the short turn
        expected_prompt = chat_prompt(tok, "short", problem) + "".join(x + TURN_SEP for _, x in texts[:t])
        assert seq.input_ids[:-n] == tok(expected_prompt, add_special_tokens=False)["input_ids"]
    # the long turns (partner) are in the second sequence's context only
    assert tok.decode(seqs[1].input_ids[: -sum(seqs[1].loss_mask)]).endswith(texts[2][1] + TURN_SEP)

    with pytest.raises(RuntimeError, match="does not match"):
        turn_completions(episodes, "long", [[Completion("<think>other", 2, "stop", (1, 2))] * 3])


def test_sampler_logprobs_weight_each_token_by_the_truncated_ratio(tiny_model):
    """Turns sampled by vLLM: token t's term is weighted by min(π_θ(t)/π_vLLM(t), cap), detached."""
    cfg = RLConfig(temperature=0.7, kl_coef=0.0, learning_rate=1e-2, max_grad_norm=1e6, vllm_importance_sampling_cap=2.0)
    with torch.no_grad():
        lp = [torch.log_softmax(tiny_model(input_ids=torch.tensor([ids])).logits[0, :-1] / 0.7, -1)
              for ids in ([5, 6, 7, 8], [9, 10, 11])]  # fmt: skip
    own = [[float(lp[0][1, 7]), float(lp[0][2, 8])], [float(lp[1][0, 10]), float(lp[1][1, 11])]]
    # token 7: the engine gave it 1.5x less probability (ratio 1.5); token 8: 10x less (capped at 2);
    # token 10: 4x more (ratio 0.25); token 11: no log-prob from the engine (NaN: weight 1)
    sampler = [[own[0][0] - math.log(1.5), own[0][1] - math.log(10)], [own[1][0] + math.log(4), math.nan]]
    weights = [[1.5, 2.0], [0.25, 1.0]]

    def grads(seqs, c):
        model = copy.deepcopy(tiny_model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        stats = policy_update(model, None, opt, seqs, [1.0, -2.0], pad_id=0, cfg=c)
        return [p.grad.clone() for p in model.parameters()], stats

    seqs = [TurnSequence([5, 6, 7, 8], [0, 0, 1, 1], 0, sampler[0]), TurnSequence([9, 10, 11], [0, 1, 1], 1, sampler[1])]
    got, stats = grads(seqs, cfg)
    model = copy.deepcopy(tiny_model)
    lpg = [torch.log_softmax(model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1] / 0.7, -1) for s in seqs]
    objective = -(1.0 * (weights[0][0] * lpg[0][1, 7] + weights[0][1] * lpg[0][2, 8])
                  - 2.0 * (weights[1][0] * lpg[1][0, 10] + weights[1][1] * lpg[1][1, 11])) / 4  # fmt: skip
    expected = torch.autograd.grad(objective, list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    # the mean ratio before the cap and the share capped, over the 3 tokens with an engine log-prob
    assert stats["is_ratio"] == pytest.approx((1.5 + 10 + 0.25) / 3, rel=1e-4)
    assert stats["is_capped"] == pytest.approx(1 / 3)

    # the engine's own distribution (ratio 1 everywhere), or the correction off: plain GRPO
    plain, plain_stats = grads([TurnSequence(s.input_ids, s.loss_mask, s.episode) for s in seqs], cfg)
    same = [TurnSequence(s.input_ids, s.loss_mask, s.episode, o) for s, o in zip(seqs, own)]
    for g, p in zip(grads(same, cfg)[0], plain):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-6)  # a ratio of exactly 1, up to rounding
    off = cfg.model_copy(update={"vllm_importance_sampling_cap": None})
    for g, p in zip(grads(seqs, off)[0], plain):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    assert "is_ratio" not in plain_stats
    with pytest.raises(ValueError, match="1 sampler log-probs for 2 trained ids"):
        grads([TurnSequence([5, 6, 7, 8], [0, 0, 1, 1], 0, [-1.0])], cfg)


def test_policy_update_gradient_is_a_token_mean_over_trained_tokens(tiny_model):
    cfg = RLConfig(temperature=0.7, kl_coef=0.0, learning_rate=1e-2, max_grad_norm=1e6)
    seqs = [TurnSequence([5, 6, 7, 8], [0, 0, 1, 1], 0), TurnSequence([9, 10, 11], [0, 1, 1], 1)]
    # hand objective: −(A_0·(log p(7) + log p(8)) + A_1·(log p(10) + log p(11))) / 4 with A = (1, −2)
    lp = [torch.log_softmax(tiny_model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1] / 0.7, -1) for s in seqs]
    objective = -(1.0 * (lp[0][1, 7] + lp[0][2, 8]) - 2.0 * (lp[1][0, 10] + lp[1][1, 11])) / 4
    expected = torch.autograd.grad(objective, list(tiny_model.parameters()))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    stats = policy_update(tiny_model, None, opt, seqs, [1.0, -2.0], pad_id=0, cfg=cfg)
    for param, grad in zip(tiny_model.parameters(), expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-7)
    # the on-policy surrogate's value is −Σ A / N = −(2·1 + 2·(−2)) / 4
    assert stats["loss"] == pytest.approx(0.5) and stats["trained_tokens"] == 4
    assert not _same(tiny_model.state_dict(), before)
    # zero advantages and no KL: no gradient; a fresh AdamW (no momentum) with weight decay 0 moves nothing
    moved = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    fresh = torch.optim.AdamW(tiny_model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    policy_update(tiny_model, None, fresh, seqs, [0.0, 0.0], pad_id=0, cfg=cfg)
    assert _same(tiny_model.state_dict(), moved)


def test_a_group_of_equal_rewards_gets_exactly_zero_advantage():
    # 0.1 three times: the float mean is 0.1 + 2.8e-17 and (r − mean) / 1e-4 was −2.8e-13, not 0
    r = torch.tensor([0.1] * 3, dtype=torch.float64)
    assert float(r[0] - r.mean()) != 0.0
    got = group_advantages([0.1] * 3 + [1.0, 0.0, 0.0], group_size=3)
    assert got[:3] == [0.0, 0.0, 0.0]
    d = math.sqrt(1 / 3) + 1e-4  # mean 1/3, unbiased std sqrt(1/3)
    assert got[3:] == pytest.approx([(2 / 3) / d, -(1 / 3) / d, -(1 / 3) / d])


def test_turns_with_zero_advantage_are_skipped_without_changing_the_update(tiny_model):
    """β = 0: episodes of a group without signal (A = 0) go through no forward/backward; the gradient, the loss and
    the step are those of the full batch. With β > 0 their KL term counts, so nothing is skipped."""
    seqs = [TurnSequence([5, 6, 7, 8], [0, 0, 1, 1], 0), TurnSequence([9, 10, 11], [0, 1, 1], 1),
            TurnSequence([12, 13, 14, 15, 16], [0, 1, 1, 1, 1], 2), TurnSequence([17, 18, 19], [0, 0, 1], 3)]  # fmt: skip
    advantages = [1.0, -2.0, 0.0, 0.0]

    def update(cfg, adv, ref=None):
        model = copy.deepcopy(tiny_model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        stats = policy_update(model, ref, opt, seqs, adv, pad_id=0, cfg=cfg)
        return [p.grad.clone() for p in model.parameters()], stats, model, opt

    base = RLConfig(temperature=0.7, kl_coef=0.0, learning_rate=1e-2, max_grad_norm=1e6, micro_batch_size=2)
    kept, kept_stats, _, _ = update(base.model_copy(update={"skip_zero_advantage": False}), advantages)
    skipped, skipped_stats, _, _ = update(base, advantages)
    for g, k in zip(skipped, kept):
        torch.testing.assert_close(g, k, rtol=1e-5, atol=1e-8)
    assert skipped_stats["trained_tokens"] == kept_stats["trained_tokens"] == 9
    assert skipped_stats["updated_tokens"] == 4 and kept_stats["updated_tokens"] == 9
    assert skipped_stats["loss"] == pytest.approx(kept_stats["loss"]) == pytest.approx(-(2 * 1.0 + 2 * -2.0) / 9)
    assert skipped_stats["grad_norm"] == pytest.approx(kept_stats["grad_norm"], rel=1e-5)

    # every advantage 0: nothing goes through, and the optimizer still steps on a zero gradient (AdamW's momentum
    # from the step before moves the weights exactly as without skipping)
    runs = []
    for skip in (False, True):
        cfg = base.model_copy(update={"skip_zero_advantage": skip})
        _, _, model, opt = update(cfg, advantages)
        stats = policy_update(model, None, opt, seqs, [0.0] * 4, pad_id=0, cfg=cfg)
        runs.append((stats, {k: v.clone() for k, v in model.state_dict().items()}))
    assert runs[1][0]["updated_tokens"] == 0 and runs[0][0]["updated_tokens"] == 9
    assert "entropy" not in runs[1][0] and runs[0][0]["entropy"] > 0  # not measured, rather than a false 0
    assert runs[0][0]["grad_norm"] == runs[1][0]["grad_norm"] == 0.0
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=1e-5, atol=1e-7)

    # β > 0: the zero-advantage turns carry the KL term, so they are not skipped
    ref = copy.deepcopy(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    kl = base.model_copy(update={"kl_coef": 0.1})
    _, kl_stats, _, _ = update(kl, advantages, ref)
    assert kl_stats["updated_tokens"] == 9 and kl_stats["kl"] > 0


@pytest.fixture(scope="module")
def full_run(protocol_pair, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl-full")
    seen: list[dict] = []
    result = train_pair_rl(protocol_pair, protocol_pair, problems, CFG, out, on_step=seen.append, protocol=PROTOCOL)
    return result, seen, out


def test_one_round_trains_each_model_in_turn(protocol_pair, full_run):
    result, seen, out = full_run
    start = _weights(protocol_pair)
    after_long = out / "checkpoints" / "step-000001"
    assert [m["role"] for m in seen] == ["long", "short"] and result.steps == 2
    # step 1 trained long only; step 2 trained short only
    assert not _same(_weights(after_long / "long"), start)
    assert _same(_weights(after_long / "short"), start)
    assert _same(_weights(result.long_dir), _weights(after_long / "long"))
    assert not _same(_weights(result.short_dir), start)
    for m in seen:
        assert m["trained_tokens"] > 0 and m["turns"] > 1  # the short model played
        numbers = {k: v for k, v in m.items() if k != "role"}
        assert all(math.isfinite(v) for v in numbers.values()), numbers
        assert 0 <= m["accuracy"] <= 1 and m["tokens/total"] == pytest.approx(m["tokens/long"] + m["tokens/short"])
    assert (out / "long" / "tokenizer.json").exists() and (out / "short" / "model.safetensors").exists()


class Killed(Exception):
    pass


def die_after_first_step(metrics: dict) -> None:
    """An ``on_step`` that stands for a kill right after step 1's checkpoint."""
    raise Killed(metrics["step"])


def test_kill_and_resume_matches_an_uninterrupted_run(protocol_pair, problems, full_run, tmp_path):
    reference, _, _ = full_run

    with pytest.raises(Killed):
        train_pair_rl(
            protocol_pair, protocol_pair, problems, CFG, tmp_path, on_step=die_after_first_step, protocol=PROTOCOL
        )
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert not (tmp_path / "long").exists()

    seen: list[dict] = []
    resumed = train_pair_rl(
        protocol_pair, protocol_pair, problems, CFG, tmp_path, on_step=seen.append, protocol=PROTOCOL
    )
    assert resumed.resumed_from_step == 1 and [m["step"] for m in seen] == [2]
    assert [m["step"] for m in resumed.history] == [1, 2]
    assert resumed.history == reference.history
    for role in ("long", "short"):
        assert _same(_weights(tmp_path / role), _weights(Path(reference.long_dir).parent / role))


def test_easy_filter_keeps_problems_solved_more_than_half_the_time(solving_pair, demo_rows_small, tmp_path):
    train, _ = demo_rows_small
    solvable = [{"problem": r["problem"], "answer": r["answer"]} for r in train[:2]]  # what solving_pair was fitted on
    impossible = [{"problem": p["problem"], "answer": "-999"} for p in solvable]  # the same prompts, never right
    mixed = [solvable[0], impossible[0], solvable[1], impossible[1]]
    cfg = CFG.model_copy(update={"easy_filter": True, "temperature": 0.5})
    model, tok = load_model(ModelConfig(), path=solving_pair)
    backend = TransformersBackend(model, tok)
    rates = pass_rates(mixed, backend, backend, cfg, PROTOCOL)
    assert all(r * cfg.group_size == int(r * cfg.group_size) for r in rates)  # hits out of G episodes
    assert rates[0] > 0.5 and rates[2] > 0.5 and rates[1] == rates[3] == 0.0, rates
    # the filter keeps exactly the two solvable problems: an impossible one can never be kept
    result = train_pair_rl(solving_pair, solving_pair, mixed, cfg, tmp_path / "mixed", protocol=PROTOCOL)
    assert result.n_problems == 2 and result.steps == 2
    with pytest.raises(ConfigError, match="rl.easy_filter kept none of 2 problems"):
        train_pair_rl(solving_pair, solving_pair, impossible, cfg, tmp_path / "none", protocol=PROTOCOL)


def test_quarter_means_average_the_first_and_last_quarter_of_steps():
    history = [{"r": float(k), "t": 10.0 * k} for k in range(1, 9)]  # 8 steps: quarters are 2 steps
    assert quarter_means(history, {"reward": "r", "tokens": "t"}) == {
        "rl_reward_first_quarter": 1.5, "rl_reward_last_quarter": 7.5,
        "rl_tokens_first_quarter": 15.0, "rl_tokens_last_quarter": 75.0,
    }  # fmt: skip
    assert quarter_means(history[:3], {"reward": "r"}) == {"rl_reward_first_quarter": 1.0, "rl_reward_last_quarter": 3.0}


def test_probe_measures_a_fixed_batch_without_changing_training(protocol_pair, problems, full_run, tmp_path):
    reference, _, _ = full_run
    cfg = CFG.model_copy(update={"probe_every": 1})
    held_in = problems[:2]  # already {problem, answer} rows

    with pytest.raises(Killed):
        train_pair_rl(
            protocol_pair, protocol_pair, problems, cfg, tmp_path, on_step=die_after_first_step,
            protocol=PROTOCOL, probe_problems=held_in,
        )  # fmt: skip
    result = train_pair_rl(protocol_pair, protocol_pair, problems, cfg, tmp_path, protocol=PROTOCOL, probe_problems=held_in)
    # the probe samples with its own seed: the training steps are those of the run without probes
    assert result.resumed_from_step == 1 and result.history == reference.history
    # before the first step, after each step (probe_every 1), and the resumed run kept the first two
    assert [p["step"] for p in result.probes] == [0, 1, 2]
    start = probe(0, held_in, _load_pair(Path(protocol_pair), Path(protocol_pair), ModelConfig()), cfg, PROTOCOL)
    assert result.probes[0] == start  # the same problems and seed: step 0 is the starting pair, reproducibly
    for p in result.probes:
        assert 0 <= p["accuracy"] <= 1 and p["tokens"] > 0 and 1 <= p["turns"] <= PROTOCOL.max_turns
        # kimi's efficiency term is in [-0.5, 0.5]; correctness weight 1, format weight 0.5
        assert p["accuracy"] - 0.5 <= p["reward"] <= p["accuracy"] + 0.5 + 0.5
        # one mean reward per probe problem (G episodes each), in the problems' order: their mean is the reward
        assert len(p["problem_rewards"]) == len(held_in)
        assert sum(p["problem_rewards"]) / len(held_in) == pytest.approx(p["reward"])
    # step 1 trained the long model: with the same problems and seed, its episodes changed (each probe also
    # holds its step number, which differs whatever happened)
    measured = [{k: v for k, v in p.items() if k != "step"} for p in result.probes]
    assert measured[1] != measured[0]


def test_capped_rollouts_stop_generating_at_the_length_target(solving_pair, demo_rows_small):
    """L_R = L_T bounds what an episode generates, its turns together, not each turn: the pass-rate, training
    and probe rollouts all go through _episode_kwargs."""
    from longshort.config import ModelConfig
    from models.factory import load_model
    from models.generation import TransformersBackend
    from models.protocol import run_episodes
    from tasks.rl import _episode_kwargs, score_episodes

    model, tokenizer = load_model(ModelConfig(), path=solving_pair)
    backend = TransformersBackend(model, tokenizer, device="cpu")
    train, _ = demo_rows_small
    prompts = [r["problem"] for r in train[:2] for _ in range(8)]
    protocol = ProtocolConfig(max_turns=4, max_new_tokens_long=64, max_new_tokens_short=64)
    free_cfg = CFG.model_copy(update={"length_target": 12, "cap_rollout_at_length_target": False})
    free = run_episodes(prompts, backend, backend, **_episode_kwargs(free_cfg, protocol), seed=1)
    capped_cfg = free_cfg.model_copy(update={"cap_rollout_at_length_target": True})
    capped = run_episodes(prompts, backend, backend, **_episode_kwargs(capped_cfg, protocol), seed=1)
    assert all(e.stop_reason == "answer" for e in free) and min(e.tokens() for e in free) > 12
    assert max(e.tokens() for e in capped) == 12  # the long turn (9 tokens) fits, the short one is cut at 3
    for c, f in zip(capped, free, strict=True):
        assert c.stop_reason == "token_cap" and c.answer is None and c.error is None
        # same seeds: the budget only cuts what the episode would have written
        assert c.turns[0].text == f.turns[0].text and f.turns[1].text.startswith(c.turns[1].text)
    parts, _ = score_episodes(capped, [r["answer"] for r in train[:2] for _ in range(8)], capped_cfg, role=None)
    assert parts["correctness"] == [0.0] * 16 and parts["format"] == [0.0] * 16


def test_an_episode_over_the_rollout_cap_earns_neither_correctness_nor_format():
    """L_R = L_T: an episode longer than the cap is scored as if cut off there (wrong and not well formed)."""
    from longshort.config import RLConfig
    from tasks.rl import score_episodes

    def episode(n_short: int) -> Episode:
        turns = [Turn("long", format_long_turn("1+1=2"), 10), Turn("short", format_short_turn("\\boxed{2}", final=True), n_short)]
        return Episode("1+1?", turns, answer="2", stop_reason="answer")

    cfg = RLConfig(group_size=2, efficiency="laser", length_target=20, alpha=0.5, correctness_weight=1.0,
                   format_weight=0.1, efficiency_weight=1.0, cap_rollout_at_length_target=True)  # fmt: skip
    parts, total = score_episodes([episode(5), episode(30)], ["2", "2"], cfg, role=None)
    assert parts["correctness"] == [1.0, 0.0] and parts["format"] == [1.0, 0.0]
    assert total == pytest.approx([1.0 + 0.1 + 1.5, 0.0])
    uncapped = cfg.model_copy(update={"cap_rollout_at_length_target": False})
    assert score_episodes([episode(5), episode(30)], ["2", "2"], uncapped, role=None)[1] == pytest.approx([2.6, 2.1])


def test_probe_gain_pairs_the_probe_problems() -> None:
    """The last probe against the first, problem by problem: a uniform +0.25 is known exactly; a gain on one
    problem of 32 is not told from zero."""
    start = [0.0, 1.0, 2.0, 2.5] * 8
    gained = {"step": 8, "reward": 0.0, "problem_rewards": [r + 0.25 for r in start]}
    out = probe_gain([{"step": 0, "reward": 0.0, "problem_rewards": start}, gained], seed=0)
    assert out["rl_probe_reward_gain"] == pytest.approx(0.25)
    assert out["rl_probe_reward_gain_ci_low"] == pytest.approx(0.25) == out["rl_probe_reward_gain_ci_high"]
    one = [*start[:-1], start[-1] + 2.0]
    out = probe_gain([{"problem_rewards": start}, {"problem_rewards": one}], seed=0)
    assert out["rl_probe_reward_gain"] == pytest.approx(2.0 / 32)
    assert out["rl_probe_reward_gain_ci_low"] == 0.0 < out["rl_probe_reward_gain"] < out["rl_probe_reward_gain_ci_high"]
    assert probe_gain([{"problem_rewards": start}]) == {}  # one probe: nothing to compare
    assert probe_gain([{"reward": 1.0}, {"reward": 2.0}]) == {}  # probes from before per-problem rewards
