"""Preference losses against values computed by hand from known log-probabilities (in float64, so pytest.approx's
default relative 1e-6 is ample)."""

import math

import pytest
import torch

from tuneforge.train.losses import bco_loss, dpo_family_loss, kto_loss, pairwise_reward_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


# policy and reference log-probabilities of two pairs
PC, PR, RC, RR = t(-10.0, -7.0), t(-12.0, -6.0), t(-11.0, -7.5), t(-11.5, -6.5)
MARGINS = [(-10 + 11) - (-12 + 11.5), (-7 + 7.5) - (-6 + 6.5)]  # 1.5 and 0.0


def test_sigmoid_with_and_without_label_smoothing():
    loss, chosen_reward, rejected_reward = dpo_family_loss("sigmoid", PC, PR, RC, RR, beta=0.1)
    assert loss.tolist() == pytest.approx([-logsig(0.15), -logsig(0.0)])
    assert chosen_reward.tolist() == pytest.approx([0.1, 0.05]) and rejected_reward.tolist() == pytest.approx([-0.05, 0.05])
    smoothed, _, _ = dpo_family_loss("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    assert smoothed[0].item() == pytest.approx(-0.8 * logsig(0.15) - 0.2 * logsig(-0.15))


def test_bco_classifies_rewards_against_the_running_baseline():
    """BCO: rewards 0.1 (chosen) and -0.05 (rejected) for the first pair, 0.05 and 0.05 for the second; their
    batch mean 0.0375 is the baseline's first value, and the mean of the batch means after that."""
    from tuneforge.train.dpo import RewardBaseline

    baseline = RewardBaseline()
    delta = baseline.update(t(0.1, 0.05, -0.05, 0.05).mean()).item()
    assert delta == pytest.approx(0.0375)
    loss = bco_loss(0.1 * (PC - RC), 0.1 * (PR - RR), torch.tensor(delta, dtype=torch.float64))
    assert loss.tolist() == pytest.approx([-logsig(0.1 - delta) - logsig(-(-0.05 - delta)),
                                           -logsig(0.05 - delta) - logsig(-(0.05 - delta))])
    assert baseline.update(t(0.5).sum()).item() == pytest.approx((0.0375 + 0.5) / 2)
    assert baseline.update(t(-1.0).sum()).item() == pytest.approx((0.0375 + 0.5 - 1.0) / 3)


def test_hinge_and_ipo():
    hinge, _, _ = dpo_family_loss("hinge", PC, PR, RC, RR, beta=0.5)
    assert hinge.tolist() == pytest.approx([max(0, 1 - 0.5 * m) for m in MARGINS])
    ipo, _, _ = dpo_family_loss("ipo", PC, PR, RC, RR, beta=0.5)
    assert ipo.tolist() == pytest.approx([(m - 1 / (2 * 0.5)) ** 2 for m in MARGINS])  # (1.5-1)^2, (0-1)^2


def test_orpo_odds_ratio():
    chosen, rejected = t(-0.5), t(-1.5)  # average per-token log-probs
    loss, chosen_reward, _ = dpo_family_loss("orpo", chosen, rejected, None, None, beta=0.1)
    pc, pr = math.exp(-0.5), math.exp(-1.5)
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    assert loss.item() == pytest.approx(0.5 - 0.1 * logsig(log_odds))
    assert chosen_reward.item() == pytest.approx(-0.05)


def test_simpo_length_normalised_margin():
    # summed log-probs -12 over 6 tokens and -9 over 3 tokens: averages -2 and -3
    chosen, rejected = t(-12.0 / 6), t(-9.0 / 3)
    loss, _, _ = dpo_family_loss("simpo", chosen, rejected, None, None, beta=2.0, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(-logsig(2.0 * (-2 + 3) - 0.5))


def test_kto_with_kl_reference_point():
    chosen, ref_chosen = t(-5.0), t(-6.0)  # log ratio +1
    rejected, ref_rejected = t(-8.0, -4.0), t(-7.0, -4.0)  # log ratios -1, 0
    policy_kl, ref_kl = t(-9.0, -10.0, -11.0), t(-9.5, -10.5, -10.0)  # differences 0.5, 0.5, -1 -> mean 0
    losses, _, _ = kto_loss(chosen, rejected, ref_chosen, ref_rejected, policy_kl, ref_kl, beta=0.5,
                            chosen_weight=2.0, rejected_weight=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert losses.tolist() == pytest.approx([2 * (1 - sig(0.5 * 1)), 1 - sig(0.5 * 1), 1 - sig(0)])
    # a positive KL estimate moves the reference point
    shifted, _, _ = kto_loss(chosen, rejected, ref_chosen, ref_rejected, t(1.0), t(0.0), beta=0.5)
    assert shifted[0].item() == pytest.approx(1 - sig(0.5 * (1 - 1)))


def test_pairwise_reward_loss():
    assert pairwise_reward_loss(t(2.0, 0.0), t(1.0, 3.0)).tolist() == pytest.approx([-logsig(1.0), -logsig(-3.0)])
