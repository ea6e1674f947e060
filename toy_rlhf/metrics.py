"""Exact measurements of a policy against the known language.

Wherever a quantity is an expectation over next tokens, it is computed from the policy's full
next-token distribution rather than from one sampled token (exact given the prefix, lower variance);
only the prefixes themselves are sampled, with a seeded generator.
"""
import torch

from toy_rlhf.language import (PROMPT_LENGTH, RESPONSE_LENGTH, VOCAB_SIZE, join, next_token_distribution,
                               sample_prompts, sample_responses)
from toy_rlhf.policy import generate_responses, next_token_log_probs
from toy_rlhf.preferences import aligned_paths

EVALUATION_PROMPTS = 2000  # prompts of the sampled exact metrics: standard error ~0.1 points on a rate
PREFERENCE_TARGET = 0.99  # "learned the preference": the rate the samples-to-target counts are measured to


def true_distributions(sentences):
    """The language's next-token distribution at each response position of sentences (B, 9):
    (B, 4, vocab)."""
    return torch.stack([next_token_distribution(sentences[:, :PROMPT_LENGTH + 1 + step])
                        for step in range(RESPONSE_LENGTH)], dim=1)


def kl_divergence(p, log_q):
    """KL(p || q) over the last dimension, in nats: p (..., V) probabilities, log_q (..., V) -> (...).
    Clamped at 0: a KL is never negative, and identical distributions should read 0, not -1e-10."""
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1).clamp_min(0.0)


def aligned_next_tokens(preference, prompts, responses):
    """The aligned language's exact next-token distribution at each response position of prompt +
    response (B, 4) each -> (B, 4, vocab), by enumerating the language's 256 paths per prompt. The
    aligned language is the language conditioned on the best gold level reachable for the prompt; a
    row is all zeros where no aligned path writes that prefix."""
    paths, aligned = aligned_paths(preference, prompts)  # (B, 256, 4), (B, 256)
    distributions = []
    for step in range(RESPONSE_LENGTH):
        counts = aligned_continuations(paths, aligned, responses[:, :step])
        distributions.append(counts / counts.sum(dim=1, keepdim=True).clamp_min(1))
    return torch.stack(distributions, dim=1)


def aligned_continuations(paths, aligned, prefixes):
    """How many aligned paths continue each prefix with each token: paths (B, 256, 4) and aligned
    (B, 256) bool (preferences.aligned_paths), prefixes (B, k) of k < 4 response digits -> (B, vocab)."""
    step = prefixes.size(1)
    same_prefix = aligned & (paths[:, :, :step] == prefixes[:, None, :]).all(dim=2)  # (B, 256)
    return torch.zeros(len(paths), VOCAB_SIZE).scatter_add_(1, paths[:, :, step], same_prefix.float())


def rule_probability(log_probs, sentences):
    """The probability a policy puts on tokens the rule allows at each response position: (B, 4)."""
    allowed = true_distributions(sentences) > 0
    return (log_probs.exp() * allowed).sum(dim=-1)


@torch.no_grad()
def language_kl(model, n=4096, seed=0):
    """Mean over output positions of KL(true language || model), in nats, by teacher forcing on n
    language sentences drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n, generator)
    sentences = join(prompts, sample_responses(prompts, generator))
    return kl_divergence(true_distributions(sentences), next_token_log_probs(model.eval(), sentences)).mean().item()


@torch.no_grad()
def gold_rate(policy, preference, prompts, generator=None):
    """P(a gold response) under the policy, per prompt (B, 4) -> (B,): a response of the best gold
    level the language reaches for the prompt with every digit valid, that is, one the aligned
    language writes (first-digit: the preferred first digit, then digits the rule allows).

    Sequential estimate: draw each digit from the policy restricted to the digits the aligned
    language can write after the digits so far, multiplying the probability mass of that set at each
    step. The product is an unbiased estimate of the probability that the unrestricted policy writes
    a gold response, with far less variance than counting gold samples.
    """
    paths, aligned = aligned_paths(preference, prompts)  # (B, 256, 4), (B, 256)
    sequences = join(prompts)
    mass = torch.ones(len(prompts))
    for _ in range(RESPONSE_LENGTH):
        probs = policy(sequences)[0][:, -1].softmax(dim=-1)
        allowed = aligned_continuations(paths, aligned, sequences[:, PROMPT_LENGTH + 1:]) > 0
        allowed_probs = probs * allowed
        mass = mass * allowed_probs.sum(dim=1)
        token = torch.multinomial(allowed_probs + 1e-30 * allowed, 1, generator=generator)
        sequences = torch.cat([sequences, token], dim=1)
    return mass


@torch.no_grad()
def evaluate_policy(policy, reference, n_prompts, seed, preference):
    """The exact gold metrics of a policy for `preference`, on n_prompts prompts drawn with `seed`.

    preference_rate  P(gold reward >= the best level the language reaches for the prompt); for
                     first-digit, P(first digit == preferred), exact given the prompt
    gold_reward      E[gold reward] (0 to 1 for the built-ins)
    fidelity         share of digits 2-4 that obey the rule
    gold_rate        P(best level and all digits valid) (gold_rate's sequential estimate)
    kl_to_reference  KL(policy || reference) of whole responses, nats (full next-token KL summed
                     along responses sampled from the policy: exact in expectation)
    kl_to_reference_by_position  its four terms, one per response position
    kl_to_aligned    KL(aligned language || policy) of whole responses, nats (along aligned sentences;
                     the aligned language is the language conditioned on the best reachable level)
    """
    policy, reference = policy.eval(), reference.eval()
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n_prompts, generator)
    sentences = generate_responses(policy, prompts, generator)
    log_probs = next_token_log_probs(policy, sentences)
    aligned_responses = preference.sample_aligned(prompts, generator)
    aligned = join(prompts, aligned_responses)
    aligned_targets = aligned_next_tokens(preference, prompts, aligned_responses)
    gold = gold_rate(policy, preference, prompts, generator)
    kl_to_reference = kl_divergence(log_probs.exp(), next_token_log_probs(reference, sentences))  # (B, 4)
    return {
        'preference_rate': preference.best_level_rate(log_probs, sentences).mean().item(),
        'gold_reward': preference.reward(prompts, sentences[:, PROMPT_LENGTH + 1:]).mean().item(),
        'fidelity': rule_probability(log_probs, sentences)[:, 1:].mean().item(),
        'gold_rate': gold.mean().item(),
        'kl_to_reference': kl_to_reference.sum(dim=1).mean().item(),
        'kl_to_reference_by_position': kl_to_reference.mean(dim=0).tolist(),
        'kl_to_aligned': kl_divergence(aligned_targets, next_token_log_probs(policy, aligned)).sum(dim=1).mean().item(),
    }


def samples_to_preference(history, target=PREFERENCE_TARGET):
    """Rollout samples an online method drew until its rollout's exact preference rate first reached
    target (None if it never did)."""
    return next((row['samples'] for row in history if row['gold/preference_rate'] >= target), None)
