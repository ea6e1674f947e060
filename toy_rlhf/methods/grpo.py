"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Eq. 3) as TRL's GRPOTrainer ships it, with
the published fixes as options, and the exact distribution each variant converges to.

Actor: a copy of the SFT policy, trained. Reference: the SFT policy, frozen. Reward model: frozen.
Each iteration:
  1. rollout     K = samples_per_prompt responses to each prompt (a group), as PPO's rollout
  2. rewards     R_i = score_i, or with kl='k1-in-reward' R_i = score_i - beta * sum_t (logp_old - logp_ref)_t
  3. advantages  A_i = (R_i - mean of the group) / (std + 1e-4), std of the group (Bessel), of the batch
                 or none (Dr. GRPO); every token of response i gets A_i. No critic, no per-token reward.
  4. update      the clipped surrogate plus the KL to the reference, per token, averaged over tokens:
                     L_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta * k3_t,
                     rho_t = pi(y_t|s_t) / pi_old(y_t|s_t),  k3_t = pi_ref/pi - log(pi_ref/pi) - 1
                 'bias-corrected-k3' (DeepSeek-V3.2, TRL use_bias_correction_kl) uses rho_t * k3_t;
                 'k1-in-reward' has no KL term in the loss (it is in R_i, as RLOO and PPO).
With drop_uniform_groups, groups whose K scores are all equal (DAPO's dynamic sampling, simplified:
the filter without the over-sampling that refills the batch) are left out of the update, KL term
included. With a continuous reward model that happens only when the K responses score identically.

What the KL term does (Tang & Munos, arXiv 2506.09477). At the rollout policy, y_t ~ pi_old = pi:
  E[grad k3_t] = -sum_a pi_ref(a|s) grad log pi(a|s) = grad KL(pi_ref(.|s) || pi(.|s)), the FORWARD KL;
  E[grad rho_t k3_t] = grad sum_a pi(a|s) k3(a) = grad KL(pi(.|s) || pi_ref(.|s)), the reverse KL. rho_t
  must stay differentiable, as TRL's coef_1: detached, it is 1 on-policy and the fix does nothing.
Both act state by state (the loss does not see that an earlier token changes the later states, the
"future-KL" term); k1-in-reward is the whole response's score-function gradient, PPO's.

Differs from TRL on purpose: beta 1 (TRL 0), so GRPO compares with PPO at the same beta; 4 samples per
prompt (TRL 8) and PPO's rollout and schedule (one pass in 4 minibatches, lr 3e-4; TRL takes one step
per rollout at lr 1e-6, for large models). At lr 3e-4 the defaults end 0.065 nats from their fixed
point (20 prompts, exact), 0.12 at 1e-3; 1e-4 needs 100 rounds for 0.039. Responses all have 4 tokens,
so TRL's loss_type aggregations (grpo, bnpo, dapo, dr_grpo) differ by a constant factor: not offered.
"""
import math
from dataclasses import dataclass
from typing import Literal

import torch

from toy_rlhf.flags import PositiveFloat
from toy_rlhf.language import DIGITS, RESPONSE_LENGTH
from toy_rlhf.methods.advantages import group_normalised_advantages
from toy_rlhf.methods.entropy import EntropyBonus, EntropyConfig
from toy_rlhf.methods.ratios import effective_sample_size, policy_loss, weighted_mean
from toy_rlhf.methods.rollout import (OffPolicyConfig, RolloutConfig, Sampler, TrainingLog, mean_rows, minibatches,
                                      prompt_groups, rollout, set_learning_rate, start_training)
from toy_rlhf.optimal import digit_distribution, optimal_log_probs
from toy_rlhf.policy import token_log_probs_from, next_token_log_probs
from toy_rlhf.training import check_finite, gradient_step


@dataclass
class GRPOConfig(EntropyConfig, OffPolicyConfig):
    # Dividing by the group's std (TRL's default) makes the update blind to the reward's scale: at
    # beta 1 the reward model's std of ~4.5 under the SFT policy acts like beta ~4 (see fixed_point).
    scale_rewards: Literal['group', 'batch', 'none'] = 'group'  # advantages / std of: the group, the batch, none
    kl: Literal['k3-in-loss', 'bias-corrected-k3', 'k1-in-reward'] = 'k3-in-loss'  # KL estimator and where it goes
    # TRL's epsilon_high=None means "the same as epsilon"; a flag cannot be None, so the default is
    # RolloutConfig's clip_epsilon, the symmetric clip. DAPO uses 0.28.
    clip_epsilon_high: PositiveFloat = RolloutConfig.clip_epsilon  # upper ratio clip, 1 + this (DAPO: 0.28)
    drop_uniform_groups: bool = False  # leave groups whose scores are all equal out of the update (DAPO)


# ---------------------------------------------------------------------------------------------
# The math, as pure functions; the group advantages and the clipped surrogate are advantages.py's.

def k3_kl(logp_new, logp_ref, logp_old=None):
    """Per-token k3 = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1 (>= 0, 0 where pi = pi_ref),
    times rho = pi_new / pi_old (differentiable) if logp_old is given: the bias-corrected k3. (B, T)."""
    log_ratio = logp_ref - logp_new
    k3 = torch.expm1(log_ratio) - log_ratio
    return k3 if logp_old is None else k3 * (logp_new - logp_old).exp()


def uniform_groups(scores, samples_per_prompt):
    """True for each sample whose group's scores are all equal (no signal): (P * K,) -> (P * K,) bool."""
    grouped = scores.view(-1, samples_per_prompt)
    uniform = grouped.amax(dim=1) == grouped.amin(dim=1)
    return uniform.repeat_interleave(samples_per_prompt)


# ---------------------------------------------------------------------------------------------
# The loop.

def train_grpo(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """Fine-tune a copy of sft_policy against reward_model with GRPO (the variant config names).

    Returns the actor (eval mode) and the log: one dict per iteration with TRL's metric names, plus
    what measure(rounds done, actor) returns after each round (as train_ppo's).
    """
    actor, reference, optimizer, generator = start_training(sft_policy, config)
    K = config.samples_per_prompt
    sampler = Sampler(config)  # the actor itself unless config makes the rollout off-policy
    bonus = EntropyBonus(config)  # its alpha, fixed or adapted step by step

    with TrainingLog(config.iters, f'GRPO beta={config.beta:g}', progress,
                     shown=('objective/scores', 'objective/kl_full', 'gold/preference_rate')) as log:
        for iteration in range(config.iters):
            # 0. learning rate of this round: decayed towards 0 (anneal_lr), or constant
            set_learning_rate((optimizer,), config, iteration)
            # 1. rollout: P prompts x K samples from the sampler, everything computed once with the actor
            batch = rollout(actor, reference, reward_model, prompt_groups(config, generator), generator,
                            preference, sampler)
            # 2. rewards: the score of each response (minus beta times its k1 log-ratio, for k1-in-reward)
            rewards = batch['score']
            if config.kl == 'k1-in-reward':
                rewards = rewards - config.beta * (batch['logp_old'] - batch['logp_ref']).sum(dim=1)
            check_finite('grpo', iteration, rewards=rewards)
            # 3. advantages: relative to the group, the same for every token of a response
            advantages = group_normalised_advantages(rewards, K, config.scale_rewards)
            batch['advantages'] = advantages.unsqueeze(1).expand_as(batch['logp_old'])
            uniform = uniform_groups(batch['score'], K)  # on the score, as DAPO's accuracy and TRL's metric
            kept = (~uniform if config.drop_uniform_groups else torch.ones_like(uniform)).nonzero().squeeze(1)
            # 4. update: clipped surrogate + beta * k3 per token, over minibatches of the kept samples
            stats = update(actor, optimizer, batch, kept, config, bonus) if len(kept) else {}
            check_finite('grpo', iteration, loss=stats.get('policy/loss', 0.0))
            stats = {'frac_reward_zero_std': uniform.float().mean().item(), **stats}
            log.end_round(iteration, batch, config.beta, stats, actor, measure)
    return actor.eval(), log.rows


def update(actor, optimizer, batch, kept, config, bonus):
    """One or more passes of minibatch steps over the samples `kept`; returns the mean loss, clip
    fraction, approximate KL(old || new) and the mean k3 to the reference."""
    actor.train()
    steps = []
    for index in minibatches(len(kept), config):
        index = kept[index]
        log_probs = next_token_log_probs(actor, batch['sentences'][index])  # (b, 4, V): next-token log-probs
        logp_new = token_log_probs_from(log_probs, batch['sentences'][index])  # (b, 4): the sampled tokens'
        logp_old, logp_ref = batch['logp_old'][index], batch['logp_ref'][index]
        # the trainer's ratio pi / pi_old, clipped as config.ratio says; the sampler's weight pi_old / mu
        loss, clip_fraction, approx_kl, weights = policy_loss(
            logp_new, logp_old, batch['logp_sampler'][index], batch['advantages'][index], config,
            config.clip_epsilon_high)
        # the KL term is an expectation over pi_old's tokens too: the sampler's weight corrects it alike
        kl = weighted_mean(k3_kl(logp_new, logp_ref, logp_old if config.kl == 'bias-corrected-k3' else None), weights)
        if config.kl != 'k1-in-reward':
            loss = loss + config.beta * kl
        loss = loss + bonus.loss(log_probs)  # the entropy bonus, per token as TRL (entropy.py)
        gradient_step(optimizer, loss, actor, config.max_grad_norm)
        step = {'policy/loss': loss.item(), 'policy/clipfrac': clip_fraction.item(),
                'policy/approxkl': approx_kl.item(), 'kl': kl.item(), **bonus.logged()}
        if weights is not None:
            step['sampler/effective_sample_size'] = effective_sample_size(weights)
        steps.append(step)
    actor.eval()
    return mean_rows(steps)


# ---------------------------------------------------------------------------------------------
# The exact fixed point of the expected update.

def forward_kl_step(log_ref, q, beta, bisections=24, newton_steps=4):
    """log pi over the last axis maximising sum_a pi(a) q(a) - beta KL(pi_ref || pi), for each state.

    Stationarity: q(a) + beta pi_ref(a) / pi(a) = lambda, so pi(a) = beta pi_ref(a) / (lambda - q(a)),
    lambda > max q where pi_ref > 0, set by f(t) = beta sum_a pi_ref(a) / (t + max q - q(a)) = 1, t =
    lambda - max q. f falls as t grows and is >= 1 at t = beta pi_ref(argmax), <= 1 at t = beta:
    bisection on log t there, then Newton from the bracket's left end, which cannot overshoot (f is
    convex) and takes the error from ~1e-7 to rounding in a few steps.
    """
    ref = log_ref.exp()
    q = q.masked_fill(ref == 0, -math.inf)  # pi = 0 where pi_ref = 0, whatever q
    top, best = q.max(dim=-1, keepdim=True)
    gaps = top - q  # >= 0; inf where pi_ref = 0
    low, high = torch.log(beta * ref.gather(-1, best)), torch.full_like(top, math.log(beta))
    for _ in range(bisections):
        middle = (low + high) / 2
        too_much = beta * (ref / (middle.exp() + gaps)).sum(dim=-1, keepdim=True) > 1
        low, high = torch.where(too_much, middle, low), torch.where(too_much, high, middle)
    t = low.exp()
    for _ in range(newton_steps):
        terms = beta * ref / (t + gaps)  # f(t) = sum of terms, f'(t) = -sum of terms / (t + gaps)
        t = t + (terms.sum(dim=-1, keepdim=True) - 1) / (terms / (t + gaps)).sum(dim=-1, keepdim=True)
    pi = ref / (t + gaps)
    return torch.log(pi / pi.sum(dim=-1, keepdim=True))


def reverse_kl_step(log_ref, q, beta):
    """log pi maximising sum_a pi(a) q(a) - beta KL(pi || pi_ref), per state: pi_ref exp(q / beta) / Z."""
    return (log_ref + q / beta).log_softmax(dim=-1)


def per_token_fixed_point(log_ref, rewards, beta, step):
    """The policy whose every state s solves step(pi_ref(.|s), Q(s, .), beta), Q(s, a) = E_pi[reward | s, a]
    (the expected reward, no KL in it), by a backward pass over the trie of prefixes: rewards (P, 10^4)
    -> log pi (P, 10^4), float64.

    The leaves' Q is the reward; a state's value sum_a pi(a|s) Q(s, a) is its parent's Q. pi_ref is the
    reference conditioned on writing digits (digit_distribution), its conditionals read off the
    marginals of the prefixes; a prefix pi_ref never writes gets a uniform pi_ref (pi never gets there).
    """
    P = len(log_ref)
    marginals = [digit_distribution(log_ref).view(P, *[DIGITS] * RESPONSE_LENGTH)]  # log pi_ref(prefix)
    for _ in range(RESPONSE_LENGTH):
        marginals.insert(0, marginals[0].logsumexp(dim=-1))
    q, conditionals = rewards.view_as(marginals[-1]), []
    for level in range(RESPONSE_LENGTH, 0, -1):
        parent = marginals[level - 1].unsqueeze(-1)
        log_ref_next = torch.where(parent > -math.inf, marginals[level] - parent, -math.log(DIGITS))
        log_pi_next = step(log_ref_next, q, beta)
        q = (log_pi_next.exp() * q).sum(dim=-1)
        conditionals.append(log_pi_next.view(P, *[DIGITS] * level, *[1] * (RESPONSE_LENGTH - level)))
    return sum(conditionals).reshape(P, -1)


def reward_std(log_pi, rewards, scale_rewards):
    """The reward's std under pi, + 1e-4 as TRL: per prompt (P, 1) for 'group'; for 'batch', one
    number over the table's prompts taken as the batch's prompt distribution."""
    weights = digit_distribution(log_pi).exp()
    if scale_rewards == 'batch':
        weights = weights / len(weights)
    dims = (0, 1) if scale_rewards == 'batch' else (1,)
    mean = (weights * rewards).sum(dim=dims, keepdim=True)
    return (weights * (rewards - mean) ** 2).sum(dim=dims, keepdim=True).sqrt() + 1e-4


def fixed_point(tables, config, tolerance=1e-10):
    """log pi (P, 10^4) where the expected GRPO update of `config` is zero, for a tabular policy: the
    registry's `target`. It is the on-policy update's: config's off-policy knobs (OffPolicyConfig) are
    not in it. The KL terms' gradients are in the module's docstring; the advantage's:

    E[(r_i - group mean) grad log pi(y_i)] = (K - 1)/K grad E_pi[r], the group mean holding the sample's
    own r. So the surrogate pushes with c r / sigma, c = (K - 1)/K, sigma = 1 (none) or the std of the
    reward under pi itself (group; batch: over the table's prompts), and each state s solves
        max_pi sum_a pi(a|s) Q(s, a) - beta KL(.|s),   Q(s, a) = E_pi[c r / sigma | s, a],
    forward KL for k3-in-loss, reverse for bias-corrected k3 (per_token_fixed_point). sigma depends on
    the answer: it is the root of std(sigma) = sigma (self_consistent_sigma) nearest the reference's
    std. On a binary bandit that is the stable fixed point (0.81 at beta 1, q_ref 0.25), not the
    unstable one (0.887) beyond which the policy collapses onto argmax r; where the only fixed point is
    that collapse (beta 0.25 there) it returns it.

    Approximations: (1) tabular; (2) std scaling: the std of K samples replaced by sigma_pi, a
    large-K limit. At K = 4 a binary reward's exact expected advantage gap is ~1.4 whatever p, where
    c / sigma grows without bound as p -> 0 or 1; on the reward model's tables (20 prompts, beta 1)
    the exact K = 4 fixed point (by Monte Carlo over groups) was 0.008 nats from this one; (3)
    drop_uniform_groups ignored (with a continuous reward, groups are rarely uniform). k1-in-reward:
    the whole objective's gradient times a positive number per prompt, so pi* (exactly without
    scaling, under (2) with it). bias-corrected k3 without scaling: Q is the expected reward, not the
    soft value that subtracts the KL spent on later digits ("future KL"), so it is pi* at beta K/(K-1)
    only where the reward reads y1 alone. On 20 prompts at beta 1 it is 0.007 nats from pi*, and 6e-5
    from pi* at beta 4/3: the (K - 1)/K matters here, the future KL hardly. beta = 0: argmax r.
    """
    log_ref, rewards, beta = tables.log_ref, tables.rewards, config.beta
    if beta == 0 or config.kl == 'k1-in-reward':
        return optimal_log_probs(log_ref, rewards, beta)
    step = forward_kl_step if config.kl == 'k3-in-loss' else reverse_kl_step
    c = (config.samples_per_prompt - 1) / config.samples_per_prompt
    if config.scale_rewards == 'none':
        return per_token_fixed_point(log_ref, c * rewards, beta, step)

    def answer(sigma):  # the fixed point for a given sigma ((P, 1) or (1, 1))
        return per_token_fixed_point(log_ref, c * rewards / sigma, beta, step)

    def excess(sigma):  # std under the answer - sigma: zero at a self-consistent sigma
        return reward_std(answer(sigma), rewards, config.scale_rewards) - sigma

    return answer(self_consistent_sigma(excess, reward_std(log_ref, rewards, config.scale_rewards), tolerance))


def self_consistent_sigma(excess, start, tolerance, factor=1.2):
    """The root of excess(sigma) nearest `start` in the direction excess points (a tensor of
    independent scalars, one per prompt under group scaling): step geometrically from `start` by
    `factor` until excess changes sign, then close that bracket to a relative width of `tolerance`
    by regula falsi in log sigma, Illinois's way (the end kept twice in a row has its excess halved,
    so both ends move): about ten evaluations where bisection took some thirty-five, each a backward
    pass over every prompt's trie.

    Why not iterate sigma <- std(sigma): that map can fall faster than slope -1 near its root (a
    stronger push raises the reward's spread before it concentrates the policy), and then it settles
    into a two-cycle and never converges. The root is the same stationary point of the expected update
    either way. The search always ends: std >= 1e-4 (reward_std's floor) gives excess > 0 below 1e-4,
    and std is bounded, so excess < 0 for large sigma."""
    value = excess(start)
    upward = value > 0  # which way the root lies
    inner, f_inner = start.clone(), value
    outer = torch.where(upward, start * factor, start / factor)
    f_outer = excess(outer)
    while (moving := (f_outer > 0) == upward).any():  # 2. step out until the sign changes
        inner, f_inner = torch.where(moving, outer, inner), torch.where(moving, f_outer, f_inner)
        outer = torch.where(moving, torch.where(upward, outer * factor, outer / factor), outer)
        f_outer = excess(outer)
    # 3. close [inner, outer]: x = log sigma; `kept` is the end the last step kept (-1 inner, 1 outer).
    #    Where rounding puts the secant's point on an end, the middle instead; an excess of exactly 0
    #    is the root, and closes the bracket there.
    a, b, kept = inner.log(), outer.log(), torch.zeros_like(inner)
    while (open_ := (b.exp() - a.exp()).abs() > tolerance * a.exp()).any():
        c = b - f_outer * (b - a) / (f_outer - f_inner)
        c = torch.where(open_, torch.where((c - a) * (c - b) < 0, c, (a + b) / 2), b)
        f_c = excess(c.exp())
        replaces_outer = open_ & ((f_c > 0) == (f_outer > 0))
        replaces_inner = open_ & ~replaces_outer
        f_inner = torch.where(replaces_outer & (kept == -1), f_inner / 2, f_inner)
        f_outer = torch.where(replaces_inner & (kept == 1), f_outer / 2, f_outer)
        b, f_outer = torch.where(replaces_outer, c, b), torch.where(replaces_outer, f_c, f_outer)
        a, f_inner = torch.where(replaces_inner, c, a), torch.where(replaces_inner, f_c, f_inner)
        kept = torch.where(replaces_outer, -1.0, torch.where(replaces_inner, 1.0, kept))
        a, b = torch.where(open_ & (f_c == 0), c, a), torch.where(open_ & (f_c == 0), c, b)
    return (a + b).div(2).exp()
