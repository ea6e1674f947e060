"""The digit language: its exact distributions, its sampler, its validity check and its data."""
import math

import pytest
import torch

from toy_rlhf.data import SupervisedDataset, supervised_batch
from toy_rlhf.language import (CLS, SEP, VOCAB_SIZE, entropy_floor, is_valid_output, join,
                               next_token_distribution, sample_prompts, sample_responses, with_each_first_digit)

# The tensors here are small: a second thread only adds overhead, and on a shared machine whose other
# core is busy it makes every step wait for it (tens of times slower).

# The module docstring's example sentence: 5 7 1 5 | 6 2 7 3.
EXAMPLE_PROMPT = torch.tensor([[5, 7, 1, 5]])
EXAMPLE_RESPONSE = torch.tensor([[6, 2, 7, 3]])


def generator(seed):
    return torch.Generator().manual_seed(seed)


def distribution(probabilities):
    """A (1, VOCAB_SIZE) distribution from {token: probability}."""
    d = torch.zeros(1, VOCAB_SIZE)
    for token, p in probabilities.items():
        d[0, token] = p
    return d


def random_sentences(n, seed):
    prompts = sample_prompts(n, generator(seed))
    return prompts, sample_responses(prompts, generator(seed + 1))


# --- exact distributions --------------------------------------------------------------------------

def test_after_the_separator_each_prompt_digit_is_incremented_with_probability_one_quarter():
    # Window 5 7 1 5 -> increments 6 8 2 6: 6 twice.
    expected = distribution({6: 0.5, 8: 0.25, 2: 0.25})
    assert torch.equal(next_token_distribution(join(EXAMPLE_PROMPT)), expected)


def test_the_window_slides_over_the_response_skipping_the_separator():
    # After 5 7 1 5 SEP 6 the window is 7 1 5 6 -> increments 8 2 6 7.
    prefix = torch.tensor([[5, 7, 1, 5, SEP, 6]])
    expected = distribution({8: 0.25, 2: 0.25, 6: 0.25, 7: 0.25})
    assert torch.equal(next_token_distribution(prefix), expected)


def test_nine_wraps_around_to_zero_and_a_repeated_digit_takes_all_the_mass():
    assert torch.equal(next_token_distribution(torch.tensor([[9, 9, 9, 9, SEP]])),
                       distribution({0: 1.0}))
    # Window 9 9 0 3 (after 9 9 9 9 SEP 0 3): 0 0 1 4.
    assert torch.equal(next_token_distribution(torch.tensor([[9, 9, 9, 9, SEP, 0, 3]])),
                       distribution({0: 0.5, 1: 0.25, 4: 0.25}))


@pytest.mark.parametrize('length', [5, 6, 7, 8])
def test_every_exact_distribution_sums_to_one_in_quarters_and_never_gives_the_separator(length):
    prompts, responses = random_sentences(500, seed=length)
    d = next_token_distribution(join(prompts, responses)[:, :length])
    assert d.shape == (500, VOCAB_SIZE)
    assert torch.allclose(d.sum(dim=1), torch.ones(500))
    assert torch.equal(d * 4, (d * 4).round())
    assert torch.all(d[:, SEP] == 0)


@pytest.mark.parametrize('length', [4, 9])
def test_a_prefix_that_is_not_prompt_separator_and_zero_to_three_digits_is_rejected(length):
    with pytest.raises(ValueError, match=str(length)):
        next_token_distribution(torch.zeros(1, length, dtype=torch.long))


# --- the sampler ----------------------------------------------------------------------------------

def exact_response_probabilities(prompt):
    """{response (4 digits) as a number: probability} for one prompt (1, 4), by enumerating the tree
    of next_token_distribution (which the hand-worked tests above pin down)."""
    leaves = [(join(prompt), 1.0)]
    for _ in range(4):
        grown = []
        for prefix, p in leaves:
            d = next_token_distribution(prefix)[0]
            for token in torch.nonzero(d).flatten().tolist():
                grown.append((torch.cat([prefix, torch.tensor([[token]])], dim=1), p * d[token].item()))
        leaves = grown
    return {int(''.join(map(str, prefix[0, 5:].tolist()))): p for prefix, p in leaves}


def chi_square_p_value(statistic, degrees_of_freedom):
    """P(chi2(df) >= statistic), the upper regularized incomplete gamma function."""
    return torch.special.gammaincc(torch.tensor(degrees_of_freedom / 2, dtype=torch.float64),
                                   torch.tensor(statistic / 2, dtype=torch.float64)).item()


@pytest.mark.parametrize('prompt', [[5, 7, 1, 5], [0, 3, 3, 8]])
def test_sampled_responses_follow_the_exact_distribution_of_whole_responses(prompt):
    prompt = torch.tensor([prompt])
    exact = exact_response_probabilities(prompt)
    assert math.isclose(sum(exact.values()), 1.0)
    n = 40_000
    responses = sample_responses(prompt.repeat(n, 1), generator(0))
    codes = (responses * torch.tensor([1000, 100, 10, 1])).sum(dim=1)
    counts = torch.bincount(codes, minlength=10_000).double()
    support = torch.tensor(sorted(exact))
    assert counts.sum() == counts[support].sum()  # nothing outside the language
    expected = n * torch.tensor([exact[c] for c in sorted(exact)], dtype=torch.float64)
    statistic = ((counts[support] - expected) ** 2 / expected).sum().item()
    # At most 4^4 = 256 responses, each with probability >= 1/256, so every expected count is
    # >= 40000 / 256 ~ 156 >> 5 and the chi-square approximation holds: a correct sampler gives a
    # p-value below 1e-4 with probability 1e-4.
    assert chi_square_p_value(statistic, len(exact) - 1) > 1e-4


def test_each_sampled_digit_follows_the_exact_distribution_given_its_prefix():
    n = 40_000
    prompts, responses = random_sentences(n, seed=7)
    sentences = join(prompts, responses)
    for step in range(4):
        d = next_token_distribution(sentences[:, :5 + step]).double()  # (n, vocab)
        observed = torch.nn.functional.one_hot(responses[:, step], VOCAB_SIZE).double()
        # For each token v, sum_i (1[y_i = v] - p_i(v)) is a sum of n independent zero-mean terms
        # of variance p_i(v)(1 - p_i(v)); by the CLT it is within 5 standard deviations except with
        # probability 5.7e-7, so all 4 * 11 checks pass together except with probability < 3e-5.
        deviation = (observed - d).sum(dim=0)
        standard_deviation = (d * (1 - d)).sum(dim=0).sqrt()
        assert torch.all(deviation.abs() <= 5 * standard_deviation)


def test_a_forced_first_digit_is_kept_and_the_later_digits_still_follow_the_rule():
    prompts = sample_prompts(2000, generator(3))
    forced = torch.randint(10, (2000,), generator=generator(4))  # often not one the rule allows
    responses = sample_responses(prompts, generator(5), first_digit=forced)
    assert torch.equal(responses[:, 0], forced)
    assert torch.all(is_valid_output(prompts, responses)[:, 1:])
    assert not torch.all(is_valid_output(prompts, responses)[:, 0])


def test_each_first_digit_in_turn_keeps_the_later_digits():
    variants = with_each_first_digit(torch.tensor([[6, 2, 7, 3], [1, 1, 1, 1]]))
    assert variants.shape == (20, 4)
    assert variants[:, 0].tolist() == list(range(10)) * 2
    assert torch.all(variants[:10, 1:] == torch.tensor([2, 7, 3])) and torch.all(variants[10:, 1:] == 1)


# --- validity -------------------------------------------------------------------------------------

def test_language_samples_are_valid_at_every_position():
    prompts, responses = random_sentences(5000, seed=11)
    assert torch.all(is_valid_output(prompts, responses))
    assert torch.all(is_valid_output(EXAMPLE_PROMPT, EXAMPLE_RESPONSE))


@pytest.mark.parametrize('response, expected', [
    # y1 6 -> 9: invalid (5 7 1 5 allows 6 8 2); y2 2 still valid (7 1 5 9 allows 8 2 6 0);
    # y3 7 now invalid (1 5 9 2 allows 2 6 0 3); y4 3 valid (5 9 2 7 allows 6 0 3 8).
    ([9, 2, 7, 3], [False, True, False, True]),
    # y2 2 -> 0: invalid (7 1 5 6 allows 8 2 6 7); y3 7 valid (1 5 6 0 allows 2 6 7 1);
    # y4 3 now invalid (5 6 0 7 allows 6 7 1 8).
    ([6, 0, 7, 3], [True, False, True, False]),
])
def test_later_digits_are_judged_against_the_tokens_actually_written(response, expected):
    valid = is_valid_output(EXAMPLE_PROMPT, torch.tensor([response]))
    assert valid.tolist() == [expected]


def test_one_corrupted_digit_makes_its_own_position_invalid_and_not_the_earlier_ones():
    n = 1000
    prompts, responses = random_sentences(n, seed=13)
    position = torch.randint(4, (n,), generator=generator(14))
    sentences = join(prompts, responses)
    corrupted = responses.clone()
    for i in range(n):
        t = position[i].item()
        allowed = next_token_distribution(sentences[i:i + 1, :5 + t])[0] > 0
        disallowed = torch.nonzero(~allowed[:10]).flatten()  # at most 4 digits are allowed
        corrupted[i, t] = disallowed[i % len(disallowed)]
    valid = is_valid_output(prompts, corrupted)
    steps = torch.arange(4)
    assert torch.all(valid[steps < position.unsqueeze(1)])
    assert not torch.any(valid[steps == position.unsqueeze(1)])
    # Corrupting the last digit leaves nothing later to disturb: exactly that position is invalid.
    last = position == 3
    assert last.sum() > 100
    assert torch.all(valid[last, :3]) and not torch.any(valid[last, 3])


@pytest.mark.parametrize('token', [SEP, CLS])
@pytest.mark.parametrize('position', [0, 2, 3])
def test_a_separator_or_cls_in_the_response_is_invalid(token, position):
    prompts, responses = random_sentences(50, seed=17)
    responses[:, position] = token
    valid = is_valid_output(prompts, responses)
    assert not torch.any(valid[:, position])
    assert torch.all(valid[:, :position])


# --- the entropy floor ----------------------------------------------------------------------------

def entropies(d):
    return -torch.special.xlogy(d, d).sum(dim=-1)


def test_entropy_floor_lies_between_zero_and_log_four():
    assert 0 < entropy_floor() < math.log(4)


def test_the_first_digits_mean_entropy_matches_a_hand_count_of_prompt_windows():
    # Of the 10^4 prompts, 5040 have four distinct digits (entropy log 4), 4320 exactly one pair
    # (1/2, 1/4, 1/4: 1.5 log 2), 270 two pairs (log 2), 360 a triple (3/4, 1/4), 10 four equal (0).
    triple = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    by_hand = (5040 * math.log(4) + 4320 * 1.5 * math.log(2) + 270 * math.log(2)
               + 360 * triple) / 10_000
    all_prompts = torch.cartesian_prod(*[torch.arange(10)] * 4)
    exact = entropies(next_token_distribution(join(all_prompts)).double()).mean().item()
    assert math.isclose(exact, by_hand, rel_tol=1e-12)


def test_entropy_floor_agrees_with_a_monte_carlo_estimate_over_sampled_sentences():
    n = 100_000
    prompts, responses = random_sentences(n, seed=19)
    sentences = join(prompts, responses)
    per_sentence = torch.stack([entropies(next_token_distribution(sentences[:, :5 + step]).double())
                                for step in range(4)], dim=1).mean(dim=1)  # (n,)
    estimate = per_sentence.mean().item()
    standard_error = per_sentence.std().item() / math.sqrt(n)  # ~5e-4 for n = 1e5
    # 5 standard errors: a correct floor fails this with probability ~6e-7. A floor that forgot the
    # window slides (the first digit's entropy for all four: 1.187) would be off by ~30 errors.
    assert abs(entropy_floor() - estimate) < 5 * standard_error


# --- supervised data ------------------------------------------------------------------------------

def test_a_supervised_example_is_a_sentence_shifted_by_one_with_the_prompt_targets_masked():
    x, y = supervised_batch(500, generator(23))
    assert x.shape == y.shape == (500, 8)
    prompts, responses = x[:, :4], torch.cat([x[:, 5:], y[:, 7:]], dim=1)
    assert torch.all((prompts >= 0) & (prompts < 10))
    assert torch.all(x[:, 4] == SEP)
    assert torch.all(y[:, :4] == -1)
    assert torch.equal(y[:, 4:7], x[:, 5:8])  # y1 y2 y3 are also inputs
    assert torch.equal(y[:, 4:], responses)
    assert torch.all(is_valid_output(prompts, responses))


def test_supervised_data_repeats_with_the_same_seed_and_changes_with_another():
    x1, y1 = supervised_batch(100, generator(29))
    x2, y2 = supervised_batch(100, generator(29))
    x3, _ = supervised_batch(100, generator(30))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_supervised_dataset_items_are_supervised_examples_fixed_by_the_seed():
    dataset = SupervisedDataset(64, seed=3)
    again = SupervisedDataset(64, seed=3)
    other = SupervisedDataset(64, seed=4)
    assert len(dataset) == 64
    x, y = dataset[10]
    assert x.shape == y.shape == (8,)
    assert x[4] == SEP and torch.all(y[:4] == -1) and torch.equal(y[4:7], x[5:])
    assert all(torch.equal(dataset[i][0], again[i][0]) and torch.equal(dataset[i][1], again[i][1])
               for i in range(64))
    assert not all(torch.equal(dataset[i][0], other[i][0]) for i in range(64))
