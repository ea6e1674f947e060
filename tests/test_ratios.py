"""The ratio variants and sampler corrections (toy_rlhf/methods/ratios.py) and the off-policy sampler
(rollout.Sampler): on-policy each variant's gradient is its base estimator's, to rounding; off-policy
each one clips or weights as its library does (hand-computed values)."""
import math
from dataclasses import replace

import pytest
import torch

from mingpt.model import GPT
from toy_rlhf.language import join
from toy_rlhf.methods.grpo import GRPOConfig, train_grpo
from toy_rlhf.methods.ppo import PPOConfig, train_ppo
from toy_rlhf.methods.rloo import RLOOConfig, train_rloo
from toy_rlhf.methods.ratios import (CISPO_BOUNDS, RATIOS, SAMPLER_BANDS, cispo_objective, gmpo_objective,
                                     gspo_objective, policy_loss, ppo_objective, sapo_objective, sampler_weights)
from toy_rlhf.methods.rollout import Sampler, sampler_log_probs
from toy_rlhf.policy import policy_config, token_log_probs
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import initial_reward_model


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return GPT(policy_config()).double()


@pytest.fixture(scope='module')
def sentences():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 10, (6, 9), generator=generator).index_fill_(1, torch.tensor([4]), 10)


def on_policy_cases():
    """(config, scale): every variant and correction, on-policy, and what it scales the base gradient by."""
    for ratio in RATIOS:
        for bounds in (CISPO_BOUNDS if ratio == 'cispo' else ('trl-5',)):
            scale = min(1.0, CISPO_BOUNDS[bounds][1]) if ratio == 'cispo' else 1.0  # TRL's 0.2 caps the weight 1
            yield replace(PPOConfig(), ratio=ratio, cispo_bounds=bounds), scale
    for correction in ('tis', 'mis', 'icepop'):
        for level in ('token', 'sequence'):
            for band in SAMPLER_BANDS:
                yield replace(PPOConfig(), sampler_correction=correction, correction_level=level,
                              correction_band=band), 1.0


@pytest.mark.parametrize('advantages_per', ['token', 'sequence'])
def test_on_policy_every_variant_and_correction_has_its_base_estimators_gradient(model, sentences, advantages_per):
    # One epoch, no staleness, sampler = policy: logp_old = logp_sampler = logp_new in value. The base
    # estimator's gradient is REINFORCE's, -mean_t A_t grad log pi(y_t); with a sequence's advantage on
    # every token (GRPO) GSPO and GMPO are the paper's sequence-level forms, with per-token ones (PPO)
    # their token-gradient forms. Compared on the token log-probs (B, T) for every case, and on every
    # weight of the model for each ratio variant (the corrections' weights do not touch the chain).
    generator = torch.Generator().manual_seed(2)
    advantages = torch.randn(6, 4 if advantages_per == 'token' else 1, generator=generator, dtype=torch.double)
    advantages = advantages.expand(6, 4)
    logp_new = token_log_probs(model, sentences)  # (6, 4), in the model's graph
    weights = list(model.parameters())

    def gradients(loss, of):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, of, retain_graph=True)])

    base_loss = -(advantages * logp_new).mean()
    base = {'tokens': gradients(base_loss, [logp_new]), 'weights': gradients(base_loss, weights)}
    for config, scale in on_policy_cases():
        logp_old = logp_new.detach()
        loss = policy_loss(logp_new, logp_old, logp_old.clone(), advantages, config)[0]
        for name in (('tokens', 'weights') if config.sampler_correction == 'none' else ('tokens',)):
            of = [logp_new] if name == 'tokens' else weights
            assert torch.allclose(gradients(loss, of), scale * base[name], rtol=1e-10, atol=1e-15), (name, config)


def test_the_ppo_variant_without_correction_is_the_clipped_surrogate_number_for_number():
    from toy_rlhf.methods.advantages import clipped_surrogate_loss
    generator = torch.Generator().manual_seed(3)
    logp_old, noise, advantages = torch.randn(3, 8, 4, generator=generator)
    logp_new = (logp_old + 0.3 * noise).requires_grad_()
    ours = policy_loss(logp_new, logp_old, logp_old, advantages, PPOConfig())
    theirs = clipped_surrogate_loss(logp_new, logp_old, advantages, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(ours[:3], theirs)) and ours[3] is None


def objective_at(function, log_ratios, advantage, **settings):
    logp_old = torch.zeros(1, len(log_ratios))
    return function(torch.tensor([log_ratios]), logp_old, torch.full((1, len(log_ratios)), advantage), **settings)


def test_ppo_clips_the_token_ratio_only_where_that_lowers_the_objective():
    objective, clipped = objective_at(ppo_objective, [math.log(1.5)], 1.0, clip_low=0.2, clip_high=0.2)
    assert objective.item() == pytest.approx(1.2) and clipped.item()
    objective, _ = objective_at(ppo_objective, [math.log(1.5)], -1.0, clip_low=0.2, clip_high=0.2)
    assert objective.item() == pytest.approx(-1.5)


def test_gspo_clips_the_length_normalised_sequence_ratio_to_its_tiny_range():
    # s = (2 * 1)^(1/2) = 1.414 on both tokens: clipped to 1 + 4e-4 for A > 0, unclipped (pessimistic) for A < 0
    objective, clipped = objective_at(gspo_objective, [math.log(2), 0.0], 1.0)
    assert objective.tolist()[0] == pytest.approx([1.0004, 1.0004]) and clipped.all()
    objective, _ = objective_at(gspo_objective, [math.log(2), 0.0], -1.0)
    assert objective.tolist()[0] == pytest.approx([-math.sqrt(2)] * 2)


def test_gmpo_clips_each_token_in_log_space_before_the_geometric_mean():
    # A > 0: 0.6 -> 0.4, -0.2 kept: G = exp(0.1). A < 0: 0.6 kept (the pessimistic side), G = exp(0.2).
    objective, clipped = objective_at(gmpo_objective, [0.6, -0.2], 1.0)
    assert objective.tolist()[0] == pytest.approx([math.exp(0.1)] * 2) and clipped.tolist() == [[True, False]]
    objective, _ = objective_at(gmpo_objective, [0.6, -0.2], -1.0)
    assert objective.tolist()[0] == pytest.approx([-math.exp(0.2)] * 2)


@pytest.mark.parametrize('bounds, weight', [('trl', 0.2), ('trl-5', 3.0), ('verl', 1.2), ('open-instruct', 1.272)])
def test_cispo_weighs_the_log_prob_by_the_detached_ratio_clipped_as_each_library_reads_its_bounds(bounds, weight):
    logp_new = torch.tensor([[math.log(3)]], requires_grad=True)  # rho = 3 against logp_old = 0
    objective, _ = cispo_objective(logp_new, torch.zeros(1, 1), torch.full((1, 1), 2.0), bounds)
    objective.sum().backward()
    assert logp_new.grad.item() == pytest.approx(2.0 * weight)


def test_sapo_is_a_soft_gate_of_slope_one_at_the_rollout_policy():
    for advantage, tau in ((1.0, 1.0), (-1.0, 1.05)):
        log_ratio = torch.zeros(1, 1, requires_grad=True)
        objective, _ = sapo_objective(log_ratio, torch.zeros(1, 1), torch.full((1, 1), advantage))
        objective.sum().backward()
        assert objective.item() == pytest.approx(2 / tau * advantage) and log_ratio.grad.item() == pytest.approx(advantage)
    far, clipped = objective_at(sapo_objective, [math.log(5.0)], 1.0)
    assert far.item() == pytest.approx(4 * torch.sigmoid(torch.tensor(4.0)).item()) and clipped.item()


def test_the_sampler_corrections_truncate_mask_or_band_the_weight_per_token_or_per_response():
    logp_sampler = torch.zeros(1, 4)
    logp_old = torch.tensor([[0.25, 1.0, 2.5, 6.0]]).log()  # w = pi_old / mu per token
    assert sampler_weights(logp_old, logp_sampler, 'tis').tolist()[0] == pytest.approx([0.25, 1, 2, 2])
    assert sampler_weights(logp_old, logp_sampler, 'mis').tolist()[0] == pytest.approx([0.25, 1, 0, 0])
    assert sampler_weights(logp_old, logp_sampler, 'icepop', band='openrlhf').tolist()[0] == pytest.approx([0, 1, 2.5, 0])
    # the response's weight 0.25 * 1 * 2.5 * 6 = 3.75: above TRL's cap 3, masked on every token
    assert sampler_weights(logp_old, logp_sampler, 'mis', 'sequence', 'trl').tolist()[0] == [0.0] * 4
    assert sampler_weights(logp_old, logp_sampler, 'tis', 'sequence', 'trl').tolist()[0] == pytest.approx([3.0] * 4)
    assert sampler_weights(logp_old, logp_sampler, 'none') is None


def test_the_sampler_rounds_tempers_and_cuts_the_logits_and_keeps_its_exact_log_probs(model):
    logits = torch.tensor([[1.0, 1.001, 3.0, -2.0]])
    assert torch.allclose(sampler_log_probs(logits, temperature=2.0), (logits / 2).log_softmax(-1))
    assert sampler_log_probs(logits, top_k=2).exp()[0, [0, 3]].tolist() == [0.0, 0.0]
    assert torch.equal(sampler_log_probs(logits, top_k=20), logits.log_softmax(-1))  # more than there are: all
    rounded = sampler_log_probs(logits, precision='bf16')
    assert rounded[0, 0] == rounded[0, 1] and not torch.equal(rounded, logits.log_softmax(-1))
    # The log-probs it returns are those of the tokens it drew, under the tempered actor of two rounds ago.
    actors = [GPT(policy_config()).eval() for _ in range(3)]
    sampler = Sampler(replace(PPOConfig(), staleness=2, sampler_temperature=1.3))
    prompts = torch.randint(0, 10, (5, 4), generator=torch.Generator().manual_seed(4))
    for actor in actors:
        sentences, logp_sampler = sampler(actor, prompts, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, _ = actors[0](sentences[:, :-1])
        expected = sampler_log_probs(logits[:, 4:], 1.3).gather(2, sentences[:, 5:, None]).squeeze(2)
    assert torch.allclose(logp_sampler, expected, atol=1e-6)
    assert torch.equal(sentences[:, :5], join(prompts))
    assert Sampler(PPOConfig()).on_policy and not sampler.on_policy


@pytest.mark.parametrize('train, config, settings', [
    (train_ppo, PPOConfig, dict(staleness=1, sampler_temperature=1.3, sampler_correction='tis', ratio='gmpo')),
    (train_grpo, GRPOConfig, dict(sampler_top_k=5, sampler_precision='bf16', sampler_correction='mis',
                                  correction_level='sequence', ratio='gspo')),
    (train_rloo, RLOOConfig, dict(staleness=1, sampler_temperature=1.3, sampler_correction='icepop',
                                  correction_band='openrlhf'))])
def test_an_off_policy_run_trains_on_the_samplers_responses_and_logs_their_weights(train, config, settings):
    # An untrained policy and reward model: only the plumbing is checked, in two short rounds.
    torch.manual_seed(0)
    policy = GPT(policy_config())
    config = replace(config(), iters=2, prompts_per_iter=8, **settings)
    _, history = train(policy, initial_reward_model(policy), config, PREFERENCES['first-digit'], progress=False)
    sizes = [row['sampler/effective_sample_size'] for row in history]
    assert all(0 < size < 1 for size in sizes) and all(math.isfinite(row['policy/loss']) for row in history)
