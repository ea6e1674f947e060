"""Best-of-n sampling, exactly: draw n responses from the reference, keep the one the reward model
scores highest. Nothing is trained; with 10^4 responses per prompt its distribution is enumerated.

Group a prompt's responses into reward levels k = 1..K in ascending order (equal scores share a
level), with q_k the reference mass of level k and G_k = q_1 + ... + q_k. The best of n draws is in
level k or below iff all n draws are, which has probability G_k^n, so

    P_k = P(the kept response is in level k) = G_k^n - G_{k-1}^n.

Given which draws land in the top level reached, those draws are independent samples of pi_ref
conditioned on the level, and a tie is broken uniformly at random among them, whatever they are: the
kept response follows pi_ref within its level. Hence

    pi_bon(y) = pi_ref(y) P_k / q_k   (y in level k),    KL(pi_bon || pi_ref) = sum_k P_k log(P_k / q_k).

With distinct scores (one response per level) this is Beirami et al.'s (arXiv 2401.01879)
pi_bon(y) = F(y)^n - F^-(y)^n. The KL often quoted, log n - (n - 1)/n (Stiennon et al. 2020), is
the continuous case and an upper bound (ibid.); with few levels the true KL is far smaller and
saturates at -log q_K. For a reward of two levels, pi_bon keeps pi_ref's conditionals within each
level just as pi* does, so it is exactly pi*_beta for the beta that puts the same mass P_2 on the
top level: best-of-n is on the optimal reward-KL frontier there, and below it with three or more.

Differs from TRL's BestOfNSampler (trl.extras), which samples n responses and scores them: here it
is exact, so its KL, reward and gold metrics carry no sampling noise. Numerics: everything is in
float64 and in logs (G^n for n = 10^4 underflows; 1 - G_{k-1}^n for a tiny top level cancels).
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from toy_rlhf.flags import NonNegativeFloat, NonNegativeInt
from toy_rlhf.optimal import digit_distribution, optimal_log_probs, response_kl

# On the test fixtures n = 10^4 spends 7.6 nats (pi*_beta spends 1.6 at beta = 0.1): budget enough.
MAX_N = 10 ** 4  # the largest n searched for a KL budget
LOG_HALF = -math.log(2)


@dataclass
class BestOfNConfig:
    # 0 puts best-of-n at the KL that pi*_beta spends on the same prompts, so a sweep over beta compares
    # the two at equal KL (n = 10 at beta = 1 on the test fixtures); a fixed n ignores beta.
    n: NonNegativeInt = 0  # responses drawn per prompt, the best kept; 0: the n whose exact KL matches pi*_beta's
    beta: NonNegativeFloat = 1.0  # n = 0 matches the KL of pi* at this beta; J_beta scores it


# ---------------------------------------------------------------------------------------------
# The math, as pure functions.

def log1mexp(a):
    """log(1 - e^a) for a <= 0, accurate for a near 0 and for a very negative (Maechler 2012)."""
    return torch.where(a > LOG_HALF, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def reward_levels(log_ref, rewards):
    """One prompt's reward levels: log_ref (N,) normalised, rewards (N,) -> (supported, level, log_q).

    supported (N,) bool: the responses pi_ref can write (the others are never drawn); level: the level
    of each supported response, 0 = lowest score; log_q (K,): log of each level's reference mass.
    Only exactly equal scores tie; the reward model's float32 scores do tie (7,000-9,600 distinct
    values of 10^4 on the test fixtures), so ties matter for it too, not only for the gold reward.
    """
    supported = log_ref > float('-inf')
    _, level = torch.unique(rewards[supported], return_inverse=True)
    log_p = log_ref[supported]
    K = int(level.max()) + 1
    # A logsumexp per level: shifted by the level's largest log-prob, so no level's mass underflows.
    shift = torch.full((K,), float('-inf'), dtype=log_p.dtype).scatter_reduce(0, level, log_p, 'amax')
    mass = torch.zeros(K, dtype=log_p.dtype).index_add(0, level, (log_p - shift[level]).exp())
    return supported, level, mass.log() + shift


class Levels(NamedTuple):
    """Reward levels, (..., K) each: log q_k, log G_k and log(G_{k-1} / G_k), all that
    P_k = G_k^n - G_{k-1}^n needs for any n (a search over n computes them once)."""
    log_q: torch.Tensor
    log_G: torch.Tensor
    log_ratio: torch.Tensor


def cumulative_masses(log_q):
    """The Levels of level masses log_q (..., K), ascending reward; a level of mass 0 (log q = -inf,
    as padding above the top level) is allowed.

    log G_k: near G = 1 as log(1 - mass above k), whose relative precision n log G_k needs when the
    levels above are tiny; elsewhere a logcumsumexp. log(G_{k-1} / G_k) = log(1 - q_k / G_k), not a
    difference of two logs near 0; -inf at the lowest level (G_0 = 0).
    """
    above = log_q.flip(-1).logcumsumexp(-1).flip(-1)[..., 1:]
    log_above = torch.cat([above, above.new_full((*above.shape[:-1], 1), float('-inf'))], dim=-1)
    log_G = torch.where(log_above < LOG_HALF, log1mexp(log_above), log_q.logcumsumexp(-1))
    return Levels(log_q, log_G, log1mexp((log_q - log_G).clamp(max=0.0)))


def level_log_probs(levels, n):
    """log P_k = log(G_k^n - G_{k-1}^n) = n log G_k + log(1 - (G_{k-1} / G_k)^n): (..., K).
    P_1 = G_1^n at the lowest level; P = 0 for a level of mass 0."""
    return n * levels.log_G + log1mexp(n * levels.log_ratio)


def level_kl(levels, n):
    """KL(pi_bon || pi_ref) = sum_k P_k log(P_k / q_k): (..., K) -> (...)."""
    log_P = level_log_probs(levels, n)
    return torch.where(log_P > float('-inf'), log_P.exp() * (log_P - levels.log_q), 0.0).sum(dim=-1)


def best_of_n_log_probs(log_ref, rewards, n):
    """log pi_bon(y|x) of best-of-n over the responses: log_ref (P, N), rewards (P, N) -> (P, N),
    float64. log_ref is renormalised first (pi_ref over digit responses); -inf stays -inf."""
    log_ref = digit_distribution(log_ref.double())
    log_bon = torch.full_like(log_ref, float('-inf'))
    for log_ref_x, rewards_x, log_bon_x in zip(log_ref, rewards, log_bon):
        supported, level, log_q = reward_levels(log_ref_x, rewards_x)
        log_P = level_log_probs(cumulative_masses(log_q), n)
        log_bon_x[supported] = log_ref_x[supported] + (log_P - log_q)[level]
    return log_bon


def best_of_n_kl(log_ref, rewards, n):
    """Exact KL(pi_bon || pi_ref) per prompt: (P, N) x 2 -> (P,)."""
    return level_kl(all_levels(log_ref, rewards), n)


def all_levels(log_ref, rewards):
    """The Levels of every prompt, (P, K max), padded with levels of mass 0 above the top."""
    log_q = [reward_levels(log_ref_x, rewards_x)[2]
             for log_ref_x, rewards_x in zip(digit_distribution(log_ref.double()), rewards)]
    return cumulative_masses(torch.nn.utils.rnn.pad_sequence(log_q, batch_first=True, padding_value=float('-inf')))


def textbook_kl(n):
    """log n - (n - 1)/n: best-of-n's KL for a continuous reward, an upper bound on the exact one."""
    return math.log(n) - (n - 1) / n


def n_matching_kl(log_ref, rewards, kl):
    """The n in 1..MAX_N whose exact mean KL over prompts is closest to `kl`.

    The KL grows with n, so a bisection finds the smallest n reaching `kl`; that n or the one before
    is the closest. Past what best-of-n can spend (KL saturates at the top level's -log q) it is MAX_N.
    """
    levels = all_levels(log_ref, rewards)

    def mean_kl(n):
        return level_kl(levels, n).mean().item()

    low, high = 1, MAX_N  # invariant: the answer n* = min{n : mean_kl(n) >= kl} is in [low, high]
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if mean_kl(middle) >= kl else (middle + 1, high)
    if low > 1 and kl - mean_kl(low - 1) < abs(mean_kl(low) - kl):
        return low - 1
    return low


# ---------------------------------------------------------------------------------------------
# For the registry: a method without a network.

def exact_policy(tables, config):
    """Best-of-n under the reward model on the prompts of tables (toy_rlhf.optimal.ExactTables):
    log-probs (P, 10^4). n = 0 takes the n whose mean KL is closest to pi*_beta's."""
    n = config.n
    if n == 0:
        optimum = optimal_log_probs(tables.log_ref, tables.rewards, config.beta)
        n = n_matching_kl(tables.log_ref, tables.rewards, response_kl(optimum, tables.log_ref).mean().item())
    return best_of_n_log_probs(tables.log_ref, tables.rewards, n)
