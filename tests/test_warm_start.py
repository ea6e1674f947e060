"""The rejection-sampling warm start of PPO: it keeps the best of n or resamples them by their
softmax weights, it moves the policy towards the preference before PPO's first round, it counts its
samples, and off it changes nothing."""
from dataclasses import replace

import torch

from toy_rlhf.language import sample_prompts
from toy_rlhf.methods.ppo import PPOConfig, train_ppo
from toy_rlhf.methods.rollout import start_training
from toy_rlhf.methods import warm_start
from toy_rlhf.methods.warm_start import kept_sentences, rejection_sampling_fine_tune
from toy_rlhf.metrics import evaluate_policy
from toy_rlhf.policy import generate_responses
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import score_sentences

TINY_PPO = dict(iters=2, prompts_per_iter=8)
EVALUATION = dict(n_prompts=1000, seed=1, preference=PREFERENCES['first-digit'])


def without_time(history):
    return [{name: value for name, value in row.items() if name != 'time/seconds'} for row in history]


def test_best_of_n_keeps_the_highest_scoring_of_each_prompts_n_responses(sft_policy, reward_model):
    prompts = sample_prompts(6, torch.Generator().manual_seed(0))
    best = kept_sentences(sft_policy, reward_model, prompts, 5, torch.Generator().manual_seed(1))
    # The same draws again, all of them: the kept sentence is the group's top score.
    drawn = generate_responses(sft_policy, prompts.repeat_interleave(5, dim=0), torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = score_sentences(reward_model, drawn).view(6, 5)
        assert torch.equal(score_sentences(reward_model, best), scores.max(dim=1).values)
    assert torch.equal(best[:, :4], prompts)


def test_resampling_keeps_each_response_with_its_softmax_weight(sft_policy, reward_model):
    # The same draws again, all of them. A kept response's score averages to the softmax(score /
    # beta)-weighted mean of its prompt's n scores, within 4 standard errors of the mean over 2,000
    # prompts (0.06 here). Keeping the best, or a uniform draw, would land more than 10 away (1.0 and
    # 2.9 on this reward model at beta 4, where the weights are neither one-hot nor flat).
    prompts, beta = sample_prompts(2000, torch.Generator().manual_seed(0)), 4.0
    kept = kept_sentences(sft_policy, reward_model, prompts, 4, torch.Generator().manual_seed(1), 'resample', beta)
    drawn = generate_responses(sft_policy, prompts.repeat_interleave(4, dim=0), torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = score_sentences(reward_model, drawn).view(2000, 4).double()
        kept_scores = score_sentences(reward_model, kept).double()
    weights = torch.softmax(scores / beta, dim=1)
    weighted = (weights * scores).sum(dim=1)
    standard_error = ((weights * (scores - weighted[:, None]) ** 2).sum(dim=1).mean() / 2000).sqrt()
    assert abs(kept_scores.mean() - weighted.mean()) < 4 * standard_error
    for other in (scores.max(dim=1).values, scores.mean(dim=1)):
        assert abs(other.mean() - weighted.mean()) > 10 * standard_error
    assert torch.equal(kept[:, :4], prompts)


def test_resampling_at_a_tiny_beta_keeps_the_best(sft_policy, reward_model):
    prompts = sample_prompts(6, torch.Generator().manual_seed(0))
    best, resampled = (kept_sentences(sft_policy, reward_model, prompts, 5, torch.Generator().manual_seed(1), pick,
                                      beta=1e-6) for pick in ('best', 'resample'))
    assert torch.equal(best, resampled)


def test_the_warm_start_raises_the_preference_rate_above_the_sft_policys(sft_policy, reward_model):
    # Best of 8 from a policy preferring the digit ~0.3 of the time holds it in 1 - 0.7^8 ~ 0.94 of
    # prompts; 4 passes over 256 such sentences took the rate from 0.30 to 0.83-0.91 at seeds 0-3.
    config = PPOConfig(warm_start_n=8, warm_start_prompts=256, warm_start_epochs=4, warm_start_batch_size=64)
    actor, reference, _, generator = start_training(sft_policy, config)
    samples = rejection_sampling_fine_tune(actor, reference, reward_model, config, generator)
    assert samples == 256 * 8
    before = evaluate_policy(sft_policy, sft_policy, **EVALUATION)['preference_rate']
    after = evaluate_policy(actor, sft_policy, **EVALUATION)['preference_rate']
    assert after > before + 0.3


def test_the_log_counts_the_warm_starts_samples(sft_policy, reward_model):
    config = PPOConfig(warm_start_n=4, warm_start_prompts=16, warm_start_epochs=1, **TINY_PPO)
    _, history = train_ppo(sft_policy, reward_model, config, PREFERENCES['first-digit'], progress=False)
    assert [row['samples'] for row in history] == [16 * 4 + 8 * 4 * (i + 1) for i in range(2)]


def test_off_the_warm_start_leaves_the_run_as_it_was_whatever_its_other_settings(sft_policy, reward_model):
    runs = [train_ppo(sft_policy, reward_model, config, PREFERENCES['first-digit'], progress=False)
            for config in (PPOConfig(**TINY_PPO),
                           PPOConfig(warm_start_prompts=7, warm_start_epochs=3, warm_start_learning_rate=0.1,
                                     **TINY_PPO))]
    (actor, history), (actor_off, history_off) = runs
    assert without_time(history) == without_time(history_off)
    weights, weights_off = actor.state_dict(), actor_off.state_dict()
    assert all(torch.equal(weights[name], weights_off[name]) for name in weights)


def test_a_second_beta_takes_the_first_betas_warm_start_and_ends_as_if_it_made_its_own(sft_policy, reward_model,
                                                                                      monkeypatch):
    config = PPOConfig(warm_start_n=4, warm_start_prompts=32, warm_start_epochs=2, **TINY_PPO)
    made = []
    monkeypatch.setattr(warm_start, '_last_warm_start', {})  # nothing left by another test
    monkeypatch.setattr(warm_start, 'rejection_sampling_fine_tune',
                        lambda *args: made.append(args[3].beta) or rejection_sampling_fine_tune(*args))
    preference = PREFERENCES['first-digit']
    train_ppo(sft_policy, reward_model, config, preference, progress=False)
    actor, history = train_ppo(sft_policy, reward_model, replace(config, beta=0.0), preference, progress=False)
    warm_start._last_warm_start.clear()  # as a fresh process would start
    actor_own, history_own = train_ppo(sft_policy, reward_model, replace(config, beta=0.0), preference, progress=False)
    assert made == [1.0, 0.0]  # made for beta 1, taken at beta 0, made again once forgotten
    assert without_time(history) == without_time(history_own)
    weights, weights_own = actor.state_dict(), actor_own.state_dict()
    assert all(torch.equal(weights[name], weights_own[name]) for name in weights)
    # Another seed, or a pick that depends on beta, makes its own.
    train_ppo(sft_policy, reward_model, replace(config, seed=1), preference, progress=False)
    train_ppo(sft_policy, reward_model, replace(config, warm_start_pick='resample'), preference, progress=False)
    train_ppo(sft_policy, reward_model, replace(config, warm_start_pick='resample', beta=0.5), preference,
              progress=False)
    assert made == [1.0, 0.0, 1.0, 1.0, 0.5]
