"""GRPO's pieces against values worked out by hand: the clipped surrogate, the KL estimate, group advantages,
each loss_type's normalisation (token- vs sequence-level), completion masks and the built-in rewards."""

import math

import pytest
import torch

from tuneforge.train.losses import (clipped_policy_loss, group_advantages, kl_to_reference, loss_units,
                                    token_weights)

# float32 arithmetic on a handful of numbers: only rounding of the last bits differs between CPUs
TOL = 1e-6


def _step_loss(loss_type, micro_batches, max_len=4):
    """The loop's step loss: sum over micro-batches of (weights x token losses) / sum of their units."""
    total = sum((token_weights(loss_type, mask, max_len) * losses).sum() for losses, mask in micro_batches)
    return (total / sum(loss_units(loss_type, mask) for _, mask in micro_batches)).item()


def test_each_loss_type_normalises_as_worked_out_by_hand():
    masked = 99.0  # a padding position's loss must never count
    first = (torch.tensor([[1.0, 2.0, 3.0], [4.0, masked, masked]]), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    second = (torch.tensor([[8.0, masked, masked]]), torch.tensor([[1, 0, 0]]))
    batches = [first, second]
    # grpo: each completion's token mean (2, 4, 8), then the mean over the 3 completions
    assert _step_loss("grpo", batches) == pytest.approx(14 / 3, abs=TOL)
    # dr_grpo: every completion's token sum / max_completion_length (6/4, 4/4, 8/4), mean over completions
    assert _step_loss("dr_grpo", batches) == pytest.approx((1.5 + 1 + 2) / 3, abs=TOL)
    # dapo: all token losses of the step / all its completion tokens (5)
    assert _step_loss("dapo", batches) == pytest.approx(18 / 5, abs=TOL)
    # bnpo: each micro-batch's token mean (10/4, 8/1), then the mean over micro-batches
    assert _step_loss("bnpo", batches) == pytest.approx((2.5 + 8) / 2, abs=TOL)


def test_clipped_surrogate():
    ratio = torch.tensor([1.5, 1.5, 0.5, 1.0])
    advantages = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, clipped = clipped_policy_loss(ratio.log(), torch.zeros(4), advantages, epsilon=0.2)
    # A > 0 and r above 1.2: the clipped 1.2 A; A < 0 and r above: the unclipped r A; A < 0, r below 0.8: 0.8 A
    assert loss.tolist() == pytest.approx([-1.2, 1.5, 0.8, -2.0], abs=TOL)
    assert clipped.tolist() == [True, False, True, False]
    loss, clipped = clipped_policy_loss(ratio.log(), torch.zeros(4), advantages, epsilon=0.2, epsilon_high=0.6)
    assert loss[0].item() == pytest.approx(-1.5, abs=TOL) and not clipped[0]  # clip-higher: 1.5 < 1.6


def test_kl_estimate():
    kl = kl_to_reference(torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)]))
    # exp(d) - d - 1 with d = log(0.25 / 0.5): 0.5 + log 2 - 1; zero where the two agree
    assert kl.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=TOL)


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group means 2 and 2; unbiased group stds 1 and sqrt(12)
    assert group_advantages(rewards, 3, "none").tolist() == pytest.approx([-1, 0, 1, -2, -2, 4], abs=TOL)
    assert group_advantages(rewards, 3, "group").tolist() == pytest.approx(
        [-1 / 1.0001, 0, 1 / 1.0001] + [v / (math.sqrt(12) + 1e-4) for v in (-2, -2, 4)], abs=TOL)
    batch_std = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]).std().item()
    assert group_advantages(rewards, 3, "batch").tolist() == pytest.approx(
        [v / (batch_std + 1e-4) for v in (-1, 0, 1, -2, -2, 4)], abs=TOL)


def test_completion_mask_stops_after_the_first_stop_token():
    from tuneforge.data.collate import left_pad
    from tuneforge.train.rollout import completion_mask

    mask, truncated = completion_mask(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 9, 9, 3]]), stop_ids=[2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True, False]
    ids, attention, positions = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and attention.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]  # counted from each row's first real token


def test_built_in_rewards_and_a_function_from_a_file(tmp_path):
    from tuneforge.train.rewards import Reward, accuracy, format_reward, score
    from tuneforge.user_code import load_user_function

    completions = ["so the answer is 12", "12? no, it is 7", "twelve", "anything"]
    assert accuracy([""] * 4, completions, answer=["12", "12", "Twelve", None]) == [1.0, 0.0, 1.0, None]
    assert format_reward(r"<answer>\d+</answer>")([], ["<answer>3</answer> ", "3"]) == [1.0, 0.0]
    (tmp_path / "r.py").write_text("def shout(prompts, completions, topic, **_):\n"
                                   "    return [None if t == 'skip' else float(c.count('!')) for c, t in "
                                   "zip(completions, topic)]\n")
    shout = load_user_function(f"{tmp_path / 'r.py'}:shout", "reward_funcs")
    total, means = score([Reward("r.py:shout", shout, 2.0), Reward("accuracy", accuracy, 1.0)], ["p"] * 3,
                         ["12!!", "!", "12"], [{"topic": "a", "answer": "12"}, {"topic": "skip", "answer": "3"},
                                               {"topic": "b", "answer": "12"}])
    # 2 x shouts (None: nothing) + accuracy
    assert total.tolist() == [2 * 2 + 1, 0 + 0, 0 + 1]
    assert means == {"rewards/shout": pytest.approx(1.0), "rewards/accuracy": pytest.approx(2 / 3)}
