"""REINFORCE++ (Hu et al., arXiv 2501.03262; OpenRLHF's `reinforce` advantage estimator): PPO
without a critic and without a per-prompt baseline, its advantages normalised over the whole batch.

Actor, reference and reward model as in PPO. Each iteration:
  1. rollout     responses to P prompts; logp_old, logp_ref of their tokens; the score
  2. rewards     r_t = -beta * (logp_old_t - logp_ref_t), plus the score at the last token
  3. advantages  A_t = sum_{t' >= t} r_t' = score - beta * sum_{t' >= t} k1_t', then whitened over
                 every token of the batch: A_t <- (A_t - mean) / std
  4. update      PPO's clipped surrogate per token, over minibatches
That is PPO (toy_rlhf/methods/ppo.py) with the leave-one-out baseline taken out, so this module only
puts the shared pieces together and reuses PPO's update. The batch mean is the only baseline: it
does not depend on a response's own actions except through one sample in hundreds, and the paper
argues that normalising per prompt (GRPO) is biased because the group's mean and spread depend on
the very samples they normalise. Whitening shifts and scales the whole objective by one number each,
so the fixed point is still pi* = pi_ref exp(score / beta) / Z.
"""
from dataclasses import dataclass


from toy_rlhf.flags import PositiveInt
from toy_rlhf.methods.ppo import update
from toy_rlhf.methods.advantages import per_token_rewards, returns_to_go, whiten
from toy_rlhf.methods.rollout import (OffPolicyConfig, Sampler, TrainingLog, prompt_groups, rollout, set_learning_rate,
                                      start_training)
from toy_rlhf.training import check_finite


@dataclass
class ReinforcePPConfig(OffPolicyConfig):
    # One response to each of 384 prompts, PPO's 384 responses per rollout: with no per-prompt baseline
    # a group buys nothing (96 prompts x 4 closed the same gap to J*, seeds 0-2).
    prompts_per_iter: PositiveInt = 384  # prompts in a rollout
    samples_per_prompt: PositiveInt = 1  # responses per prompt (no group baseline needs more than one)


def reinforce_pp_advantages(score, logp_old, logp_ref, beta):
    """A_t = score - beta * sum_{t' >= t} (logp_old_t' - logp_ref_t'), whitened over the whole batch
    (all responses and tokens at once, not per prompt). score (B,), logp_old and logp_ref (B, T) -> (B, T)."""
    return whiten(returns_to_go(per_token_rewards(score, logp_old, logp_ref, beta)))


def train_reinforce_pp(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """Fine-tune a copy of sft_policy against reward_model with REINFORCE++ and a KL penalty of
    config.beta. Returns the actor (eval mode) and the log: one dict per iteration, TRL's metric names,
    plus what measure(rounds done, actor) returns after each round (as train_ppo's)."""
    actor, reference, optimizer, generator = start_training(sft_policy, config)
    sampler = Sampler(config)  # the actor itself unless config makes the rollout off-policy

    with TrainingLog(config.iters, f'REINFORCE++ beta={config.beta:g}', progress,
                     shown=('objective/scores', 'objective/kl_full', 'gold/preference_rate')) as log:
        for iteration in range(config.iters):
            # 0. learning rate of this round: decayed towards 0 (anneal_lr), or constant
            set_learning_rate((optimizer,), config, iteration)
            # 1. rollout from the sampler, everything computed once with the actor
            batch = rollout(actor, reference, reward_model, prompt_groups(config, generator), generator,
                            preference, sampler)
            # 2. and 3. rewards and advantages: the KL-penalised return to go, whitened over the batch
            batch['advantages'] = reinforce_pp_advantages(batch['score'], batch['logp_old'], batch['logp_ref'],
                                                          config.beta)
            check_finite('reinforce++', iteration, advantages=batch['advantages'])
            # 4. update: PPO's clipped surrogate per token
            stats = update(actor, optimizer, batch, config)
            check_finite('reinforce++', iteration, loss=stats['policy/loss'])
            log.end_round(iteration, batch, config.beta, stats, actor, measure)
    return actor.eval(), log.rows
