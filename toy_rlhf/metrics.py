"""Exact measurements of a policy against the known language.

Wherever a quantity is an expectation over next tokens, it is computed from the policy's full
next-token distribution rather than from one sampled token (exact given the prefix, lower variance);
only the prefixes themselves are sampled, with a seeded generator.
"""
import torch
import torch.nn.functional as F

from toy_rlhf.language import (PROMPT_LENGTH, RESPONSE_LENGTH, VOCAB_SIZE, is_valid_output, join,
                               next_token_distribution, preferred_first_token, sample_prompts,
                               sample_responses)
from toy_rlhf.policy import generate_responses, response_log_probs
from toy_rlhf.preferences import DEFAULT_PREFERENCE, PREFERENCES, aligned_paths, reaches_best, sample_aligned

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


def best_level_rate(preference, log_probs, sentences):
    """Per sentence (B, 9), whether the policy reaches the best gold level the language reaches for the
    prompt: for a first-digit preference, the exact probability of the preferred first digit given the
    prompt (from log_probs (B, 4, V)); otherwise the indicator of the sampled response. (B,)"""
    if preference.first_token is not None:
        return log_probs[:, 0].exp().gather(1, preference.first_token(sentences).unsqueeze(1)).squeeze(1)
    return reaches_best(preference, sentences[:, :PROMPT_LENGTH], sentences[:, PROMPT_LENGTH + 1:]).float()


def aligned_next_tokens(preference, prompts, responses):
    """The aligned language's exact next-token distribution at each response position of prompt +
    response (B, 4) each -> (B, 4, vocab), by enumerating the language's 256 paths per prompt. The
    aligned language is the language conditioned on the best gold level reachable for the prompt; a
    row is all zeros where no aligned path writes that prefix."""
    paths, aligned = aligned_paths(preference, prompts)  # (B, 256, 4), (B, 256)
    distributions = []
    for step in range(RESPONSE_LENGTH):
        # The aligned paths that wrote this response's first `step` digits, and their next digit.
        same_prefix = aligned & (paths[:, :, :step] == responses[:, None, :step]).all(dim=2)  # (B, 256)
        counts = (F.one_hot(paths[:, :, step], VOCAB_SIZE).float() * same_prefix.unsqueeze(2)).sum(dim=1)
        distributions.append(counts / counts.sum(dim=1, keepdim=True).clamp_min(1))
    return torch.stack(distributions, dim=1)


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
def evaluate_policy(policy, reference, n_prompts=EVALUATION_PROMPTS, seed=0,
                    preference=PREFERENCES[DEFAULT_PREFERENCE]):
    """The exact gold metrics of a policy, on n_prompts prompts drawn with `seed`.

    preference_rate  P(gold reward >= the best level the language reaches for the prompt); for
                     first-digit, P(first digit == preferred)
    gold_reward      E[gold reward] (0 to 1 for the built-ins)
    fidelity         share of digits 2-4 that obey the rule
    gold_rate        P(best level and all digits valid)
    kl_to_reference  KL(policy || reference) of whole responses, nats (full next-token KL summed
                     along responses sampled from the policy: exact in expectation)
    kl_to_reference_by_position  its four terms, one per response position
    kl_to_aligned    KL(aligned language || policy) of whole responses, nats (along aligned sentences;
                     the aligned language is the language conditioned on the best reachable level)

    A first-digit preference keeps the notebook's lower-variance estimators (exact given the prompt).
    """
    policy, reference = policy.eval(), reference.eval()
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n_prompts, generator)
    sentences = generate_responses(policy, prompts, generator)
    log_probs = response_log_probs(policy, sentences)
    if preference.first_token is not None:
        aligned = join(prompts, sample_responses(prompts, generator, first_token=preference.first_token(prompts)))
        aligned_targets = true_distributions(aligned, aligned=True)
        gold = gold_rate(policy, prompts, generator)
    else:
        aligned_responses = sample_aligned(preference, prompts, generator)
        aligned = join(prompts, aligned_responses)
        aligned_targets = aligned_next_tokens(preference, prompts, aligned_responses)
        responses = sentences[:, PROMPT_LENGTH + 1:]
        gold = reaches_best(preference, prompts, responses) & is_valid_output(prompts, responses).all(dim=1)
    kl_to_reference = kl_divergence(log_probs.exp(), response_log_probs(reference, sentences))  # (B, 4)
    return {
        'preference_rate': best_level_rate(preference, log_probs, sentences).mean().item(),
        'gold_reward': preference.reward(prompts, sentences[:, PROMPT_LENGTH + 1:]).mean().item(),
        'fidelity': rule_probability(log_probs, sentences)[:, 1:].mean().item(),
        'gold_rate': gold.float().mean().item(),
        'kl_to_reference': kl_to_reference.sum(dim=1).mean().item(),
        'kl_to_reference_by_position': kl_to_reference.mean(dim=0).tolist(),
        'kl_to_aligned': kl_divergence(aligned_targets, response_log_probs(policy, aligned)).sum(dim=1).mean().item(),
    }


def samples_to_preference(history, target=PREFERENCE_TARGET):
    """Rollout samples an online method drew until its rollout's exact preference rate first reached
    target (None if it never did)."""
    return next((row['samples'] for row in history if row['gold/preference_rate'] >= target), None)
