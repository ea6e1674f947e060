"""The entropy bonus: the closed-form optimum of E[r] - beta KL + alpha H checked by enumeration, the
per-token entropy against hand-computed values, the registry's targets of PPO, RLOO and GRPO, and where
PPO's quick schedule with the bonus lands."""
import math

import pytest
import torch

from conftest import train_quickly
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.entropy import (EntropyBonus, entropy_regularised_objective, entropy_regularised_optimum,
                                      entropy_regularised_value, mean_token_entropy)
from toy_rlhf.methods.grpo import GRPOConfig, fixed_point
from toy_rlhf.methods.ppo import PPOConfig
from toy_rlhf.methods.rloo import RLOOConfig
from toy_rlhf.optimal import ExactTables, exact_tables, kl_split, optimal_log_probs, response_kl
from toy_rlhf.preferences import PREFERENCES


def random_problem(seed, P=3, N=60):
    generator = torch.Generator().manual_seed(seed)
    log_ref = torch.randn(P, N, dtype=torch.float64, generator=generator).log_softmax(dim=1)
    rewards = 2 * torch.rand(P, N, dtype=torch.float64, generator=generator)
    return log_ref, rewards


def test_the_mean_token_entropy_matches_a_hand_computation():
    # Token 1 uniform over 2 of 3 tokens: log 2. Token 2 one-hot: 0. Mean (log 2) / 2.
    probs = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    log_probs = probs.log().clamp_min(-1e4)  # log 0 as a large negative number, as a softmax never gives
    assert math.isclose(mean_token_entropy(log_probs).item(), math.log(2) / 2, rel_tol=1e-6)


@pytest.mark.parametrize('beta, alpha', [(1.0, 0.1), (1.0, 0.3), (0.25, 0.1), (0.5, 2.0)])
def test_the_closed_form_is_the_maximiser_of_the_entropy_regularised_objective(beta, alpha):
    log_ref, rewards = random_problem(seed=0)
    optimum = entropy_regularised_optimum(log_ref, rewards, beta, alpha)
    J_optimum = entropy_regularised_objective(optimum, log_ref, rewards, beta, alpha)
    # Its objective is the closed-form value (alpha + beta) log Z, to rounding.
    assert torch.allclose(J_optimum, entropy_regularised_value(log_ref, rewards, beta, alpha), rtol=0, atol=1e-12)
    # Stationary: the objective's gradient in free logits vanishes there (J is strictly concave in pi,
    # so a stationary point is the maximiser) ...
    logits = optimum.clone().requires_grad_(True)
    entropy_regularised_objective(logits.log_softmax(dim=1), log_ref, rewards, beta, alpha).sum().backward()
    assert logits.grad.abs().max() < 1e-12
    # ... where pi* (alpha > 0) is not.
    logits = optimal_log_probs(log_ref, rewards, beta).requires_grad_(True)
    entropy_regularised_objective(logits.log_softmax(dim=1), log_ref, rewards, beta, alpha).sum().backward()
    assert logits.grad.abs().max() > 1e-3
    # No perturbed distribution does better: every random perturbation scores lower.
    for seed in range(5):
        noise = torch.randn(log_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        perturbed = (optimum + 0.1 * noise).log_softmax(dim=1)
        assert (entropy_regularised_objective(perturbed, log_ref, rewards, beta, alpha) < J_optimum).all()


def test_the_optimum_tempers_the_reference_and_is_pi_star_without_the_bonus():
    log_ref, rewards = random_problem(seed=1)
    assert torch.equal(entropy_regularised_optimum(log_ref, rewards, 1.0, 0.0), optimal_log_probs(log_ref, rewards, 1.0))
    # With a constant reward it is pi_ref^(beta / (alpha + beta)), renormalised: flatter than pi_ref.
    flat = entropy_regularised_optimum(log_ref, torch.zeros_like(rewards), 1.0, 1.0)
    assert torch.allclose(flat, (log_ref / 2).log_softmax(dim=1), rtol=0, atol=1e-12)
    assert response_kl(flat, log_ref).min() > 0


@pytest.fixture(scope='module')
def tables():
    log_ref, rewards = random_problem(seed=2, P=2, N=10 ** 4)
    return ExactTables(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), log_ref, rewards)


@pytest.mark.parametrize('name, config', [('ppo', PPOConfig), ('rloo', RLOOConfig), ('grpo', GRPOConfig)])
def test_the_registry_target_is_the_closed_form_with_the_bonus_and_the_old_target_without(name, config, tables):
    target = METHODS[name].target
    with_bonus = target(tables, config(beta=0.5, entropy_coef=0.3))
    if name == 'grpo':
        assert with_bonus is None  # its std scaling moves its fixed point: no exact target known
    else:
        assert torch.equal(with_bonus, entropy_regularised_optimum(tables.log_ref, tables.rewards, 0.5, 0.3))
    # GRPO without group scaling: its fixed point in one backward pass (scaled, it iterates on sigma).
    settings = {'scale_rewards': 'none'} if name == 'grpo' else {}
    without = target(tables, config(beta=0.5, **settings))
    old = fixed_point(tables, GRPOConfig(beta=0.5, **settings)) if name == 'grpo' else \
        optimal_log_probs(tables.log_ref, tables.rewards, 0.5)
    assert torch.equal(without, old)
    # Under adaptive control alpha moves during the run: no fixed-alpha target is its destination.
    assert target(tables, config(beta=0.5, entropy_coef=0.3, entropy_target=0.2)) is None
    # and its name says which target the tables' KL is to (GRPO's is None, so its row says none known)
    assert METHODS[name].target_name(config(beta=0.5, entropy_coef=0.3)) == 'pi_alpha (entropy bonus alpha=0.3)'
    assert METHODS[name].target_name(config(beta=0.5)) == METHODS[name].target_label


def uniform_log_probs(tokens):
    """Next-token log-probs (1, 4, 11) uniform over `tokens` of the 11: mean token entropy log(tokens)."""
    return torch.full((1, 4, 11), -math.log(tokens)).masked_fill(torch.arange(11) >= tokens, -1e4)


def test_adaptive_control_raises_alpha_while_the_entropy_is_at_or_below_the_target_and_lowers_it_above():
    bonus = EntropyBonus(PPOConfig(entropy_coef=0.01, entropy_target=math.log(3), entropy_coef_delta=0.004,
                                   entropy_coef_max=0.015))
    low, high = uniform_log_probs(2), uniform_log_probs(8)  # entropies log 2 < log 3 < log 8
    # Each step's loss uses the alpha it started with; the next alpha comes from its entropy.
    assert bonus.loss(low).item() == pytest.approx(-0.01 * math.log(2))
    assert bonus.alpha == pytest.approx(0.014) and bonus.logged() == {'policy/entropy_coef': bonus.alpha}
    assert bonus.loss(low).item() == pytest.approx(-0.014 * math.log(2))
    assert bonus.alpha == 0.015  # its ceiling
    for _ in range(5):
        bonus.loss(high)
    assert bonus.alpha == 0.0  # its floor
    # At alpha 0 the controller still measures (TRL before its fix did not): a collapse raises it again.
    assert bonus.loss(low).item() == 0.0 and bonus.alpha == pytest.approx(0.004)


def test_without_a_target_alpha_stays_and_nothing_more_is_logged():
    bonus = EntropyBonus(PPOConfig(entropy_coef=0.1))
    bonus.loss(uniform_log_probs(2))
    assert bonus.alpha == 0.1 and bonus.logged() == {}
    assert EntropyBonus(PPOConfig()).loss(uniform_log_probs(2)) == 0.0  # off: not even measured


def test_ppo_with_the_bonus_lands_nearer_its_target_than_pi_star_and_pays_an_entropy_tax(sft_policy, reward_model):
    tables = exact_tables(sft_policy, reward_model, sample_prompts(20, torch.Generator().manual_seed(3)),
                          PREFERENCES['first-digit'])
    config = PPOConfig(**dict(METHODS['ppo'].quick), entropy_coef=0.3)
    policy, _ = train_quickly('ppo', sft_policy, reward_model, entropy_coef=0.3)
    log_pi = all_response_log_probs(policy, tables.prompts)
    target, pi_star = METHODS['ppo'].target(tables, config), optimal_log_probs(tables.log_ref, tables.rewards, 1.0)
    # Measured (seed 0): 0.51 nats from its target, 0.93 from pi*, which is 0.10 from the target.
    assert response_kl(log_pi, target).mean() < 0.75 * response_kl(log_pi, pi_star).mean()
    # The tax: KL on digits 2-4, which pi* hardly spends (measured 0.54; pi* 0.025, PPO without the
    # bonus 0.14, the target 0.13).
    assert kl_split(log_pi, tables.log_ref)['kl_later'].mean() > kl_split(pi_star, tables.log_ref)['kl_later'].mean() + 0.25
