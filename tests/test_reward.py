"""The reward model's data and loss: the labeler, the preference pairs, the Bradley-Terry loss, and
what a short training run learns (the model comes from tests/conftest.py)."""
import math

import pytest
import torch

from toy_rlhf.data import PreferenceDataset, labeler
from toy_rlhf.language import CLS, SEP, VOCAB_SIZE, is_valid_output, sample_prompts, sample_responses
from toy_rlhf.preferences import PREFERENCES, preferred_first_token
from toy_rlhf.reward import RewardConfig, bradley_terry_loss, initial_reward_model, pairwise_accuracy, \
    rank_rate, train_reward

FIRST_DIGIT = PREFERENCES['first-digit']  # the labeler and the pairs of these tests


def generator(seed):
    return torch.Generator().manual_seed(seed)


# --- the Bradley-Terry loss -----------------------------------------------------------------------

def test_the_loss_of_a_pair_scored_two_to_zero_is_log_of_one_plus_e_to_the_minus_two():
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    assert math.isclose(loss.item(), math.log(1 + math.exp(-2)), rel_tol=1e-6)  # 0.1269


def test_equal_scores_cost_log_two_whatever_their_value():
    loss = bradley_terry_loss(torch.tensor([0.0, 5.0, -3.0]), torch.tensor([0.0, 5.0, -3.0]))
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


def test_the_loss_is_the_mean_over_the_batch():
    # Pairs: (2, 0) -> log(1 + e^-2), (1, 1) -> log 2, (0, 3) -> log(1 + e^3).
    loss = bradley_terry_loss(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 3.0]))
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(3))) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


# --- the labeler ----------------------------------------------------------------------------------

N = 20_000


def preferred_and_other(n, seed):
    """Prompts, responses starting with the preferred digit, and the same responses with another
    first digit (the labeler looks only at the first digit)."""
    prompts = sample_prompts(n, generator(seed))
    preferred = preferred_first_token(prompts)
    good = sample_responses(prompts, generator(seed + 1), first_digit=preferred)
    bad = good.clone()
    bad[:, 0] = (preferred + 1 + torch.randint(9, (n,), generator=generator(seed + 2))) % 10
    return prompts, good, bad


def within_binomial_bound(chosen, p):
    """Whether the share of True in `chosen` is within 5 standard deviations of p: a correct labeler
    fails this with probability 5.7e-7."""
    n = len(chosen)
    return abs(chosen.float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_with_a_huge_margin_the_labeler_always_picks_the_preferred_first_digit():
    prompts, good, bad = preferred_and_other(N, seed=0)
    assert torch.all(labeler(prompts, good, bad, 1000.0, FIRST_DIGIT, generator(3)))
    assert not torch.any(labeler(prompts, bad, good, 1000.0, FIRST_DIGIT, generator(4)))


def test_with_margin_zero_the_labeler_picks_each_response_half_the_time():
    prompts, good, bad = preferred_and_other(N, seed=10)
    assert within_binomial_bound(labeler(prompts, good, bad, 0.0, FIRST_DIGIT, generator(13)), 0.5)


@pytest.mark.parametrize('margin', [0.5, 1.0, 3.0])
def test_with_margin_m_the_preferred_response_is_picked_with_probability_sigmoid_m(margin):
    prompts, good, bad = preferred_and_other(N, seed=20)
    p = 1 / (1 + math.exp(-margin))  # 0.62, 0.73, 0.95
    assert within_binomial_bound(labeler(prompts, good, bad, margin, FIRST_DIGIT, generator(23)), p)
    assert within_binomial_bound(labeler(prompts, bad, good, margin, FIRST_DIGIT, generator(24)), 1 - p)


def test_two_responses_with_the_same_gold_reward_are_a_coin_flip_whatever_the_margin():
    prompts, good, bad = preferred_and_other(N, seed=30)

    def later_digits_changed(responses):
        changed = responses.clone()
        changed[:, 1:] = (changed[:, 1:] + 1) % 10
        return changed

    for response, seed in ((good, 33), (bad, 34)):
        picks = labeler(prompts, response, later_digits_changed(response), 5.0, FIRST_DIGIT, generator(seed))
        assert within_binomial_bound(picks, 0.5)


# --- preference pairs -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def pairs():
    # Margin 20: a label is wrong with probability sigmoid(-20) = 2e-9 (in float32 sigmoid(20) is
    # exactly 1, so never). 20000 pairs: without the redraw about 20 prompts would have four equal
    # digits (probability 1e-3 each), so their absence below is not luck (P = 0.999^20000 = 2e-9).
    return PreferenceDataset(N, 20.0, 0, FIRST_DIGIT)


def parts(pairs):
    prompts = pairs.context[:, :4]
    return prompts, pairs.chosen[:, :4], pairs.rejected[:, :4]


def test_a_pair_is_one_context_of_prompt_and_separator_and_two_responses_ending_with_cls(pairs):
    assert len(pairs) == N
    context, chosen, rejected = pairs[7]
    assert context.shape == (5,) and chosen.shape == rejected.shape == (5,)
    assert torch.all(pairs.context[:, 4] == SEP)
    assert torch.all(pairs.chosen[:, 4] == CLS) and torch.all(pairs.rejected[:, 4] == CLS)
    accepted_sequences, rejected_sequences = pairs.sequences(slice(0, 10))
    assert torch.equal(accepted_sequences, torch.cat([pairs.context[:10], pairs.chosen[:10]], 1))
    assert torch.equal(rejected_sequences, torch.cat([pairs.context[:10], pairs.rejected[:10]], 1))


def test_both_responses_are_valid_sentences_of_the_language(pairs):
    prompts, chosen, rejected = parts(pairs)
    assert torch.all(is_valid_output(prompts, chosen))
    assert torch.all(is_valid_output(prompts, rejected))


def test_with_noiseless_labels_the_accepted_response_starts_with_the_preferred_digit(pairs):
    prompts, chosen, rejected = parts(pairs)
    preferred = preferred_first_token(prompts)
    assert torch.all(chosen[:, 0] == preferred)
    assert torch.all(rejected[:, 0] != preferred)


def test_prompts_with_four_equal_digits_are_never_drawn(pairs):
    prompts = pairs.context[:, :4]
    assert not torch.any((prompts == prompts[:, :1]).all(dim=1))


def test_with_margin_one_the_preferred_response_is_accepted_in_a_share_sigmoid_one_of_pairs():
    noisy = PreferenceDataset(N, 1.0, 1, FIRST_DIGIT)
    prompts, chosen, rejected = parts(noisy)
    chosen = chosen[:, 0] == preferred_first_token(prompts)
    assert within_binomial_bound(chosen, 1 / (1 + math.exp(-1)))
    # Either way, exactly one of the two responses starts with the preferred digit.
    assert torch.all(chosen != (rejected[:, 0] == preferred_first_token(prompts)))


def test_the_same_seed_gives_the_same_pairs():
    first, again = PreferenceDataset(100, 20.0, 5, FIRST_DIGIT), PreferenceDataset(100, 20.0, 5, FIRST_DIGIT)
    other = PreferenceDataset(100, 20.0, 6, FIRST_DIGIT)
    assert all(torch.equal(a, b) for a, b in zip(first.sequences(), again.sequences()))
    assert not torch.equal(first.context, other.context)


# --- the reward model starts from the SFT policy ------------------------------------------------

def test_the_reward_model_starts_with_every_weight_of_the_sft_policy_but_its_head(sft_policy):
    reward_model = initial_reward_model(sft_policy)
    policy_weights = sft_policy.state_dict()
    for name, weights in reward_model.state_dict().items():
        if name.startswith('lm_head.'):
            assert weights.shape == (1, 48)  # a new 1-wide head
        else:
            assert torch.equal(weights[:len(policy_weights[name])], policy_weights[name]), name
    # A new token row for CLS, and new position rows for the last response digit and CLS, which the
    # policy never reads.
    assert reward_model.transformer.wte.weight.shape == (VOCAB_SIZE + 1, 48)
    assert sft_policy.transformer.wte.weight.shape == (VOCAB_SIZE, 48)
    assert reward_model.transformer.wpe.weight.shape == (10, 48)
    assert sft_policy.transformer.wpe.weight.shape == (8, 48)


def test_training_the_reward_model_leaves_the_sft_policy_as_it_was(sft_policy):
    before = {name: weights.clone() for name, weights in sft_policy.state_dict().items()}
    train_reward(sft_policy, RewardConfig(iters=3, pairs=64, batch_size=8), progress=False)
    assert all(torch.equal(before[name], weights) for name, weights in sft_policy.state_dict().items())


# --- what the default training run learns ---------------------------------------------------------

def test_the_reward_model_ranks_the_preferred_first_digit_highest_on_fresh_prompts(reward_model):
    # All ten first digits compete, six or more of which never start a training response to that
    # prompt (pairs are always valid sentences); the preferred one is the unique best for every
    # prompt, so a model that learnt the preference scores 1 and chance is 0.1. 95% allows a few
    # confusions on 1000 prompts drawn with a seed (12) the training did not use.
    assert rank_rate(reward_model, FIRST_DIGIT, n_prompts=1000, seed=12) >= 0.95


def test_the_reward_model_orders_held_out_pairs_correctly(reward_model):
    # Labels at margin 20 are noiseless, so a model that learnt the preference gets every pair right;
    # 95% allows a few confusions. Chance is 50%.
    held_out = PreferenceDataset(2000, 20.0, 1, FIRST_DIGIT)
    assert pairwise_accuracy(reward_model, held_out) >= 0.95
