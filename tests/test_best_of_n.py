"""Best-of-n: the exact distribution against brute-force enumeration of the n draws (ties included),
its KL against hand-computed values and the textbook bound, its numerics at large n, and where it sits
against the optimal reward-KL frontier."""
import itertools
import math

import pytest
import torch

from toy_rlhf.methods.best_of_n import (MAX_N, BestOfNConfig, best_of_n_kl, best_of_n_log_probs,
                                        exact_policy, n_matching_kl, textbook_kl)
from toy_rlhf.optimal import ExactTables, expected_reward, optimal_log_probs, response_kl


REFERENCE = (0.1, 0.2, 0.3, 0.15, 0.25)
REWARDS = (1.0, 2.0, 2.0, 0.0, 1.0)  # three levels: {3} < {0, 4} < {1, 2}


def table(*values):
    return torch.tensor([values], dtype=torch.float64)


def brute_force_best_of_n(reference, rewards, n):
    """Every ordered n-tuple of draws, its probability split evenly among the draws of highest reward."""
    pi = [0.0] * len(reference)
    for draws in itertools.product(range(len(reference)), repeat=n):
        probability = math.prod(reference[y] for y in draws)
        best = max(rewards[y] for y in draws)
        winners = [y for y in draws if rewards[y] == best]
        for y in winners:
            pi[y] += probability / len(winners)
    return table(*pi)


# --- the distribution -----------------------------------------------------------------------------

@pytest.mark.parametrize('n', [1, 2, 3])
def test_the_exact_distribution_matches_brute_force_enumeration_with_ties(n):
    log_bon = best_of_n_log_probs(table(*REFERENCE).log(), table(*REWARDS), n)
    # float64 sums of at most 5^3 products: both sides agree to rounding.
    assert torch.allclose(log_bon.exp(), brute_force_best_of_n(REFERENCE, REWARDS, n), rtol=0, atol=1e-12)


def test_one_draw_is_the_reference():
    log_ref = table(*REFERENCE).log()
    assert torch.allclose(best_of_n_log_probs(log_ref, table(*REWARDS), 1), log_ref, rtol=0, atol=1e-15)


def test_two_draws_by_hand():
    # Levels: q = 0.15 (reward 0), 0.35 (reward 1), 0.5 (reward 2); G = 0.15, 0.5, 1.
    # P = 0.15^2 = 0.0225, 0.5^2 - 0.0225 = 0.2275, 1 - 0.25 = 0.75.
    # pi_bon = pi_ref * P / q: 0.1 * 0.2275/0.35 = 0.065, 0.2 * 0.75/0.5 = 0.3, 0.3 * 1.5 = 0.45,
    # 0.15 * 0.0225/0.15 = 0.0225, 0.25 * 0.65 = 0.1625.
    pi = best_of_n_log_probs(table(*REFERENCE).log(), table(*REWARDS), 2).exp()
    assert torch.allclose(pi, table(0.065, 0.3, 0.45, 0.0225, 0.1625), rtol=0, atol=1e-15)


def test_responses_the_reference_never_writes_stay_impossible_and_the_reference_is_renormalised():
    # A sixth response of the highest reward that pi_ref cannot write, and 20% of the mass off the
    # digit responses (written SEP): the same distribution over the five as above.
    log_ref = torch.cat([table(*REFERENCE).log() + math.log(0.8), table(float('-inf'))], dim=1)
    log_bon = best_of_n_log_probs(log_ref, torch.cat([table(*REWARDS), table(9.0)], dim=1), 3)
    assert log_bon[0, 5] == float('-inf')
    assert torch.allclose(log_bon[:, :5].exp(), brute_force_best_of_n(REFERENCE, REWARDS, 3), rtol=0, atol=1e-12)


def test_large_n_is_finite_and_sums_to_one():
    generator = torch.Generator().manual_seed(0)
    log_ref = torch.randn(2, 10 ** 4, generator=generator, dtype=torch.float64).log_softmax(dim=1)
    rewards = torch.randn(2, 10 ** 4, generator=generator, dtype=torch.float64)  # all distinct
    log_bon = best_of_n_log_probs(log_ref, rewards, MAX_N)
    assert torch.isfinite(log_bon).all()  # in logs, even mass (1/2)^10^4 is representable
    assert torch.allclose(log_bon.exp().sum(dim=1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_tiny_top_level_keeps_its_mass_where_g_to_the_n_cancels():
    # q_top = 1e-20, n = 10^4: P_top = 1 - (1 - 1e-20)^n = n q - C(n, 2) q^2 + ... = 1e-16 (1 - 5e-17).
    # Naively, 1 - 1e-20 rounds to 1 in float64 and P_top to 0.
    log_bon = best_of_n_log_probs(table(math.log1p(-1e-20), math.log(1e-20)), table(0.0, 1.0), 10 ** 4)
    assert math.isclose(log_bon[0, 1].exp().item(), 1e-16, rel_tol=1e-12)


def test_a_tiny_middle_level_keeps_its_mass_where_g_rounds_to_the_level_below():
    # Masses 0.3, 1e-20, 0.7, n = 3: P_middle = (0.3 + 1e-20)^3 - 0.3^3 = 3 * 0.3^2 * 1e-20 + O(1e-40)
    # = 2.7e-21. Naively G_2 = 0.3 + 1e-20 rounds to G_1 = 0.3 and P_middle to 0.
    log_bon = best_of_n_log_probs(table(0.3, 1e-20, 0.7).log(), table(0.0, 1.0, 2.0), 3)
    assert math.isclose(log_bon[0, 1].exp().item(), 2.7e-21, rel_tol=1e-12)


# --- KL -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n, top_mass, kl', [
    # p = 0.25 on the better response. P = 1 - 0.75^n; KL = P log(P/0.25) + (1 - P) log((1 - P)/0.75).
    (2, 0.4375, 0.0830),  # 0.4375 log 1.75 + 0.5625 log 0.75 = 0.24483 - 0.16182
    (4, 0.68359375, 0.4146),  # 0.68359 log 2.73438 + 0.31641 log 0.42188 = 0.68762 - 0.27308
    (8, 0.89988708, 0.9510),  # 0.89989 log 3.59955 + 0.10011 log 0.13348 = 1.15258 - 0.20161
])
def test_the_exact_kl_of_a_binary_reward_by_hand(n, top_mass, kl):
    log_ref, rewards = table(0.25, 0.75).log(), table(1.0, 0.0)
    assert math.isclose(best_of_n_log_probs(log_ref, rewards, n)[0, 0].exp().item(), top_mass, rel_tol=1e-8)
    assert math.isclose(best_of_n_kl(log_ref, rewards, n).item(), kl, abs_tol=5e-5)  # 4 digits by hand


@pytest.mark.parametrize('n', [1, 2, 3, 8, 64, 1000, MAX_N])
def test_the_level_kl_equals_the_response_kl_and_stays_below_the_textbook_formula(n):
    log_ref, rewards = table(*REFERENCE).log(), table(*REWARDS)
    kl = best_of_n_kl(log_ref, rewards, n)
    assert torch.allclose(kl, response_kl(best_of_n_log_probs(log_ref, rewards, n), log_ref), rtol=0, atol=1e-12)
    assert kl.item() <= textbook_kl(n) + 1e-15  # equality at n = 1 (both 0)
    assert kl.item() <= -math.log(0.5) + 1e-12  # never more than -log q of the top level


# --- against the frontier -------------------------------------------------------------------------

def test_with_two_reward_levels_best_of_n_is_the_optimum_at_the_beta_of_equal_top_mass():
    # pi* keeps pi_ref within each level too; its top mass P = p e^(d/beta) / (p e^(d/beta) + 1 - p)
    # equals best-of-n's when d/beta = log(P (1 - p) / (p (1 - P))).
    log_ref, rewards = table(0.1, 0.05, 0.35, 0.5).log(), table(1.5, 1.5, 0.0, 0.0)  # p = 0.15, d = 1.5
    P = 1 - 0.85 ** 3
    beta = 1.5 / math.log(P * 0.85 / (0.15 * (1 - P)))
    log_bon = best_of_n_log_probs(log_ref, rewards, 3)
    assert torch.allclose(log_bon, optimal_log_probs(log_ref, rewards, beta), rtol=0, atol=1e-12)


def test_with_three_reward_levels_best_of_n_is_below_the_frontier():
    # Levels 0/1/2 of mass 0.5/0.3/0.2, n = 4: G = 0.5, 0.8, 1; P = 0.0625, 0.3471, 0.5904;
    # E r = 0.3471 + 2 * 0.5904 = 1.5279, KL = 0.0625 log 0.125 + 0.3471 log 1.157 + 0.5904 log 2.952
    # = 0.55975. pi* at that KL (beta found by bisection, KL decreasing in beta) reaches E r = 1.5502.
    log_ref, rewards = table(0.5, 0.3, 0.2).log(), table(0.0, 1.0, 2.0)
    kl = best_of_n_kl(log_ref, rewards, 4).item()
    assert math.isclose(kl, 0.55975, abs_tol=1e-5)
    assert math.isclose(expected_reward(best_of_n_log_probs(log_ref, rewards, 4), rewards).item(), 1.5279,
                        abs_tol=1e-12)
    low, high = 0.01, 100.0
    for _ in range(100):
        beta = math.sqrt(low * high)
        too_far = response_kl(optimal_log_probs(log_ref, rewards, beta), log_ref) > kl
        low, high = (beta, high) if too_far else (low, beta)
    assert math.isclose(expected_reward(optimal_log_probs(log_ref, rewards, beta), rewards).item(), 1.5502,
                        abs_tol=1e-4)


# --- matching a KL budget -------------------------------------------------------------------------

def test_n_matching_kl_is_the_n_of_closest_mean_kl():
    log_ref = table(*REFERENCE).log().repeat(2, 1)
    rewards = torch.cat([table(*REWARDS), table(0.0, 1.0, 2.0, 3.0, 4.0)])  # two prompts: a mean is matched
    mean_kl = [best_of_n_kl(log_ref, rewards, n).mean().item() for n in range(1, 41)]
    for target in (0.05, 0.3, 0.7, 1.0):
        closest = 1 + min(range(40), key=lambda i: abs(mean_kl[i] - target))
        assert n_matching_kl(log_ref, rewards, target) == closest
    assert n_matching_kl(log_ref, rewards, 0.0) == 1
    assert n_matching_kl(log_ref, rewards, 5.0) == MAX_N  # more than best-of-n can spend (< log 10)


def test_exact_policy_draws_n_or_matches_the_kl_of_the_optimum():
    log_ref, rewards = table(*REFERENCE).log(), table(*REWARDS)
    tables = ExactTables(torch.zeros(1, 4, dtype=torch.long), log_ref, rewards)
    assert torch.equal(exact_policy(tables, BestOfNConfig(n=3)), best_of_n_log_probs(log_ref, rewards, 3))
    # pi* at beta = 1: Z = 0.15 + 0.35 e + 0.5 e^2 = 4.79593, level masses 0.03128, 0.19838, 0.77035,
    # KL = E r - log Z = 0.19838 + 2 * 0.77035 - 1.56777 = 0.17130. n = 2 and 3 spend 0.1634 and
    # 0.3483 (test_the_level_kl...), so n = 2 is closest.
    kl_star = response_kl(optimal_log_probs(log_ref, rewards, 1.0), log_ref).item()
    assert math.isclose(kl_star, 0.17130, abs_tol=1e-5)
    auto = exact_policy(tables, BestOfNConfig(n=0, beta=1.0))
    assert torch.equal(auto, best_of_n_log_probs(log_ref, rewards, 2))
