"""The exact optimum of the KL-regularised objective, by enumerating all 10^4 responses.

PPO maximises J_beta(pi) = E_{y~pi}[r(x, y)] - beta * KL(pi || pi_ref) per prompt x. Its maximiser
has a closed form (the Gibbs distribution):

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),    J*_beta(x) = beta * log Z(x)
             = beta * log E_{y~pi_ref}[exp(r(x, y) / beta)].

A response is four digits, so every pi(y|x) and r(x, y) can be computed for all 10^4 responses,
and a trained policy compared with the optimum exactly: no sampling anywhere in this module.

Convention: rewards exist for digit responses only (the reward model scores digits), so every
quantity here is over digit responses, with pi and pi_ref renormalised over them (conditioned on
writing four digits). The mass a policy puts on responses with SEP in them is reported on its own
(`non_digit_mass`); for trained policies it is tiny. Computations are in float64 so that identities
such as J_beta(pi*) = J*_beta hold to ~1e-12.
"""
import torch

from toy_rlhf.language import DIGITS, PROMPT_LENGTH, RESPONSE_LENGTH, is_valid_output, join, \
    preferred_first_token
from toy_rlhf.reward import score_sentences

RESPONSES = DIGITS ** RESPONSE_LENGTH  # 10^4 digit responses per prompt


def all_responses():
    """Every digit response in lexicographic order: (10^4, 4) long; row i holds the digits of i."""
    return torch.cartesian_prod(*[torch.arange(DIGITS)] * RESPONSE_LENGTH)


# ---------------------------------------------------------------------------------------------
# The expensive part: one pass of each model over the enumeration, reused for every beta.

@torch.no_grad()
def response_log_probs_exact(policy, prompts, prompts_per_pass=16):
    """log pi(y|x) of every digit response: prompts (P, 4) -> (P, 10^4) float64, responses in the
    order of all_responses().

    A trie instead of 10^4 x 4 rows: the sequence prompt + SEP + y1 y2 y3 (length 8) holds, in one
    teacher-forced pass, the next-token distributions of y1 (position 4, the same for every
    prefix), y2 | y1, y3 | y1 y2 and y4 | y1 y2 y3. So the 1,000 three-digit prefixes of a prompt
    give everything, and log pi(y) = sum of the four conditionals. The digits' probabilities do not
    sum to 1 where the policy can write SEP; see non_digit_mass.
    """
    prefixes = all_responses()[::DIGITS, :RESPONSE_LENGTH - 1]  # (1000, 3), row j holds digits of j
    chunks = []
    for chunk in prompts.split(prompts_per_pass):
        P = len(chunk)
        sequences = join(chunk.repeat_interleave(len(prefixes), dim=0), prefixes.repeat(P, 1))
        logits, _ = policy(sequences)  # (P * 1000, 8, vocab)
        # Softmax over the whole vocabulary, then the digits: SEP keeps its share of the mass.
        log_probs = logits[:, PROMPT_LENGTH:].double().log_softmax(dim=-1)[..., :DIGITS]
        log_probs = log_probs.view(P, len(prefixes), RESPONSE_LENGTH, DIGITS)
        first = log_probs[:, 0, 0]  # (P, 10): y1
        second = log_probs[:, ::DIGITS ** 2, 1]  # (P, 10, 10): prefixes y1 0 0 -> y2 | y1
        third = log_probs[:, ::DIGITS, 2].reshape(P, DIGITS, DIGITS, DIGITS)  # y3 | y1 y2
        fourth = log_probs[:, :, 3].reshape(P, DIGITS, DIGITS, DIGITS, DIGITS)  # y4 | y1 y2 y3
        total = (first[:, :, None, None, None] + second[:, :, :, None, None]
                 + third[:, :, :, :, None] + fourth)
        chunks.append(total.reshape(P, RESPONSES))
    return torch.cat(chunks)


@torch.no_grad()
def response_rewards_exact(reward_model, prompts, batch_size=8192):
    """The reward model's score of every digit response: prompts (P, 4) -> (P, 10^4) float64.

    P * 10^4 forward passes in batches of batch_size sequences, built batch by batch so that memory
    stays bounded whatever P is.
    """
    responses = all_responses()
    rewards = torch.empty(len(prompts) * RESPONSES, dtype=torch.float64)
    for start in range(0, len(rewards), batch_size):
        index = torch.arange(start, min(start + batch_size, len(rewards)))
        sentences = join(prompts[index // RESPONSES], responses[index % RESPONSES])
        rewards[index] = score_sentences(reward_model, sentences).double()
    return rewards.view(len(prompts), RESPONSES)


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
        best = _supported(log_ref, rewards) == _supported(log_ref, rewards).amax(dim=1, keepdim=True)
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
    docstring). J_beta(pi) <= J*_beta for every pi, with equality only at pi*."""
    reward = expected_reward(log_pi, rewards)
    return reward if beta == 0 else reward - beta * response_kl(log_pi, log_ref)


def kl_split(log_pi, log_ref):
    """KL(pi || pi_ref) of responses, split by the chain rule into the first digit and the rest:
    (P, 10^4), (P, 10^4) -> {'kl_total', 'kl_first', 'kl_later'}, each (P,).

    kl_first = KL(pi(y1) || pi_ref(y1)) of the first-digit marginals; kl_later = kl_total - kl_first
    = E_{y1~pi} KL(pi(y2 y3 y4 | y1) || pi_ref(y2 y3 y4 | y1)) >= 0.

    Why it matters here: if the reward depends only on the first digit, r(x, y) = f(x, y1), then
    pi*(y) = pi_ref(y1) exp(f(x, y1) / beta) / Z * pi_ref(y2 y3 y4 | y1): the optimum changes the
    first digit only and writes digits 2-4 exactly as the reference does, so its kl_later is 0.
    The gold reward is of that kind and the learned one nearly so; KL a trained policy spends on
    digits 2-4 beyond what pi* of the same reward spends is waste (noise from the optimiser) or
    reward hacking (exploiting how the learned reward reads the later digits).
    """
    first_pi, first_ref = (_first_digit_marginal(log_probs) for log_probs in (log_pi, log_ref))
    total = response_kl(log_pi, log_ref)
    first = response_kl(first_pi, first_ref)
    return {'kl_total': total, 'kl_first': first, 'kl_later': total - first}


def _first_digit_marginal(log_pi):
    """log pi(y1) over digit responses: (P, 10^4) -> (P, 10)."""
    return digit_distribution(log_pi).view(len(log_pi), DIGITS, -1).logsumexp(dim=2)


def gold_metrics(log_pi, prompts):
    """Exact gold metrics of a response distribution, over digit responses: log_pi (P, 10^4),
    prompts (P, 4) -> {'preference_rate', 'fidelity', 'gold_rate'}, each (P,).

    preference_rate  mass on y1 == (x4 + 1) % 10
    fidelity         expected share of digits 2-4 that obey the rule
    gold_rate        mass on responses with the preferred y1 and all of digits 2-4 valid
    """
    P = len(prompts)
    responses = all_responses().repeat(P, 1)  # (P * 10^4, 4)
    valid = is_valid_output(prompts.repeat_interleave(RESPONSES, dim=0), responses).view(P, RESPONSES, -1)
    preferred = responses[:, 0].view(P, RESPONSES) == preferred_first_token(prompts).unsqueeze(1)
    later_valid = valid[:, :, 1:]  # (P, 10^4, 3)
    pi = digit_distribution(log_pi).exp()
    return {
        'preference_rate': (pi * preferred).sum(dim=1),
        'fidelity': (pi * later_valid.double().mean(dim=2)).sum(dim=1),
        'gold_rate': (pi * (preferred & later_valid.all(dim=2))).sum(dim=1),
    }


# ---------------------------------------------------------------------------------------------
# Summaries: means over prompts, as plain floats.

def distribution_summary(log_pi, log_ref, rewards, prompts):
    """A response distribution against the reference: means over prompts of E[r], the KL split and
    the gold metrics, {name: float}."""
    per_prompt = {'reward': expected_reward(log_pi, rewards), **kl_split(log_pi, log_ref),
                  **gold_metrics(log_pi, prompts)}
    return {name: value.mean().item() for name, value in per_prompt.items()}


def optimal_frontier(log_ref, rewards, prompts, betas):
    """The optimum at each beta, from one reference table and one reward table: a list of
    {'beta', 'J_star', 'reward', 'kl_total', 'kl_first', 'kl_later', 'preference_rate',
    'fidelity', 'gold_rate'} (means over prompts), one per beta."""
    return [{'beta': beta, 'J_star': optimal_value(log_ref, rewards, beta).mean().item(),
             **distribution_summary(optimal_log_probs(log_ref, rewards, beta), log_ref, rewards, prompts)}
            for beta in betas]


def compare_to_optimum(log_pi, log_ref, rewards, prompts, beta):
    """A policy's table against the optimum at beta, all from precomputed (P, 10^4) tables.

    Returns means over prompts: J (the policy's objective), J_star, J_ref (= E_ref[r], the
    reference's objective: its KL is 0), gap_closed = (J - J_ref) / (J_star - J_ref) (1 at the
    optimum, 0 for the reference, negative if worse than the reference), the policy's reward, KL
    split and gold metrics, the same for pi* under 'optimal_*', and the policy's non_digit_mass.
    """
    J = objective(log_pi, log_ref, rewards, beta).mean().item()
    J_star = optimal_value(log_ref, rewards, beta).mean().item()
    J_ref = expected_reward(log_ref, rewards).mean().item()
    optimum = distribution_summary(optimal_log_probs(log_ref, rewards, beta), log_ref, rewards, prompts)
    return {'beta': beta, 'J': J, 'J_star': J_star, 'J_ref': J_ref,
            'gap_closed': (J - J_ref) / (J_star - J_ref),
            **distribution_summary(log_pi, log_ref, rewards, prompts),
            **{f'optimal_{name}': value for name, value in optimum.items()},
            'non_digit_mass': non_digit_mass(log_pi).mean().item()}


def evaluate_against_optimum(policy, reference, reward_model, beta, prompts):
    """A policy model against the exact optimum of its objective at beta on prompts (P, 4): see
    compare_to_optimum for the keys. For several policies or betas, compute the tables once
    (response_log_probs_exact, response_rewards_exact) and call compare_to_optimum or
    optimal_frontier directly."""
    return compare_to_optimum(response_log_probs_exact(policy.eval(), prompts),
                              response_log_probs_exact(reference.eval(), prompts),
                              response_rewards_exact(reward_model.eval(), prompts), prompts, beta)
