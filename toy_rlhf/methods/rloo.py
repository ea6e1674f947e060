"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740).

The whole response is one action: a bandit over the 10^4 responses of a prompt, with no credit
assignment to single tokens and no critic. Actor, reference and reward model as in PPO. Each iteration:
  1. rollout     K responses to each of P prompts; logp_old, logp_ref of their tokens; the score
  2. rewards     R_i = score_i - beta * sum_t (logp_old_t - logp_ref_t)   (k1 KL of the sequence)
  3. advantages  A_i = R_i - 1/(K-1) sum_{j != i} R_j   (the other responses to the same prompt)
  4. update      loss = -mean_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i),
                 rho_i = exp(sum_t logp_new_t - sum_t logp_old_t)   (the sequence's ratio)
On the rollout policy rho_i = 1 and the gradient is -mean_i A_i grad log pi(y_i | x): REINFORCE. With
the KL in the reward, sampled on-policy, that is an unbiased gradient of E[score] - beta * KL(pi || pi_ref),
whose optimum is pi* = pi_ref exp(score / beta) / Z.

The clip is on the sequence's ratio, as TRL's RLOOTrainer, not on each token's as PPO's: the importance
weight of a one-action bandit is the ratio of the action's probabilities, and the advantage belongs
to the whole response. (Clipping each token's ratio is PPO's surrogate, which REINFORCE++ keeps; here
it closed the same share of the gap to J*, see RLOOConfig.) --no-clip uses the ratio unclipped.

Off-policy on purpose (rollout.SamplerConfig): a sampler mu that is not the rollout policy writes the
responses, and a sampler correction weighs each response's term by f(w), w = pi_old(y) / mu(y) of the
whole response (ratios.sampler_weights at sequence level: the response is the one action). The
per-token ratio variants of PPO (GSPO, CISPO, ...) are not RLOO's: its ratio is the sequence's.

Like TRL (normalize_advantages=False) the advantages are not whitened by default. TRL's defaults of
beta 0.05, learning rate 1e-6 and 2 responses per prompt are for large language models and not taken:
beta is the project's common 1, 4 responses per prompt as PPO's groups (the paper used 2 and 4), and
the learning rate was measured here (see RLOOConfig).
"""
import math
from dataclasses import dataclass


from toy_rlhf.flags import PositiveFloat
from toy_rlhf.methods.advantages import clipped_surrogate_loss, leave_one_out_advantages, per_token_rewards, whiten
from toy_rlhf.methods.entropy import EntropyBonus, EntropyConfig
from toy_rlhf.methods.ratios import effective_sample_size, sampler_weights
from toy_rlhf.methods.rollout import (SamplerConfig, Sampler, TrainingLog, mean_rows, minibatches, prompt_groups,
                                      rollout, set_learning_rate, start_training)
from toy_rlhf.policy import token_log_probs_from, next_token_log_probs
from toy_rlhf.training import check_finite, gradient_step


@dataclass
class RLOOConfig(EntropyConfig, SamplerConfig):
    # PPO's: every gradient of the sequence loss was above the norm clip, so the steps are as large as
    # PPO's. 1e-4 closed as much of the gap but learned the preference more slowly; 1e-3 closed less,
    # spending KL on digits 2-4.
    learning_rate: PositiveFloat = 3e-4  # Adam step size
    # As TRL. One pass in four minibatches leaves the clip little to do (it binds on about one response
    # in ten by the end): clipped, unclipped and clipped per token closed the same gap.
    clip: bool = True  # clip the sequence's probability ratio to [1 - clip_epsilon, 1 + clip_epsilon]
    clip_epsilon: PositiveFloat = 0.2  # ratio clip (with --clip): how far one rollout may move a response's probability
    # Off, as TRL: leave-one-out advantages have mean 0 per prompt already, so whitening only scales
    # them, and the norm clip undoes any scale (the same run either way, to 3 digits).
    normalize_advantages: bool = False  # whiten the advantages over the batch (mean 0, std 1)


# ---------------------------------------------------------------------------------------------
# The math, as pure functions; the estimators and the clipped objective are the shared ones.

def sequence_rewards(score, logp_old, logp_ref, beta):
    """R = score - beta * sum_t (logp_old_t - logp_ref_t): the sum of PPO's per-token rewards.
    score (B,), logp_old and logp_ref (B, T) -> (B,)."""
    return per_token_rewards(score, logp_old, logp_ref, beta).sum(dim=1)


def sequence_surrogate_loss(logp_new, logp_old, advantages, clip_epsilon, weights=None):
    """The clipped surrogate of whole responses: token log-probs (B, T) summed into the sequence's,
    advantages (B,), weights (B,) the sampler's weight of each response (None: on-policy).
    clip_epsilon = inf leaves rho * A unclipped. Returns the loss, the fraction of clipped responses
    and the approximate KL(old || new) of the sequences."""
    return clipped_surrogate_loss(logp_new.sum(dim=1), logp_old.sum(dim=1), advantages, clip_epsilon, weights=weights)


# ---------------------------------------------------------------------------------------------
# The loop.

def train_rloo(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """Fine-tune a copy of sft_policy against reward_model with RLOO and a KL penalty of config.beta.

    Returns the actor (eval mode) and the log: one dict per iteration with TRL's metric names, plus
    what measure(rounds done, actor) returns after each round (as train_ppo's).
    """
    actor, reference, optimizer, generator = start_training(sft_policy, config)
    sampler = Sampler(config)  # the actor itself unless config makes the rollout off-policy
    bonus = EntropyBonus(config)  # its alpha, fixed or adapted step by step

    with TrainingLog(config.iters, f'RLOO beta={config.beta:g}', progress,
                     shown=('objective/scores', 'objective/kl_full', 'gold/preference_rate')) as log:
        for iteration in range(config.iters):
            # 0. learning rate of this round: decayed towards 0 (anneal_lr), or constant
            set_learning_rate((optimizer,), config, iteration)
            # 1. rollout: P prompts x K samples from the sampler, everything computed once with the actor
            batch = rollout(actor, reference, reward_model, prompt_groups(config, generator), generator,
                            preference, sampler)
            # 2. rewards: one per response, the score minus the k1 KL of the whole sequence
            batch['rewards'] = sequence_rewards(batch['score'], batch['logp_old'], batch['logp_ref'], config.beta)
            check_finite('rloo', iteration, rewards=batch['rewards'])
            # 3. advantages: each reward minus the mean of the other rewards of its prompt
            advantages = leave_one_out_advantages(batch['rewards'], config.samples_per_prompt)
            batch['advantages'] = whiten(advantages) if config.normalize_advantages else advantages
            # 4. update: the clipped surrogate of the sequences, each weighed by its sampler correction
            stats = update(actor, optimizer, batch, config, bonus)
            check_finite('rloo', iteration, loss=stats['policy/loss'])
            log.end_round(iteration, batch, config.beta, stats, actor, measure)
    return actor.eval(), log.rows


def update(actor, optimizer, batch, config, bonus):
    """config.epochs passes of minibatch steps on the sequence surrogate; returns the mean loss,
    fraction of clipped responses and approximate sequence KL(old || new) (and the sampler weights'
    effective sample size, with a correction)."""
    clip_epsilon = config.clip_epsilon if config.clip else math.inf
    actor.train()
    steps = []
    for index in minibatches(len(batch['sentences']), config):
        log_probs = next_token_log_probs(actor, batch['sentences'][index])  # (b, 4, V): next-token log-probs
        logp_new = token_log_probs_from(log_probs, batch['sentences'][index])  # (b, 4): the sampled tokens'
        # the sampler's weight pi_old(y) / mu(y) of each whole response, corrected; None without a correction
        weights = sampler_weights(batch['logp_old'][index], batch['logp_sampler'][index], config.sampler_correction,
                                  'sequence', config.correction_band)
        weights = None if weights is None else weights[:, 0]
        loss, clip_fraction, approx_kl = sequence_surrogate_loss(
            logp_new, batch['logp_old'][index], batch['advantages'][index], clip_epsilon, weights)
        loss = loss + bonus.loss(log_probs)  # the entropy bonus, per token as TRL (entropy.py)
        gradient_step(optimizer, loss, actor, config.max_grad_norm)
        step = {'policy/loss': loss.item(), 'policy/clipfrac': clip_fraction.item(),
                'policy/approxkl': approx_kl.item(), **bonus.logged()}
        if weights is not None:
            step['sampler/effective_sample_size'] = effective_sample_size(weights)
        steps.append(step)
    actor.eval()
    return mean_rows(steps)
