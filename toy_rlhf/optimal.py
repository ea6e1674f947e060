"""The exact optimum of the KL-regularised objective, by enumerating all 10^4 responses.

PPO maximises J_beta(pi) = E_{y~pi}[r(x, y)] - beta * KL(pi || pi_ref) per prompt x. Its maximiser
has a closed form (the Gibbs distribution):

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),    J*_beta(x) = beta * log Z(x)
             = beta * log E_{y~pi_ref}[exp(r(x, y) / beta)].

A response is four digits, so every pi(y|x) and r(x, y) can be computed for all 10^4 responses
(toy_rlhf.enumeration), and a trained policy compared with the optimum exactly: no sampling
anywhere in this module.

Convention: rewards exist for digit responses only (the reward model scores digits), so every
quantity here is over digit responses, with pi and pi_ref renormalised over them (conditioned on
writing four digits). The mass a policy puts on responses with SEP in them is reported on its own
(`non_digit_mass`); for trained policies it is tiny. Computations are in float64 so that identities
such as J_beta(pi*) = J*_beta hold to ~1e-12.
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from toy_rlhf.data import gold_reward
from toy_rlhf.enumeration import RESPONSES, all_responses, all_response_log_probs, all_response_rewards
from toy_rlhf.language import DIGITS, RESPONSE_LENGTH, is_valid_output
from toy_rlhf.preferences import Preference, best_reachable

# Prompts of an exact evaluation (each: all 10^4 responses): the gap closed to J* then has a standard
# error of ~0.1 points across prompt draws, and the reward model's tables take about a second.
EXACT_PROMPTS = 100
KL_POSITIONS = [f'kl_{t}' for t in range(1, RESPONSE_LENGTH + 1)]  # kl_split's per-position keys


# ---------------------------------------------------------------------------------------------
# The math, as pure functions of (P, 10^4) tables.

def non_digit_mass(log_pi):
    """The probability a policy puts on responses that are not four digits (SEP written somewhere):
    1 - sum_y pi(y), log_pi (P, 10^4) -> (P,)."""
    return -torch.expm1(log_pi.logsumexp(dim=1))


def digit_distribution(log_pi):
    """log pi renormalised over digit responses (pi conditioned on writing four digits): (P, 10^4)."""
    return log_pi - log_pi.logsumexp(dim=1, keepdim=True)


def optimal_log_probs(log_ref, rewards, beta):
    """log pi*_beta(y|x) = log pi_ref(y|x) + r(x, y) / beta - log Z(x): (P, 10^4), (P, 10^4) -> (P, 10^4).

    beta = 0 (no penalty): the limit beta -> 0+, which is pi_ref restricted to the responses of
    maximal reward and renormalised there: a one-hot on the best response when it is unique (with
    floating-point rewards, practically always).
    """
    if beta == 0:
        supported = _supported(log_ref, rewards)
        best = supported == supported.amax(dim=1, keepdim=True)
        return digit_distribution(log_ref.masked_fill(~best, float('-inf')))
    return digit_distribution(log_ref + rewards / beta)


def optimal_value(log_ref, rewards, beta):
    """J*_beta(x) = beta * log E_{y~pi_ref}[exp(r(x, y) / beta)]: (P, 10^4), (P, 10^4) -> (P,).

    Written as a logsumexp so that exp(r / beta) never overflows. beta = 0: max_y r(x, y) over the
    responses pi_ref can write (all of them, for a softmax policy).
    """
    if beta == 0:
        return _supported(log_ref, rewards).amax(dim=1)
    return beta * (digit_distribution(log_ref) + rewards / beta).logsumexp(dim=1)


def _supported(log_ref, rewards):
    """The rewards, -inf where pi_ref puts no mass (a response with infinite KL cost)."""
    return rewards.masked_fill(log_ref == float('-inf'), float('-inf'))


def expected_reward(log_pi, rewards):
    """E_{y~pi}[r(x, y)] over digit responses: (P, 10^4), (P, 10^4) -> (P,)."""
    return (digit_distribution(log_pi).exp() * rewards).sum(dim=1)


def response_kl(log_pi, log_ref):
    """KL(pi || pi_ref) of whole responses, in nats: (P, N), (P, N) -> (P,). Responses pi never
    writes count 0 (0 log 0 = 0), so a one-hot pi has a finite KL."""
    log_pi, log_ref = digit_distribution(log_pi), digit_distribution(log_ref)
    pi = log_pi.exp()
    return torch.where(pi > 0, pi * (log_pi - log_ref), 0.0).sum(dim=1)


def objective(log_pi, log_ref, rewards, beta):
    """The exact KL-regularised objective J_beta(pi) = E_pi[r] - beta * KL(pi || pi_ref), per prompt:
    (P, 10^4) x 3 -> (P,). Over digit responses, pi and pi_ref renormalised (see the module's
    docstring). J_beta(pi) <= J*_beta for every pi, with equality only at pi*. beta = 0: E_pi[r]
    (no KL term, which may be infinite)."""
    reward = expected_reward(log_pi, rewards)
    return reward if beta == 0 else reward - beta * response_kl(log_pi, log_ref)


def kl_split(log_pi, log_ref):
    """KL(pi || pi_ref) of responses, split by the chain rule into the first digit and the rest:
    (P, 10^4), (P, 10^4) -> {'kl_total', 'kl_first', 'kl_later', 'kl_1', .., 'kl_4'}, each (P,).

    kl_first = KL(pi(y1) || pi_ref(y1)) of the first-digit marginals; kl_later = kl_total - kl_first
    = E_{y1~pi} KL(pi(y2 y3 y4 | y1) || pi_ref(y2 y3 y4 | y1)) >= 0.

    Why it matters here: if the reward depends only on the first digit, r(x, y) = f(x, y1), then
    pi*(y) = pi_ref(y1) exp(f(x, y1) / beta) / Z * pi_ref(y2 y3 y4 | y1): the optimum changes the
    first digit only and writes digits 2-4 exactly as the reference does, so its kl_later is 0.
    The gold reward is of that kind and the learned one nearly so; KL a trained policy spends on
    digits 2-4 beyond what pi* of the same reward spends is waste (noise from the optimiser) or
    reward hacking (exploiting how the learned reward reads the later digits).

    The same chain rule, one position at a time, gives kl_1..kl_4 (kl_1 = kl_first): position t's
    term E_{y<t~pi} KL(pi(y_t | y<t) || pi_ref(y_t | y<t)), the KL of the first t digits' marginals
    less that of the first t - 1. A preference on the last digit moves every position.
    """
    prefix_kls = [response_kl(*(_prefix_marginal(log_probs, length) for log_probs in (log_pi, log_ref)))
                  for length in range(1, RESPONSE_LENGTH)] + [response_kl(log_pi, log_ref)]
    total, first = prefix_kls[-1], prefix_kls[0]
    by_position = {name: kl - (prefix_kls[t - 1] if t else 0) for t, (name, kl) in enumerate(zip(KL_POSITIONS, prefix_kls))}
    return {'kl_total': total, 'kl_first': first, 'kl_later': total - first, **by_position}


def _prefix_marginal(log_pi, length):
    """log pi(y1..y_length) over digit responses: (P, 10^4) -> (P, 10^length)."""
    return digit_distribution(log_pi).view(len(log_pi), DIGITS ** length, -1).logsumexp(dim=2)


def gold_metrics(log_pi, prompts, preference):
    """Exact gold metrics of a response distribution, over digit responses: log_pi (P, 10^4),
    prompts (P, 4) -> {'preference_rate', 'gold_reward', 'fidelity', 'gold_rate'}, each (P,).

    preference_rate  mass on responses at least as good as the best gold level a valid response
                     reaches for the prompt (first-digit: y1 == (x4 + 1) % 10)
    gold_reward      expected gold reward
    fidelity         expected share of digits 2-4 that obey the rule
    gold_rate        mass on responses of the best level with all four digits valid
    """
    best, gold, later_valid, best_and_valid = _gold_facts(tuple(map(tuple, prompts.tolist())), preference)
    pi = digit_distribution(log_pi).exp()
    return {'preference_rate': (pi * best).sum(dim=1), 'gold_reward': (pi * gold).sum(dim=1),
            'fidelity': (pi * later_valid).sum(dim=1), 'gold_rate': (pi * best_and_valid).sum(dim=1)}


@functools.lru_cache(maxsize=8)
def _gold_facts(prompts, preference):
    """What gold_metrics weighs every response of the prompts (a tuple of P 4-tuples) by, each
    (P, 10^4): whether it reaches the best level, its gold reward, the share of its digits 2-4 that
    obey the rule, and whether it is of the best level with all four digits valid. They depend on the
    prompts alone, and a study measures many policies on the same ones: computed once (a frozen
    Preference is hashable; the tensors are read, never written)."""
    prompts = torch.tensor(prompts, dtype=torch.long).view(-1, 4)
    P = len(prompts)
    responses = all_responses().repeat(P, 1)  # (P * 10^4, 4)
    repeated_prompts = prompts.repeat_interleave(RESPONSES, dim=0)
    valid = is_valid_output(repeated_prompts, responses).view(P, RESPONSES, -1)
    gold = preference.reward(repeated_prompts, responses).view(P, RESPONSES)
    best = gold >= best_reachable(preference, prompts).unsqueeze(1)
    return best, gold.double(), valid[:, :, 1:].double().mean(dim=2), best & valid.all(dim=2)


# ---------------------------------------------------------------------------------------------
# Summaries: means over prompts, as plain floats.

def distribution_summary(log_pi, log_ref, rewards, prompts, preference):
    """A response distribution against the reference: means over prompts of E[r], the KL split and
    the gold metrics of `preference`, {name: float}."""
    per_prompt = {'reward': expected_reward(log_pi, rewards), **kl_split(log_pi, log_ref),
                  **gold_metrics(log_pi, prompts, preference)}
    return {name: value.mean().item() for name, value in per_prompt.items()}


def optimal_frontier(log_ref, rewards, prompts, betas, preference):
    """The optimum at each beta, from one reference table and one reward table: a list of
    {'beta', 'J_star', 'reward', the KL split, the gold metrics of `preference`} (means over
    prompts), one per beta."""
    return [{'beta': beta, 'J_star': optimal_value(log_ref, rewards, beta).mean().item(),
             **distribution_summary(optimal_log_probs(log_ref, rewards, beta), log_ref, rewards, prompts,
                                    preference)}
            for beta in betas]


def compare_to_optimum(log_pi, log_ref, rewards, prompts, beta, preference):
    """A policy's table against the optimum at beta, all from precomputed (P, 10^4) tables.

    Returns means over prompts: J (the policy's objective), J_star, J_ref (= E_ref[r], the
    reference's objective: its KL is 0), gap_closed = (J - J_ref) / (J_star - J_ref) (1 at the
    optimum, 0 for the reference, negative if worse than the reference; None where the reward is
    constant and there is no gap), the policy's reward, KL
    split and gold metrics of `preference`, the same for pi* under 'optimal_*', and the policy's
    non_digit_mass.
    """
    J = objective(log_pi, log_ref, rewards, beta).mean().item()
    J_star = optimal_value(log_ref, rewards, beta).mean().item()
    J_ref = expected_reward(log_ref, rewards).mean().item()
    optimum = distribution_summary(optimal_log_probs(log_ref, rewards, beta), log_ref, rewards, prompts, preference)
    return {'beta': beta, 'J': J, 'J_star': J_star, 'J_ref': J_ref,
            'gap_closed': (J - J_ref) / (J_star - J_ref) if J_star > J_ref else None,  # None: no gap to close
            **distribution_summary(log_pi, log_ref, rewards, prompts, preference),
            **{f'optimal_{name}': value for name, value in optimum.items()},
            'non_digit_mass': non_digit_mass(log_pi).mean().item()}


def evaluate_against_optimum(policy, reference, reward_model, beta, prompts, preference, gold_margin=None):
    """A policy model against the exact optimum of its objective at beta on prompts (P, 4): see
    compare_to_optimum for the keys, with `preference`'s gold metrics; with gold_margin, also
    'gold_gap_closed', the gap closed under the gold reward (times gold_margin) instead of the reward
    model's. For several policies or betas, compute the tables once (exact_tables) and call
    compare_to_optimum or optimal_frontier directly."""
    tables = exact_tables(reference, reward_model, prompts, preference)
    log_pi = all_response_log_probs(policy.eval(), prompts)
    row = compare_to_optimum(log_pi, tables.log_ref, tables.rewards, prompts, beta, preference)
    if gold_margin is not None:
        gold = compare_to_optimum(log_pi, tables.log_ref, tables.gold(gold_margin), prompts, beta, preference)
        row.update({'gold_J': gold['J'], 'gold_J_star': gold['J_star'], 'gold_gap_closed': gold['gap_closed']})
    return row


# ---------------------------------------------------------------------------------------------
# The tables, computed once and shared by every policy, method and beta evaluated on the same prompts.

@dataclass
class ExactTables:
    """prompts (P, 4); log_ref: log pi_ref of every response (P, 10^4); rewards: the reward model's
    score of every response (P, 10^4); float64; the preference the labeler judged by (None for tables
    of a reward alone, which have no gold reward)."""
    prompts: torch.Tensor
    log_ref: torch.Tensor
    rewards: torch.Tensor
    preference: Optional[Preference] = None

    def gold(self, margin):
        """The labeler's gold reward of every response (P, 10^4), at `margin`."""
        if self.preference is None:
            raise ValueError('these tables were made without a preference: they have no gold reward')
        return gold_table(self.prompts, self.preference, margin)


def gold_table(prompts, preference, margin):
    """The labeler's gold reward of every response to each prompt (P, 4), at `margin`: (P, 10^4) float64."""
    responses = all_responses()
    return torch.stack([gold_reward(prompt.expand(len(responses), -1), responses, margin, preference)
                        for prompt in prompts]).double()


def exact_tables(reference, reward_model, prompts, preference):
    """The ExactTables of `prompts` (P, 4) for a reference policy, a reward model and a preference."""
    return ExactTables(prompts, all_response_log_probs(reference.eval(), prompts),
                       all_response_rewards(reward_model.eval(), prompts), preference)
