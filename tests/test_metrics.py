"""The exact metrics of the first-digit preference: checked on stand-in policies whose answers are
known by hand (the language itself and the aligned language), and the gold-rate estimator against
the exact gold rate, for it and another preference."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mingpt.model import GPT
from toy_rlhf.language import (PROMPT_LENGTH, SEQUENCE_LENGTH, VOCAB_SIZE, is_valid_output, join,
                               next_token_distribution, sample_prompts)
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.metrics import evaluate_policy, gold_rate, kl_divergence, language_kl
from toy_rlhf.optimal import gold_metrics
from toy_rlhf.policy import generate_responses, policy_config
from toy_rlhf.preferences import PREFERENCES, preferred_first_token

FIRST_DIGIT = PREFERENCES['first-digit']


# The probability an oracle gives a token the language forbids (log 0 is not a logit). With at most
# 10 such tokens, every exact metric below is off by at most ~1e-11 because of it.
FORBIDDEN = 1e-12


class LanguageOracle(torch.nn.Module):
    """A policy whose next-token distribution after prompt + SEP + k digits is exactly the language's
    (aligned=True: the first digit is always the preferred one). GPT's interface: model(idx) ->
    (logits, None), block_size, its cache protocol, and GPT's own generate, which only calls the model."""
    block_size = SEQUENCE_LENGTH - 1
    transformer = SimpleNamespace(h=(None,))  # generate gives the model a cache of one dict per block
    generate = GPT.generate

    def __init__(self, aligned=False):
        super().__init__()
        self.aligned = aligned

    def forward(self, idx, targets=None, cache=None):
        new = idx.size(1)
        if cache is not None:  # idx continues the tokens the cache has seen; the cache keeps them all
            idx = cache[0]['tokens'] = torch.cat([cache[0].get('tokens', idx[:, :0]), idx], dim=1)
        logits = torch.zeros(*idx.shape, VOCAB_SIZE)  # uniform before SEP, where nothing is asked
        for position in range(PROMPT_LENGTH, idx.size(1)):
            distribution = next_token_distribution(idx[:, :position + 1])
            if self.aligned and position == PROMPT_LENGTH:
                distribution = F.one_hot(preferred_first_token(idx), VOCAB_SIZE).float()
            logits[:, position] = distribution.clamp_min(FORBIDDEN).log()
        return logits[:, -new:], None


# The language's preference rate, by hand: the first digit increments one of the four prompt digits
# at random, and it is x4 + 1 when it increments x4 or another digit equal to x4 (each of the other
# three with probability 1/10): (1 + N) / 4 with N ~ Binomial(3, 0.1), mean 1.3 / 4 = 0.325,
# standard deviation over prompts sqrt(0.27) / 4 = 0.130.
LANGUAGE_PREFERENCE = 0.325
# KL between the language and the aligned language (either direction: one of them is one-hot on the
# first digit, and later digits are identical): E[log(4 / (1 + N))]
#   = 0.729 log 4 + 0.243 log 2 + 0.027 log(4/3) + 0.001 log 1 = 1.1868 nats, sd over prompts 0.334.
ALIGNMENT_KL = 0.729 * math.log(4) + 0.243 * math.log(2) + 0.027 * math.log(4 / 3)
PROMPTS = 2000
# Both are averages over 2000 sampled prompts of exact per-prompt values: 5 standard errors are
# 5 * 0.130 / sqrt(2000) = 0.015 and 5 * 0.334 / sqrt(2000) = 0.037.
PREFERENCE_TOLERANCE = 0.015
ALIGNMENT_KL_TOLERANCE = 0.04


@pytest.fixture(scope='module')
def language():
    return LanguageOracle()


@pytest.fixture(scope='module')
def aligned():
    return LanguageOracle(aligned=True)


@pytest.fixture(scope='module')
def language_metrics(language):
    return evaluate_policy(language, language, PROMPTS, seed=0, preference=FIRST_DIGIT)


@pytest.fixture(scope='module')
def aligned_metrics(aligned, language):
    return evaluate_policy(aligned, language, PROMPTS, seed=0, preference=FIRST_DIGIT)


# --- the language itself --------------------------------------------------------------------------

def test_the_oracle_samples_only_sentences_of_the_language(language):
    prompts = sample_prompts(500, torch.Generator().manual_seed(1))
    sentences = generate_responses(language, prompts, torch.Generator().manual_seed(2))
    assert torch.all(is_valid_output(prompts, sentences[:, PROMPT_LENGTH + 1:]))


def test_the_language_obeys_its_rule_everywhere(language_metrics):
    assert language_metrics['fidelity'] > 1 - 1e-6


def test_the_language_prefers_the_preferred_digit_at_the_hand_computed_rate(language_metrics):
    assert abs(language_metrics['preference_rate'] - LANGUAGE_PREFERENCE) < PREFERENCE_TOLERANCE


def test_for_the_language_the_gold_rate_is_the_preference_rate(language_metrics):
    # Later digits are always valid, so gold = preferred first digit, on the same prompts.
    assert math.isclose(language_metrics['gold_rate'], language_metrics['preference_rate'], rel_tol=1e-5)


def test_a_policy_has_no_kl_to_itself(language_metrics):
    assert abs(language_metrics['kl_to_reference']) < 1e-6


def test_the_language_is_the_hand_computed_kl_away_from_the_aligned_language(language_metrics):
    assert abs(language_metrics['kl_to_aligned'] - ALIGNMENT_KL) < ALIGNMENT_KL_TOLERANCE


def test_the_language_oracle_has_no_kl_to_the_true_language(language):
    assert abs(language_kl(language, n=2000)) < 1e-6


# --- the aligned language -------------------------------------------------------------------------

def test_the_aligned_language_always_writes_gold_responses(aligned_metrics):
    assert aligned_metrics['preference_rate'] > 1 - 1e-6
    assert aligned_metrics['gold_rate'] > 1 - 1e-6
    assert aligned_metrics['fidelity'] > 1 - 1e-6


def test_the_aligned_language_has_no_kl_to_itself_and_the_hand_computed_kl_to_the_language(aligned_metrics):
    assert abs(aligned_metrics['kl_to_aligned']) < 1e-6
    assert abs(aligned_metrics['kl_to_reference'] - ALIGNMENT_KL) < ALIGNMENT_KL_TOLERANCE


# --- the gold-rate estimator ----------------------------------------------------------------------

def small_random_policy():
    """A one-layer, one-head GPT of width 8, untrained: (almost) uniform over the 11 tokens."""
    torch.manual_seed(0)
    config = policy_config(model_type=None)
    config.n_layer, config.n_head, config.n_embd = 1, 1, 8
    return GPT(config).eval()


@pytest.mark.parametrize('name, preference', [
    # Near-uniform: the gold rate is ~1/11 * (3.4/11)^3 ~ 0.0027 and a third of the mass is on
    # responses holding SEP, so an estimator that dropped one step's mass (~0.3) would be off by a
    # factor of 3, or one that conditioned on four digits by a factor of 1.5.
    ('random', 'first-digit'),
    # The short SFT policy: gold rate ~0.27; dropping the later digits' mass (fidelity ~0.95, cubed)
    # would add ~0.04, against a standard error of ~0.003 per prompt here.
    ('sft', 'first-digit'),
    # A preference on all four digits: each digit's allowed set depends on the digits before it.
    ('sft', 'distinct'),
])
def test_the_sequential_gold_rate_is_unbiased_for_the_exact_gold_rate(name, preference, request):
    policy = small_random_policy() if name == 'random' else request.getfixturevalue('sft_policy')
    preference, draws = PREFERENCES[preference], 400
    prompts = sample_prompts(8, torch.Generator().manual_seed(3))
    # Exact, over all 10^4 responses: gold_metrics conditions on four digits, the sequential estimate
    # does not, so the mass of digit responses is multiplied back.
    log_pi = all_response_log_probs(policy, prompts)
    exact = gold_metrics(log_pi, prompts, preference)['gold_rate'] * log_pi.logsumexp(dim=1).exp()
    sequential = gold_rate(policy, preference, prompts.repeat_interleave(draws, dim=0),
                           torch.Generator().manual_seed(5)).double().view(len(prompts), draws)
    # Per prompt, 5 standard errors of the mean of 400 draws: an unbiased estimator fails one of the
    # 24 checks (3 cases x 8 prompts) with probability < 24 * 6e-7.
    standard_error = sequential.std(dim=1) / math.sqrt(draws)
    assert torch.all((sequential.mean(dim=1) - exact).abs() < 5 * standard_error + 1e-12), (sequential.mean(dim=1), exact)


def test_the_sequential_gold_rate_has_less_variance_than_counting(sft_policy):
    prompts = sample_prompts(2000, torch.Generator().manual_seed(6))
    sequential = gold_rate(sft_policy, FIRST_DIGIT, prompts, torch.Generator().manual_seed(7))
    rate = sequential.mean().item()
    assert sequential.var().item() < rate * (1 - rate)  # the variance of one counted sample


def test_for_first_digit_the_gold_rate_forces_the_preferred_digit_then_follows_the_rule(sft_policy):
    # The notebook's estimator, which the generic one must reproduce to the last bit: the preferred
    # first digit, then each digit from the policy restricted to the digits the rule allows.
    prompts = sample_prompts(500, torch.Generator().manual_seed(8))
    generator, sequences, mass = torch.Generator().manual_seed(9), join(prompts), torch.ones(500)
    with torch.no_grad():
        for step in range(4):
            probs = sft_policy(sequences)[0][:, -1].softmax(dim=-1)
            allowed = (F.one_hot(preferred_first_token(prompts), VOCAB_SIZE).bool() if step == 0
                       else next_token_distribution(sequences) > 0)
            mass = mass * (probs * allowed).sum(dim=1)
            token = torch.multinomial(probs * allowed + 1e-30 * allowed, 1, generator=generator)
            sequences = torch.cat([sequences, token], dim=1)
    assert torch.equal(gold_rate(sft_policy, FIRST_DIGIT, prompts, torch.Generator().manual_seed(9)), mass)


# --- KL -------------------------------------------------------------------------------------------

def test_kl_divergence_matches_hand_values():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    # 0.5 log(0.5 / 0.25) + 0.5 log(0.5 / 0.75) = 0.5 log(4 / 3) = 0.1438
    assert math.isclose(kl_divergence(p, q.log()).item(), 0.5 * math.log(4 / 3), rel_tol=1e-6)
    # A zero in p contributes nothing (0 log 0 = 0): KL((1, 0, 0) || (1/2, 1/4, 1/4)) = log 2.
    one_hot, q = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, 0.25, 0.25])
    assert math.isclose(kl_divergence(one_hot, q.log()).item(), math.log(2), rel_tol=1e-6)
    assert kl_divergence(p, p.log()).item() == 0.0


def test_kl_divergence_reduces_only_the_last_dimension():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).expand(3, 2, 2)
    log_q = torch.tensor([0.25, 0.75]).log().expand(3, 2, 2)
    expected = torch.tensor([0.5 * math.log(4 / 3), math.log(4)]).expand(3, 2)
    assert torch.allclose(kl_divergence(p, log_q), expected)
