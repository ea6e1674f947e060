"""The entropy bonus of PPO, RLOO and GRPO (`entropy_coef`, TRL's name) and the exact distribution it
aims at.

What the code optimises, as TRL computes it: the loss of every minibatch gets
    - alpha * mean over the sampled response positions t of H(pi(. | s_t)),
the entropy of the policy's whole next-token distribution (all V tokens, SEP included) at each state
the rollout reached, averaged over tokens. The states are sampled; only H's dependence on the
state's own distribution is differentiated (no score-function term for how a token changes the
entropy of the states after it).

The closed form is for the sequence-level objective
    J_alpha(pi) = E_pi[r] - beta KL(pi || pi_ref) + alpha H(pi),    H(pi) = -sum_y pi(y) log pi(y),
whose maximiser (stationarity of the Lagrangian in pi(y), over digit responses) is
    pi_alpha(y) = pi_ref(y)^(beta / (alpha + beta)) exp(r(y) / (alpha + beta)) / Z,
    J*_alpha = (alpha + beta) log Z,
pi* at alpha = 0; tests/test_entropy.py checks both by enumeration. It is not exactly the fixed point
of the per-token bonus: with responses of 4 tokens the mean token entropy along a sampled response is
H(pi) / 4 in expectation (chain rule), but its gradient leaves out the future-entropy term, and the
bonus is weighed against advantages on each method's own scale (PPO whitens them, GRPO divides by
the group's std, RLOO's are the raw sequence reward). The target below is the closed form at
alpha = entropy_coef for PPO and RLOO: a reference point with the coefficient taken at face value,
against which a trained policy is measured; GRPO's bonus has no known target (None). pi_alpha also
flattens digits 2-4 towards pi_ref^(beta / (alpha + beta)), KL that pi* never spends (the "entropy tax").

Adaptive control (TRL's use_adaptive_entropy, after Skywork-OR1): after every gradient step alpha
goes up by entropy_coef_delta if that step's mean token entropy was at or below entropy_target, down
by it otherwise, within [0, entropy_coef_max]. Alpha then moves during the run, so no fixed-alpha
target is its destination: such a run's registry target is None. Unlike TRL before its fix, the
controller keeps measuring when alpha has come down to 0 (the entropy is computed whenever the
control is on), so it can raise alpha again.
"""
from dataclasses import dataclass

import torch

from toy_rlhf.flags import NonNegativeFloat, PositiveFloat
from toy_rlhf.optimal import digit_distribution, optimal_log_probs, response_kl


@dataclass
class EntropyConfig:
    """The entropy bonus's settings: PPO's, RLOO's and GRPO's configs inherit them."""
    # TRL's entropy_coef: alpha * the mean entropy of the next-token distributions at the sampled
    # positions, subtracted from the loss; 0 is off, as TRL and verl. With entropy_target, alpha's start.
    entropy_coef: NonNegativeFloat = 0.0  # entropy bonus alpha: the loss gets -alpha * mean token entropy
    # TRL's defaults when on: target 0.2 nats, delta 0.005, ceiling 1.
    entropy_target: NonNegativeFloat = 0.0  # adaptive bonus: alpha rises after each step whose mean token entropy is at or below this (nats), falls otherwise; 0: off
    entropy_coef_delta: PositiveFloat = 0.005  # adaptive bonus: alpha's step up or down after each gradient step
    entropy_coef_max: NonNegativeFloat = 1.0  # adaptive bonus: alpha's ceiling (its floor is 0)


class EntropyBonus:
    """The bonus's term in a method's loss, step by step: a fixed alpha, or TRL's adaptive one."""

    def __init__(self, config):
        self.config, self.alpha = config, config.entropy_coef

    def loss(self, log_probs):
        """-alpha * the mean token entropy of log_probs (B, T, V), to add to a step's loss (0 when
        off); under adaptive control, alpha for the next step is chosen from this step's entropy."""
        config = self.config
        if not (self.alpha or config.entropy_target):
            return 0.0
        entropy = mean_token_entropy(log_probs)
        alpha = self.alpha
        if config.entropy_target:
            step = config.entropy_coef_delta if entropy.item() <= config.entropy_target else -config.entropy_coef_delta
            self.alpha = min(max(alpha + step, 0.0), config.entropy_coef_max)
        return -alpha * entropy

    def logged(self):
        """alpha for the next step, in the training log when it moves (nothing otherwise: a run without
        adaptive control logs what it always did)."""
        return {'policy/entropy_coef': self.alpha} if self.config.entropy_target else {}


# ---------------------------------------------------------------------------------------------
# The bonus, as the loss uses it.

def mean_token_entropy(log_probs):
    """The mean entropy of next-token distributions: log_probs (B, T, V) -> a scalar (differentiable)."""
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# The exact optimum of E[r] - beta KL + alpha H, over digit responses.

def entropy_regularised_optimum(log_ref, rewards, beta, alpha):
    """log pi_alpha = (beta log pi_ref + r) / (alpha + beta) - log Z: (P, N), (P, N) -> (P, N).
    alpha = 0 is pi* (with its beta = 0 limit)."""
    if alpha == 0:
        return optimal_log_probs(log_ref, rewards, beta)
    return digit_distribution((beta * digit_distribution(log_ref) + rewards) / (alpha + beta))


def entropy_regularised_objective(log_pi, log_ref, rewards, beta, alpha):
    """J_alpha(pi) = E_pi[r] - beta KL(pi || pi_ref) + alpha H(pi) per prompt, exact: (P, N) x 3 -> (P,)."""
    log_pi = digit_distribution(log_pi)
    pi = log_pi.exp()
    entropy = -torch.where(pi > 0, pi * log_pi, 0.0).sum(dim=1)  # 0 log 0 = 0
    return (pi * rewards).sum(dim=1) - beta * response_kl(log_pi, log_ref) + alpha * entropy


def entropy_regularised_value(log_ref, rewards, beta, alpha):
    """J*_alpha = (alpha + beta) log sum_y pi_ref(y)^(beta / (alpha + beta)) exp(r(y) / (alpha + beta)): (P,)."""
    scale = alpha + beta
    return scale * ((beta * digit_distribution(log_ref) + rewards) / scale).logsumexp(dim=1)


def target_name(config):
    """The name of the target with_entropy_bonus gives where a fixed bonus moves it (config's
    entropy_coef > 0), else None: the method's own target_label holds."""
    alpha = getattr(config, 'entropy_coef', 0.0)  # methods without the bonus have no such field
    return f'pi_alpha (entropy bonus alpha={alpha:g})' if alpha > 0 else None


def with_entropy_bonus(target, closed_form=True):
    """The registry's target of a method with `entropy_coef`: without the bonus target(tables, config)
    (None: pi* of the reward model); with it pi_alpha at alpha = config.entropy_coef, or None (no
    exact target known) for a method whose closed_form is False, or under adaptive control.

    GRPO's is False: dividing by the group's std already moves its fixed point far from pi*
    (grpo.fixed_point), and the bonus is weighed against those rescaled advantages, so pi_alpha is
    not where it goes."""
    def entropy_target(tables, config):
        if config.entropy_target:  # an alpha that moves has no fixed-alpha destination
            return None
        if config.entropy_coef > 0:
            return entropy_regularised_optimum(tables.log_ref, tables.rewards, config.beta,
                                               config.entropy_coef) if closed_form else None
        if target is None:
            return optimal_log_probs(tables.log_ref, tables.rewards, config.beta)
        return target(tables, config)
    return entropy_target
