"""The exact optimiser: gradient descent on the exact KL-regularised objective, nothing sampled.

A reference, not a practical method. Each step takes a fresh batch of prompts, enumerates all 10^4
responses of each (toy_rlhf.enumeration, with the autograd graph kept), and descends one of

    reverse  -J_beta(pi_theta) = beta * KL(pi_theta || pi*) - J*_beta     (the RL objective itself)
    forward  KL(pi* || pi_theta) + const                                  (distillation of pi*)

with pi* = pi_ref exp(r / beta) / Z of the reward model (toy_rlhf.optimal), by Adam. Its gradients
are exact: no sampling noise, no baseline, no clipping, no credit assignment to get right. That is
why it is the fairest measure of what a method could have found: a sampled method estimates this
very gradient (the score-function estimators' expectation is it, tests/test_exact.py), so where the
exact optimiser stops short of pi* on a network, what stops it is the network and the path of the
optimisation, not the estimator; and where it gets further than a method, the method's estimator
(or its settings) is what is missing. It is impractical because a real language has no 10^4
responses to enumerate.

Details:
- J_beta is over digit responses, pi_theta renormalised over them (as toy_rlhf.optimal measures it),
  so the mass m on responses with SEP is free in J; the reverse loss adds -log(1 - m), the
  cross-entropy of "writes four digits", which pi* does with probability 1: 0 at m = 0, and it keeps
  the mass where the rewards are. The forward loss is the cross-entropy of pi* against the raw
  pi_theta, which pays for SEP by itself. m is logged.
- beta_start > 0 anneals the target's beta geometrically from beta_start to beta over the first
  anneal_fraction of the steps (beta_schedule.py): the path moves through targets each close to
  where the policy is.
- warm_start starts the policy from another checkpoint (say, the forward-KL fit of pi*); the
  reference stays the SFT policy given.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from toy_rlhf.enumeration import all_response_log_probs_with_grad, all_response_rewards, prompt_pool, step_tables
from toy_rlhf.flags import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Seed
from toy_rlhf.methods.beta_schedule import BetaScheduleConfig, target_beta
from toy_rlhf.methods.rollout import TrainingLog, start_training
from toy_rlhf.optimal import digit_distribution, non_digit_mass, objective, optimal_log_probs, optimal_value
from toy_rlhf.training import check_finite, gradient_step


@dataclass
class ExactConfig(BetaScheduleConfig):
    beta: NonNegativeFloat = 1.0  # strength of the KL penalty of the objective (the target pi*'s beta)
    iters: PositiveInt = 100  # gradient steps, each on a fresh batch of prompts
    prompts_per_iter: PositiveInt = 8  # prompts per step, each with all 10^4 responses
    learning_rate: PositiveFloat = 1e-3  # Adam step size
    max_grad_norm: PositiveFloat = 1.0  # gradient-norm clip
    divergence: Literal['reverse', 'forward'] = 'reverse'  # reverse: the RL objective; forward: distil pi*
    warm_start: str = ''  # a policy checkpoint to start from ('' for the SFT policy, the reference)
    # The reward model's table of a prompt costs several times the step's own pass and gradient: a
    # pool computes each of its prompts' tables once, and each step draws its prompts from it.
    prompt_pool: NonNegativeInt = 32  # draw each step's prompts from this many fixed ones (0: fresh prompts)
    seed: Seed = 0  # random seed: the prompts of each step


# ---------------------------------------------------------------------------------------------
# The math, as pure functions of (P, 10^4) tables.

def reverse_loss(log_pi, log_ref, rewards, beta):
    """-J_beta(pi) - log(1 - m) per prompt, averaged: log_pi (P, 10^4) with gradient, log_ref and
    rewards (P, 10^4) -> scalar. -J_beta = beta * KL(pi || pi*) - J*, so its minimum is at pi*."""
    writes_digits = log_pi.logsumexp(dim=1)  # log(1 - m)
    return (-objective(log_pi, log_ref, rewards, beta) - writes_digits).mean()


def forward_loss(log_pi, log_optimum):
    """The cross-entropy -sum_y pi*(y) log pi(y) per prompt, averaged: KL(pi* || pi) plus the entropy
    of pi*, which does not depend on pi. log_pi unnormalised, so mass on SEP costs."""
    return -(log_optimum.exp() * log_pi).sum(dim=1).mean()


def distribution_stats(log_pi):
    """What the collapse is read from, means over prompts: the mass of the most likely response, the
    entropy of responses (nats, over digit responses) and the SEP mass. log_pi (P, 10^4) -> {name: float}."""
    log_q = digit_distribution(log_pi.detach())
    q = log_q.exp()
    return {'policy/top_mass': q.amax(dim=1).mean().item(),
            'policy/response_entropy': -(torch.where(q > 0, q * log_q, 0.0)).sum(dim=1).mean().item(),
            'policy/sep_mass': non_digit_mass(log_pi.detach()).mean().item()}


# ---------------------------------------------------------------------------------------------
# The loop.

def train_exact(sft_policy, reward_model, config, preference=None, progress=True, measure=None, start_policy=None,
                reward_table=None):
    """Descend the exact objective of config against reward_model's pi*, the reference sft_policy,
    starting from start_policy (a model), config.warm_start (a checkpoint) or else sft_policy.
    `preference` is not needed by the objective (the reward model defines it) and is taken for the
    registry's contract. Returns the policy (eval mode) and one row per step: the loss, J and J* of
    the step's prompts at the target's beta, the gap closed on them, the collapse statistics, and
    what measure(steps done, policy) returns. reward_table (prompts (P, 4) -> (P, 10^4)) replaces the
    reward model's scores, for the optimiser against a known reward (the gold one) alone."""
    policy, reference, optimizer, generator = start_training(sft_policy, config)
    if config.warm_start:
        from toy_rlhf.checkpoint import load_model  # here: toy_rlhf.checkpoint reads the method registry
        start_policy = load_model(config.warm_start, 'policy')
    if start_policy is not None:
        policy.load_state_dict(start_policy.state_dict())
    with TrainingLog(config.iters, f'exact {config.divergence} beta={config.beta:g}', progress,
                     shown=('objective/gap_closed', 'policy/top_mass')) as log:
        rewards_of = reward_table or (lambda prompts: all_response_rewards(reward_model, prompts))
        pool = prompt_pool(reference, rewards_of, config, generator)
        for step in range(config.iters):
            prompts, log_ref, rewards = step_tables(reference, rewards_of, config, generator, pool)
            beta = target_beta(config, step)
            policy.train()
            log_pi = all_response_log_probs_with_grad(policy, prompts)  # (P, 10^4), with gradient
            if config.divergence == 'reverse':
                loss = reverse_loss(log_pi, log_ref, rewards, beta)
            else:
                loss = forward_loss(log_pi, optimal_log_probs(log_ref, rewards, beta))
            check_finite('exact', step, loss=loss)
            gradient_step(optimizer, loss, policy, config.max_grad_norm)
            policy.eval()
            row = {'iter': step, 'pairs': 0, 'beta': beta, 'loss': loss.item(),
                   **step_objective(log_pi.detach(), log_ref, rewards, beta), **distribution_stats(log_pi)}
            log.add({**row, **(measure(step + 1, policy) if measure is not None else {})})
            log.step()
    return policy.eval(), log.rows


def step_objective(log_pi, log_ref, rewards, beta):
    """J, J* and the gap closed (J - J_ref) / (J* - J_ref) of a step's prompts at beta, before its
    update: {name: float}."""
    J = objective(log_pi, log_ref, rewards, beta).mean().item()
    J_star = optimal_value(log_ref, rewards, beta).mean().item()
    J_ref = objective(log_ref, log_ref, rewards, beta).mean().item()
    return {'objective/J': J, 'objective/J_star': J_star,
            'objective/gap_closed': (J - J_ref) / (J_star - J_ref) if J_star > J_ref else 1.0}
