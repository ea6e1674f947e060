"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"): DPO on
pairs the current policy samples, labelled by the reward model, instead of a fixed set of pairs.

Policy: a copy of the SFT policy, trained. Reference: the SFT policy, frozen. Reward model: frozen,
the annotator. Each iteration:
  1. rollout  two responses y1, y2 per prompt from the current policy (temperature 1); log-probs
              under the reference and the reward model's scores s1, s2, computed once
  2. labels   Bradley-Terry: y1 chosen with probability sigmoid(s1 - s2); or hard: y1 chosen iff
              s1 >= s2 (TRL's rule: the higher score wins, a tie goes to the first)
  3. update   the DPO loss of each pair, -log sigmoid(beta * (log pi/pi_ref (y_w) - log pi/pi_ref (y_l))),
              a few gradient-norm-clipped Adam steps over minibatches of the round's pairs

Target. With Bradley-Terry labels the expected gradient of a pair (y1, y2) ~ pi, not differentiated
through the sampling, is beta * (sigmoid(beta * dh) - sigmoid(s1 - s2)) * grad dh, where
dh = log pi/pi_ref (y1) - log pi/pi_ref (y2). At pi* = pi_ref exp(s / beta) / Z every
beta * dh = s1 - s2, so pi* of the reward model at beta is a fixed point: the method aims where PPO
aims (ALGORITHMS.md section 0). The expectation is the whole story only in the limit: a round's
pairs are few, most pairs share the first digit once the policy prefers it (their labels are coin
flips, noise on the later digits), and the pull of the rest fades like sigmoid(-beta * dh), so the
approach to pi* is slow: measured, it closes less of the gap than PPO from as many samples (the
README's methods table).
With hard labels no finite policy is a fixed point: a pair with s1 > s2 is always labelled the same
way, and its loss only vanishes as beta * dh -> infinity. The only stationary policies are the
deterministic ones (a pair of two equal responses is a tie: dh = 0 whatever the weights, no
gradient), and each round moves mass from lower- to higher-scored responses, so the run drifts
towards the reward model's argmax response, pi* at beta -> 0, slowed (not stopped) by beta: the
gradient of a pair fades like sigmoid(-beta * dh) once it is ranked right. Measured as above: 0.86
of the gap closed, with 0.46 nats of KL spent on digits 2-4 (Bradley-Terry 0.07, pi* 0.001): pairs
that share the first digit now get consistent labels from the reward model's small differences in
how it scores the later digits, and the policy chases them; with 96 prompts per round the gap closed
fell from 0.87 after 50 rounds to 0.84 after 100.

Differs from TRL's OnlineDPOTrainer on purpose:
- labels are Bradley-Terry draws by default (TRL: hard), because then the target is pi*;
- responses are sampled at temperature 1 (TRL: 0.9): the DPO gradient above is an expectation over
  pairs drawn from pi itself, and a sampler at 0.9 draws from a sharper distribution than the
  policy being fitted (TRL scores them at temperature 1), which moves the fixed point away from pi*;
- a round's pairs feed `minibatches` steps (TRL: one step per generated batch); from the second step
  on the pairs were drawn from a policy one step old, a small departure from on-policy sampling.
"""
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from toy_rlhf.flags import PositiveFloat, PositiveInt, Seed
from toy_rlhf.language import PROMPT_LENGTH
from toy_rlhf.methods.dpo import dpo_loss, sequence_log_probs
from toy_rlhf.methods.rollout import (Sampler, SamplerSettings, TrainingLog, mean_rows, minibatches, prompt_groups,
                                      rollout, set_learning_rate, start_training)
from toy_rlhf.training import check_finite, gradient_step


@dataclass
class OnlineDPOConfig(SamplerSettings):
    """Not a RolloutConfig: a pair is always two samples, there is no ratio to clip, and beta must be
    positive (at beta = 0 the DPO loss is log 2 whatever the policy). The pairs may come from a
    sampler that is not the policy (SamplerSettings), with no importance weight: with Bradley-Terry labels
    DPO's optimum is pi* whichever distribution with full support draws the pairs. How far a finite
    run gets does depend on the sampler (docs/results.md, the off-policy study)."""
    beta: PositiveFloat = 1.0  # KL strength of the objective, the same beta as PPO's penalty
    labels: Literal['bradley-terry', 'hard'] = 'bradley-terry'  # how the reward model picks the winner
    # Twice PPO's samples: at PPO's 19,200 (50 rounds) it fell short of the RL methods' gap to J*; 100
    # rounds close about half a point more. Per round, 192 prompts beat 96 at the same budget; a
    # learning rate of 1e-4 closed less, 1e-3 less still (the later digits drifting).
    iters: PositiveInt = 100  # sample-label-update rounds
    prompts_per_iter: PositiveInt = 192  # prompts per round, each giving one pair
    samples_per_prompt: ClassVar[int] = 2  # a pair: what the labeller compares (not a flag)
    epochs: PositiveInt = 1  # passes of the update over each round's pairs
    minibatches: PositiveInt = 2  # minibatches (gradient steps) per pass
    learning_rate: PositiveFloat = 3e-4  # Adam step size
    anneal_lr: bool = True  # decay the learning rate linearly to 0 over the rounds, as RolloutConfig's
    max_grad_norm: PositiveFloat = 1.0  # gradient-norm clip
    seed: Seed = 0  # random seed: the same seed gives the same run


# ---------------------------------------------------------------------------------------------
# The math.

def first_wins(scores, labels, generator=None):
    """Which response of each pair the annotator chooses: scores (P, 2) -> (P,) bool, True where the
    first is chosen.

    'bradley-terry': a draw with P(first) = sigmoid(s1 - s2), the labeller the reward model was fitted
    to (a tie is a coin flip). 'hard': s1 >= s2, the first winning ties as in TRL.
    """
    if labels == 'bradley-terry':
        return torch.rand(len(scores), generator=generator) < torch.sigmoid(scores[:, 0] - scores[:, 1])
    if labels == 'hard':
        return scores[:, 0] >= scores[:, 1]
    raise ValueError(f"labels must be 'bradley-terry' or 'hard', got {labels!r}")


def chosen_and_rejected(first):
    """Indices into the rollout (pairs adjacent: 2i, 2i + 1) of the chosen and of the rejected
    response of each pair, from first (P,) bool: two (P,) tensors."""
    pair_start = 2 * torch.arange(len(first))
    return pair_start + (~first).long(), pair_start + first.long()


# ---------------------------------------------------------------------------------------------
# The loop.

def train_online_dpo(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """Fine-tune a copy of sft_policy with online DPO at config.beta, reward_model labelling the
    policy's own pairs. Returns the policy (eval mode) and the log: one row per round, the rollout's
    metrics (rollout_row) and the DPO loss, implicit rewards, margins and accuracies of its pairs, plus
    what measure(rounds done, actor) returns after each round (as train_ppo's)."""
    actor, reference, optimizer, generator = start_training(sft_policy, config)
    sampler = Sampler(config)  # the actor itself unless config makes the rollout off-policy

    with TrainingLog(config.iters, f'online DPO beta={config.beta:g}', progress,
                     shown=('loss', 'rewards/margins', 'gold/preference_rate')) as log:
        for iteration in range(config.iters):
            # 0. learning rate of this round: decayed towards 0 (anneal_lr), or constant
            set_learning_rate((optimizer,), config, iteration)
            # 1. rollout: two responses per prompt from the sampler (the current policy by default), adjacent
            batch = rollout(actor, reference, reward_model, prompt_groups(config, generator), generator,
                            preference, sampler)
            check_finite('online_dpo', iteration, score=batch['score'])
            # 2. labels: the reward model picks the chosen response of each pair
            chosen, rejected = chosen_and_rejected(first_wins(batch['score'].view(-1, 2), config.labels, generator))
            # 3. update: the DPO loss of the labelled pairs against the frozen reference
            stats = update(actor, optimizer, batch, chosen, rejected, config)
            check_finite('online_dpo', iteration, loss=stats['loss'])
            log.end_round(iteration, batch, config.beta, stats, actor, measure)
    return actor.eval(), log.rows


def update(actor, optimizer, batch, chosen, rejected, config):
    """config.epochs passes of minibatch DPO steps over the round's pairs (indices into the rollout:
    chosen, rejected (P,)); returns the mean loss and TRL's implicit-reward metrics."""
    actor.train()
    # The reference's log-probs of the sampled responses are constants of the round.
    logp_ref = batch['logp_ref'].sum(dim=1)
    sentences = batch['sentences']
    steps = []
    for index in minibatches(len(chosen), config):
        both = torch.cat([chosen[index], rejected[index]])
        # Chosen and rejected responses share one forward pass: (2B, 9) -> (2B,).
        policy_chosen, policy_rejected = sequence_log_probs(
            actor, sentences[both, :PROMPT_LENGTH + 1], sentences[both, PROMPT_LENGTH + 1:]).chunk(2)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, logp_ref[chosen[index]], logp_ref[rejected[index]], config.beta)
        gradient_step(optimizer, loss, actor, config.max_grad_norm)
        margins = chosen_rewards - rejected_rewards
        steps.append({'loss': loss.item(), 'rewards/chosen': chosen_rewards.mean().item(),
                      'rewards/rejected': rejected_rewards.mean().item(),
                      'rewards/margins': margins.mean().item(),
                      'rewards/accuracies': (margins > 0).float().mean().item(),
                      'logps/chosen': policy_chosen.mean().item(),
                      'logps/rejected': policy_rejected.mean().item()})
    actor.eval()
    return mean_rows(steps)
