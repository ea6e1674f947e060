"""Exact measurements of a policy against the known language.

Wherever a quantity is an expectation over next tokens, it is computed from the policy's full
next-token distribution rather than from one sampled token (exact given the prefix, lower variance);
only the prefixes themselves are sampled, with a seeded generator.
"""
import torch
import torch.nn.functional as F

from toy_rlhf.language import (PROMPT_LENGTH, RESPONSE_LENGTH, VOCAB_SIZE, join,
                               next_token_distribution, preferred_first_token, sample_prompts,
                               sample_responses)
from toy_rlhf.policy import generate_responses, response_log_probs

EVALUATION_PROMPTS = 2000  # prompts of the sampled exact metrics: standard error ~0.1 points on a rate
PREFERENCE_TARGET = 0.99  # "learned the preference": the rate the samples-to-target counts are measured to


def true_distributions(sentences, aligned=False):
    """The language's next-token distribution at each response position of sentences (B, 9):
    (B, 4, vocab). aligned=True: the aligned language, whose first digit is always the preferred one."""
    distributions = [next_token_distribution(sentences[:, :PROMPT_LENGTH + 1 + step])
                     for step in range(RESPONSE_LENGTH)]
    if aligned:
        distributions[0] = F.one_hot(preferred_first_token(sentences), VOCAB_SIZE).float()
    return torch.stack(distributions, dim=1)


def kl_divergence(p, log_q):
    """KL(p || q) over the last dimension, in nats: p (..., V) probabilities, log_q (..., V) -> (...).
    Clamped at 0: a KL is never negative, and identical distributions should read 0, not -1e-10."""
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1).clamp_min(0.0)


def preferred_probability(log_probs, sentences):
    """The probability a policy puts on the preferred first digit: log_probs (B, 4, V) -> (B,)."""
    return log_probs[:, 0].exp().gather(1, preferred_first_token(sentences).unsqueeze(1)).squeeze(1)


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
    return kl_divergence(true_distributions(sentences), response_log_probs(model.eval(), sentences)).mean().item()


@torch.no_grad()
def gold_rate(policy, prompts, generator=None):
    """P(first digit preferred and every later digit valid) under the policy, per prompt (B,).

    Sequential estimate: force the first digit to the preferred one and draw each later digit from the
    policy restricted to the tokens the rule allows, multiplying the probability mass of the allowed
    set at each step. The product is an unbiased estimate of the probability that the unrestricted
    policy writes a gold response, with far less variance than counting gold samples.
    """
    sequences = join(prompts)
    mass = torch.ones(len(prompts))
    for step in range(RESPONSE_LENGTH):
        logits, _ = policy(sequences)
        probs = logits[:, -1].softmax(dim=-1)
        if step == 0:
            allowed = F.one_hot(preferred_first_token(prompts), VOCAB_SIZE).bool()
        else:
            allowed = next_token_distribution(sequences) > 0
        allowed_probs = probs * allowed
        mass = mass * allowed_probs.sum(dim=1)
        token = torch.multinomial(allowed_probs + 1e-30 * allowed, 1, generator=generator)
        sequences = torch.cat([sequences, token], dim=1)
    return mass


@torch.no_grad()
def evaluate_policy(policy, reference, n_prompts=EVALUATION_PROMPTS, seed=0):
    """The exact gold metrics of a policy, on n_prompts prompts drawn with `seed`.

    preference_rate  P(first digit == preferred)
    fidelity         share of digits 2-4 that obey the rule
    gold_rate        P(preferred first digit and all later digits valid)
    kl_to_reference  KL(policy || reference) of whole responses, nats (full next-token KL summed
                     along responses sampled from the policy: exact in expectation)
    kl_to_aligned    KL(aligned language || policy) of whole responses, nats (along aligned sentences)
    """
    policy, reference = policy.eval(), reference.eval()
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n_prompts, generator)
    sentences = generate_responses(policy, prompts, generator)
    log_probs = response_log_probs(policy, sentences)
    aligned = join(prompts, sample_responses(prompts, generator, first_token=preferred_first_token(prompts)))
    return {
        'preference_rate': preferred_probability(log_probs, sentences).mean().item(),
        'fidelity': rule_probability(log_probs, sentences)[:, 1:].mean().item(),
        'gold_rate': gold_rate(policy, prompts, generator).mean().item(),
        'kl_to_reference': kl_divergence(log_probs.exp(), response_log_probs(reference, sentences))
                           .sum(dim=1).mean().item(),
        'kl_to_aligned': kl_divergence(true_distributions(aligned, aligned=True),
                                       response_log_probs(policy, aligned)).sum(dim=1).mean().item(),
    }


def samples_to_preference(history, target=PREFERENCE_TARGET):
    """Rollout samples an online method drew until its rollout's exact preference rate first reached
    target (None if it never did)."""
    return next((row['samples'] for row in history if row['gold/preference_rate'] >= target), None)
