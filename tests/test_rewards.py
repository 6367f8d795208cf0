"""Rewards on hand-made groups; expected values are worked out by hand from the formulas."""

from __future__ import annotations

import pytest

from tasks.rewards import (
    EFFICIENCY_REWARDS,
    combined_reward,
    correctness_reward,
    efficiency_reward,
    format_reward,
    kimi_length_reward,
    laser_d_reward,
    laser_reward,
    reward_components,
    truncation_reward,
)

GOOD = "<think>\nadd\n</think>\n<answer>\\boxed{5}</answer>"
TWO_ROUNDS = "<think>\na\n</think>\n<answer>so far 3</rethink>\n<think>\nb\n</think>\n<answer>\\boxed{4}</answer>"


def test_correctness_reward_uses_math_verify():
    assert correctness_reward(["5", " 5 ", "1/2", "6", None, ""], ["5", "5", "0.5", "5", "5", "5"]) == [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
    ]  # fmt: skip


def test_format_reward_checks_the_whole_transcript():
    cut = "<think>\nadd\n</think>\n<answer>so far 3</rethink>"  # handed back, never answered
    no_close = "<think>\nadd and then"
    nested = "<think>\na <answer> b\n</think>\n<answer>\\boxed{5}</answer>"
    assert format_reward([GOOD, TWO_ROUNDS, cut, no_close, nested]) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_kimi_length_reward_by_hand():
    # L_min = 10, L_max = 30: λ = 0.5 − (L − 10)/20 = [0.5, 0.0, −0.5, 0.5, 0.25]
    correct = [True, False, True, False, False]
    lengths = [10, 20, 30, 10, 15]
    assert kimi_length_reward(correct, lengths) == [0.5, 0.0, -0.5, 0.0, 0.0]
    # a wrong episode keeps a negative λ: L = 30 → λ = −0.5
    assert kimi_length_reward([False, True], [30, 10]) == [-0.5, 0.5]


def test_kimi_equal_lengths_give_zero():
    assert kimi_length_reward([True, False, True], [7, 7, 7]) == [0.0, 0.0, 0.0]


def test_truncation_reward_by_hand():
    # L_T = 20: correct and L ≤ 20
    assert truncation_reward([True, True, False, True], [20, 21, 5, 3], 20) == [1.0, 0.0, 0.0, 1.0]


def test_laser_reward_by_hand():
    # α = 0.5, L_T = 20: correct·(1 + 0.5·[L < 20])
    assert laser_reward([True, True, False, False], [19, 20, 5, 25], 20, 0.5) == [1.5, 1.0, 0.0, 0.0]


def test_laser_d_reward_adds_bonus_for_wrong_long_episodes():
    # laser + 0.5·[wrong and L ≥ 20]: the wrong L=20 and L=25 episodes get +0.5, the wrong L=5 one nothing
    got = laser_d_reward([True, True, False, False, False], [19, 20, 5, 20, 25], 20, 0.5)
    assert got == [1.5, 1.0, 0.0, 0.5, 0.5]


def test_registry_and_group_split():
    assert set(EFFICIENCY_REWARDS) == {"kimi", "truncation", "laser", "laser-d"}
    correct = [True, False, True, True]
    lengths = [10, 30, 40, 40]
    # kimi per group of 2: group 1 (10, 30) → [0.5, min(0, −0.5)]; group 2 equal lengths → [0, 0]
    assert efficiency_reward("kimi", correct, lengths, group_size=2, length_target=20, alpha=0.5) == [
        0.5, -0.5, 0.0, 0.0,
    ]  # fmt: skip
    # one group of 4: λ = 0.5 − (L − 10)/30 = [0.5, −1/6, −0.5, −0.5]
    got = efficiency_reward("kimi", correct, lengths, group_size=4, length_target=20, alpha=0.5)
    assert got == pytest.approx([0.5, -1 / 6, -0.5, -0.5])
    assert efficiency_reward("none", correct, lengths, group_size=2, length_target=20, alpha=0.5) == [0.0] * 4
    assert efficiency_reward("truncation", correct, lengths, group_size=2, length_target=20, alpha=0.5) == [
        1.0, 0.0, 0.0, 0.0,
    ]  # fmt: skip
    # the names the config uses reach their formulas: laser = c·(1 + α[L < L_T]); laser-d adds α[wrong, L ≥ L_T]
    three = ([True, False, False], [10, 30, 5])
    assert efficiency_reward("laser", *three, group_size=1, length_target=20, alpha=0.5) == [1.5, 0.0, 0.0]
    assert efficiency_reward("laser-d", *three, group_size=1, length_target=20, alpha=0.5) == [1.5, 0.5, 0.0]


def test_combined_reward_weights_by_hand():
    answers = ["5", None, "4", "7"]
    refs = ["5", "5", "4", "4"]
    transcripts = [GOOD, "<think>\nx", TWO_ROUNDS, GOOD]
    lengths = [10, 50, 30, 10]
    # correctness [1, 0, 1, 0]; format [1, 0, 1, 1]; laser (α=1, L_T=20) [2, 0, 1, 0]
    parts = reward_components(
        answers, refs, transcripts, lengths, group_size=2, efficiency="laser", length_target=20, alpha=1.0
    )
    assert parts == {
        "correctness": [1.0, 0.0, 1.0, 0.0],
        "format": [1.0, 0.0, 1.0, 1.0],
        "efficiency": [2.0, 0.0, 1.0, 0.0],
    }
    got = combined_reward(
        answers, refs, transcripts, lengths, group_size=2, efficiency="laser", length_target=20, alpha=1.0,
        correctness_weight=0.5, format_weight=0.25, efficiency_weight=2.0,
    )  # fmt: skip
    # 0.5·c + 0.25·f + 2·e
    assert got == [0.5 + 0.25 + 4.0, 0.0, 0.5 + 0.25 + 2.0, 0.25]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="one entry per episode"):
        kimi_length_reward([True], [1, 2])
    with pytest.raises(ValueError, match="unknown efficiency reward 'short'"):
        efficiency_reward("short", [True], [1], group_size=1, length_target=5, alpha=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups of 2"):
        efficiency_reward("laser", [True] * 3, [1] * 3, group_size=2, length_target=5, alpha=0.1)
