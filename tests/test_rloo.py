"""RLOO: the sequence reward, the leave-one-out baseline and the sequence-level clip against
hand-computed values, then what a short seeded run learns from the shared short SFT policy and
reward model (tests/conftest.py), checked exactly against the optimum."""
import math

import pytest
import torch

from conftest import assert_a_quick_run_lands_near_pi_star
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.advantages import leave_one_out_advantages
from toy_rlhf.methods.ratios import sampler_weights
from toy_rlhf.methods.rloo import RLOOConfig, sequence_rewards, sequence_surrogate_loss


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- rewards and advantages -----------------------------------------------------------------------

def test_the_sequence_reward_and_the_leave_one_out_advantages_match_a_hand_computation():
    # Two prompts, K = 3 responses each, beta = 0.5.
    score = rows(1.0, 2.0, 1.5, 0.0, 0.0, 3.0)
    logp_old = rows([-1.0, -0.5, -0.5, -1.0], [-2.0, -1.0, -1.0, -1.0], [-0.5, -0.5, -0.5, -0.5],
                    [-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0], [-0.5, -1.0, -1.5, -2.0])
    logp_ref = rows([-1.5, -1.0, -0.5, -1.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0],
                    [-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0], [-0.5, -1.0, -1.5, -2.0])
    # Prompt A, k1 of each sequence: -3 - (-4) = 1, -5 - (-4) = -1 (more likely under the reference:
    # the estimate is negative and adds to the reward), -2 - (-4) = 2.
    # R = 1 - 0.5 * 1 = 0.5, 2 + 0.5 * 1 = 2.5, 1.5 - 0.5 * 2 = 0.5.
    # Prompt B: the actor agrees with the reference, R = the score: 0, 0, 3.
    rewards = sequence_rewards(score, logp_old, logp_ref, beta=0.5)
    assert torch.allclose(rewards, rows(0.5, 2.5, 0.5, 0.0, 0.0, 3.0))
    # A: 0.5 - (2.5 + 0.5) / 2 = -1, 2.5 - (0.5 + 0.5) / 2 = 2, 0.5 - (0.5 + 2.5) / 2 = -1.
    # B: 0 - (0 + 3) / 2 = -1.5 twice, 3 - 0 = 3. One number per response: the whole response is one action.
    assert torch.allclose(leave_one_out_advantages(rewards, 3), rows(-1.0, 2.0, -1.0, -1.5, -1.5, 3.0))


# --- the sequence-level clip ----------------------------------------------------------------------

def sequence_surrogate(clip_epsilon):
    """Two responses of two tokens: token ratios (1.1, 1.1) with A = 2 and (1.25, 0.8) with A = -1."""
    logp_new = torch.log(rows([1.1, 1.1], [1.25, 0.8])).requires_grad_(True)
    loss, clip_fraction, approx_kl = sequence_surrogate_loss(logp_new, torch.zeros(2, 2), rows(2.0, -1.0),
                                                             clip_epsilon)
    loss.backward()
    return loss.item(), clip_fraction.item(), approx_kl.item(), logp_new.grad


def test_the_samplers_weight_multiplies_each_responses_term_and_is_one_on_policy():
    logp_new = torch.log(rows([1.1, 1.1], [1.25, 0.8])).requires_grad_(True)
    loss, _, _ = sequence_surrogate_loss(logp_new, torch.zeros(2, 2), rows(2.0, -1.0), 0.2, weights=rows(0.5, 2.0))
    loss.backward()
    # The clipped terms of test_the_clip_is_on_the_ratio_of_the_whole_response, 2.4 and -1, weighed 0.5 and 2.
    assert math.isclose(loss.item(), -(0.5 * 2.4 - 2.0 * 1.0) / 2, rel_tol=1e-5)
    assert torch.allclose(logp_new.grad, rows([0.0, 0.0], [1.0, 1.0]))
    # On-policy (mu = pi_old) every correction's sequence weight is exactly 1: the unweighted loss.
    logp_old = torch.log(rows([0.3, 0.6], [0.2, 0.9]))
    for correction in ('tis', 'mis', 'icepop'):
        weights = sampler_weights(logp_old, logp_old.clone(), correction, 'sequence', 'openrlhf')[:, 0]
        assert torch.equal(weights, torch.ones(2))


def test_the_clip_is_on_the_ratio_of_the_whole_response():
    loss, clip_fraction, approx_kl, gradient = sequence_surrogate(0.2)
    # Response 1: no token ratio leaves [0.8, 1.2], but the sequence's 1.1 * 1.1 = 1.21 does, with a
    # positive advantage: its term is clipped to 1.2 * 2 = 2.4 and gets no gradient (a per-token
    # clip would not have bound). Response 2: 1.25 * 0.8 = 1, term 1 * -1 = -1, unclipped although
    # both its tokens are outside the range.
    assert math.isclose(loss, -(2.4 - 1.0) / 2, rel_tol=1e-5)
    assert clip_fraction == 0.5
    # d/dlogp_t of -(1/2) * rho * A is -(1/2) * rho * A for every token of the response: -(1/2) * 1 * -1.
    assert torch.allclose(gradient, rows([0.0, 0.0], [0.5, 0.5]))
    # k3 of the sequences' ratios: (1.21 - 1) - log 1.21 = 0.019380 and 0, averaged.
    assert math.isclose(approx_kl, (0.21 - math.log(1.21)) / 2, rel_tol=1e-3)


def test_without_the_clip_the_loss_is_the_importance_weighted_policy_gradient():
    loss, clip_fraction, _, gradient = sequence_surrogate(math.inf)
    # -(1.21 * 2 + 1 * -1) / 2 = -0.71; response 1's tokens get -(1/2) * 1.21 * 2 = -1.21 each.
    assert math.isclose(loss, -0.71, rel_tol=1e-5)
    assert clip_fraction == 0.0
    assert torch.allclose(gradient, rows([-1.21, -1.21], [0.5, 0.5]))


# --- what training does ---------------------------------------------------------------------------

# About a quarter of the default schedule (~3 s on an idle core); conftest.py says what it reaches.
SHORT_RLOO = RLOOConfig(**dict(METHODS['rloo'].quick))  # the registry's quick schedule
TINY_RLOO = dict(iters=2, prompts_per_iter=8)  # for the properties that need no learning


@pytest.fixture(scope='module')
def run(quick_runs):
    return quick_runs['rloo']


def test_a_short_run_lands_near_pi_star_and_logs_every_round(run, sft_policy, reward_model):
    assert_a_quick_run_lands_near_pi_star(run, sft_policy, reward_model, SHORT_RLOO.beta, samples_per_round=96 * 4)
