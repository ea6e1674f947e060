"""REINFORCE++: the per-token advantages and their normalisation over the whole batch against
hand-computed values, then what a short seeded run learns from the shared short SFT policy and
reward model (tests/conftest.py), checked exactly against the optimum."""
import math

import pytest
import torch

from conftest import assert_a_quick_run_lands_near_pi_star
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.advantages import group_normalised_advantages
from toy_rlhf.methods.reinforce_pp import ReinforcePPConfig, reinforce_pp_advantages


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- advantages -----------------------------------------------------------------------------------

def test_each_token_gets_the_score_minus_the_kl_still_to_come_then_the_batch_is_whitened():
    logp_old = rows([-1.0, -2.0, -0.5, -1.0], [-1.0, -1.0, -1.0, -1.0])
    logp_ref = rows([-1.5, -2.0, -1.0, -0.25], [-1.0, -1.0, -1.0, -1.0])
    # Response 1, beta = 0.5, score 2: k1 per token 0.5, 0, 0.5, -0.75; KL to go 0.25, -0.25, -0.25,
    # -0.75; A = 2 - 0.5 * that = 1.875, 2.125, 2.125, 2.375. Response 2: no KL, A = its score 2.125.
    # The 8 values: mean 2.125, deviations -0.25, 0, 0, 0.25, 0, 0, 0, 0; variance (Bessel)
    # 0.125 / 7, so the two deviations become -+0.25 / sqrt(0.125 / 7) = -+sqrt(3.5).
    advantages = reinforce_pp_advantages(rows(2.0, 2.125), logp_old, logp_ref, beta=0.5)
    root = math.sqrt(3.5)
    assert torch.allclose(advantages, rows([-root, 0.0, 0.0, root], [0.0, 0.0, 0.0, 0.0]), atol=1e-5)


def test_the_advantages_are_normalised_over_the_batch_not_per_prompt():
    # Prompts A (responses scoring 1 and 3) and B (5 and 7), beta = 0: every token's advantage is its
    # response's score, then whitened over all 16 tokens: mean 4, deviations -3, -1, 1, 3 four times
    # each, variance (Bessel) 4 * 20 / 15 = 16 / 3, std 4 / sqrt(3): A = deviation * sqrt(3) / 4.
    logp = torch.full((4, 4), -1.0)
    advantages = reinforce_pp_advantages(rows(1.0, 3.0, 5.0, 7.0), logp, logp.clone(), beta=0.0)
    expected = torch.tensor([-3.0, -1.0, 1.0, 3.0]) * math.sqrt(3) / 4  # -1.299, -0.433, 0.433, 1.299
    assert torch.allclose(advantages, expected.unsqueeze(1).expand(4, 4), atol=1e-5)
    # Per prompt (GRPO) both prompts' worse response would get -1 / sqrt(2) = -0.707; over the batch
    # B's worse response (score 5) is above the batch mean and is reinforced.
    per_prompt = group_normalised_advantages(rows(1.0, 3.0, 5.0, 7.0), 2, 'group')
    assert torch.allclose(per_prompt, rows(-1.0, 1.0, -1.0, 1.0) / math.sqrt(2), atol=1e-3)
    assert advantages[2, 0] > 0 > per_prompt[2]


# --- what training does ---------------------------------------------------------------------------

# About a quarter of the default schedule (~3 s on an idle core); conftest.py says what it reaches.
SHORT_REINFORCE_PP = ReinforcePPConfig(**dict(METHODS['reinforce_pp'].quick))  # the registry's quick schedule
TINY_REINFORCE_PP = dict(iters=2, prompts_per_iter=16)  # for the properties that need no learning


@pytest.fixture(scope='module')
def run(quick_runs):
    return quick_runs['reinforce_pp']


def test_a_short_run_lands_near_pi_star_and_logs_every_round(run, sft_policy, reward_model):
    assert_a_quick_run_lands_near_pi_star(run, sft_policy, reward_model, SHORT_REINFORCE_PP.beta, samples_per_round=384)
