"""Preferences as values: the built-in gold rewards on hand-checked sentences, the questions a
preference answers about policies and scorers, the labeler's Bradley-Terry frequencies, what the
exact optimum of each kind of preference moves, the aligned language, and a user's module:function
preference end to end (or refused in one line)."""
import math

import pytest
import torch

from toy_rlhf import cli
from toy_rlhf.checkpoint import save_checkpoint
from toy_rlhf.data import PreferenceDataset, labeler
from toy_rlhf.enumeration import RESPONSES
from toy_rlhf.language import RESPONSE_LENGTH, VOCAB_SIZE, is_valid_output, join, sample_prompts
from toy_rlhf.methods.ppo import PPOConfig, train_ppo
from toy_rlhf.metrics import aligned_next_tokens, evaluate_policy, true_distributions
from toy_rlhf.optimal import compare_to_optimum, exact_tables, kl_split, optimal_log_probs
from toy_rlhf.pipeline import reward_stage
from toy_rlhf.preferences import (LONGER_PPO, PREFERENCES, PreferenceError, best_reachable, language_paths,
                                  preferred_first_token, reaches_best, resolve_preference,
                                  sample_aligned_path)
from toy_rlhf.reward import RewardConfig, train_reward


PROMPT = torch.tensor([[5, 7, 1, 5]])


def reward_of(name, response):
    return PREFERENCES[name].reward(PROMPT, torch.tensor([response])).item()


# ---------------------------------------------------------------------------------------------
# The built-in gold rewards, by hand.

def test_first_digit_rewards_the_last_prompt_digit_plus_one_first():
    assert reward_of('first-digit', [6, 2, 7, 3]) == 1.0  # 6 = 5 + 1
    assert reward_of('first-digit', [2, 2, 0, 0]) == 0.0


def test_last_digit_rewards_the_last_prompt_digit_plus_four_last():
    assert reward_of('last-digit', [6, 7, 8, 9]) == 1.0  # counting up from x4 = 5 ends at 9
    assert reward_of('last-digit', [6, 2, 7, 3]) == 0.0
    assert reward_of('last-digit', [0, 0, 0, 9]) == 1.0  # the reward reads the last digit only


def test_digit_sum_is_the_sum_over_thirty_six():
    assert reward_of('digit-sum', [6, 2, 7, 3]) == pytest.approx(18 / 36)
    assert reward_of('digit-sum', [9, 9, 9, 9]) == 1.0
    assert reward_of('digit-sum', [0, 0, 0, 0]) == 0.0


def test_distinct_rewards_four_different_digits():
    assert reward_of('distinct', [6, 2, 7, 3]) == 1.0
    assert reward_of('distinct', [6, 2, 7, 2]) == 0.0
    assert reward_of('distinct', [6, 6, 6, 6]) == 0.0


def test_the_language_paths_are_the_rule_applied_slot_by_slot():
    paths = language_paths(PROMPT)[0]  # (256, 4)
    assert paths.shape == (4 ** RESPONSE_LENGTH, RESPONSE_LENGTH)
    # First digit: the increments of 5 7 1 5, one path in four each; 6 twice (from x1 and x4).
    assert torch.bincount(paths[:, 0], minlength=10).tolist() == [0, 0, 64, 0, 0, 0, 128, 0, 64, 0]
    assert [6, 2, 7, 3] in paths.tolist()  # the module docstring's sentence of the language


def test_the_best_level_the_language_reaches_by_hand():
    # 5 7 1 5: the largest first digit the rule allows is 8 = 7 + 1; then 9 = 8 + 1 (window 7 1 5 8),
    # 9 = 8 + 1 (window 1 5 8 9), 9 = 8 + 1 (window 5 8 9 9): 8 9 9 9, sum 35, and no digit can do better.
    assert best_reachable(PREFERENCES['digit-sum'], PROMPT).item() == pytest.approx(35 / 36)
    assert best_reachable(PREFERENCES['last-digit'], PROMPT).item() == 1.0  # 6 7 8 9 is valid


def test_the_preferred_first_digit_is_the_last_prompt_digit_plus_one_modulo_ten():
    prompts = torch.tensor([[5, 7, 1, 5], [0, 0, 0, 9], [9, 9, 9, 0], [3, 1, 4, 1]])
    assert preferred_first_token(prompts).tolist() == [6, 0, 1, 2]
    # Whole sentences (prompt + SEP + response) work as well: only x4 matters.
    assert preferred_first_token(join(prompts, prompts)).tolist() == [6, 0, 1, 2]


# ---------------------------------------------------------------------------------------------
# What a preference answers: its best level's rate under a policy, and whether a scorer ranks it first.

SENTENCES = join(PROMPT.expand(2, -1), torch.tensor([[6, 2, 7, 3], [8, 9, 9, 9]]))  # 5 7 1 5 prefers 6


def test_the_first_digit_rate_is_the_probability_of_the_preferred_digit_whatever_was_written():
    log_probs = torch.full((2, 4, VOCAB_SIZE), -5.0)
    log_probs[0, 0, 6], log_probs[1, 0, 6] = math.log(0.3), math.log(0.7)
    rate = PREFERENCES['first-digit'].best_level_rate(log_probs, SENTENCES)
    assert torch.allclose(rate, torch.tensor([0.3, 0.7]))
    # Only the prompt and the first position are read: a sentence may stop after SEP.
    assert torch.equal(PREFERENCES['first-digit'].best_level_rate(log_probs[:, :1], SENTENCES[:, :5]), rate)


def test_any_other_rate_is_whether_the_written_response_reaches_the_best_level():
    log_probs = torch.zeros(2, 4, VOCAB_SIZE)  # not read
    # 8 9 9 9 sums to 35, the best 5 7 1 5 reaches; 6 2 7 3 does not.
    assert PREFERENCES['digit-sum'].best_level_rate(log_probs, SENTENCES).tolist() == [0.0, 1.0]


@pytest.mark.parametrize('name', list(PREFERENCES))
def test_a_scorer_that_is_the_gold_reward_ranks_the_best_first_and_its_negation_never(name):
    preference = PREFERENCES[name]
    prompts = sample_prompts(300, torch.Generator().manual_seed(8))
    right = preference.ranks_best_first(preference.reward, prompts, torch.Generator().manual_seed(9))
    wrong = preference.ranks_best_first(lambda prompts, responses: -preference.reward(prompts, responses), prompts,
                                        torch.Generator().manual_seed(9))
    assert len(right) > 0 and torch.all(right) and not torch.any(wrong)


# ---------------------------------------------------------------------------------------------
# The labeler.

N = 20000


def chosen_share(first, second, margin, preference, seed):
    prompts = PROMPT.expand(N, -1)
    picks = labeler(prompts, torch.tensor([first]).expand(N, -1), torch.tensor([second]).expand(N, -1), margin,
                    preference, torch.Generator().manual_seed(seed))
    return picks.float().mean().item()


@pytest.mark.parametrize('margin', [1.0, 3.0])
def test_the_labeler_picks_the_better_sum_with_probability_sigmoid_of_the_gold_difference(margin):
    # 9 9 9 0 against 1 1 1 0: gold difference 24 / 36. The share of N Bernoulli draws has standard
    # error sqrt(p (1 - p) / N) (~0.003); 4 of them is a false alarm once in ~16,000 runs.
    p = 1 / (1 + math.exp(-margin * 24 / 36))
    share = chosen_share([9, 9, 9, 0], [1, 1, 1, 0], margin, PREFERENCES['digit-sum'], seed=1)
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / N)


def test_equal_gold_rewards_are_a_coin_flip():
    share = chosen_share([1, 2, 3, 4], [4, 3, 2, 1], 20.0, PREFERENCES['digit-sum'], seed=2)
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / N)


def test_sampled_pairs_are_chosen_by_the_gold_reward_and_ties_marked_not_decisive():
    pairs = PreferenceDataset(2000, 20.0, 3, PREFERENCES['distinct'])
    gold = PREFERENCES['distinct'].reward
    prompts = pairs.context[:, :4]
    chosen, rejected = gold(prompts, pairs.chosen[:, :4]), gold(prompts, pairs.rejected[:, :4])
    # At margin 20 a decisive label is wrong with probability sigmoid(-20) ~ 2e-9: never, here.
    assert torch.all(chosen[pairs.decisive] > rejected[pairs.decisive])
    assert torch.all(chosen[~pairs.decisive] == rejected[~pairs.decisive])
    assert 0 < pairs.decisive.float().mean() < 1


# ---------------------------------------------------------------------------------------------
# The exact optimum, with the exact language as pi_ref (no training needed).

PROMPTS = torch.tensor([[5, 7, 1, 5], [0, 0, 3, 9], [2, 4, 4, 8]])


def language_table(prompts):
    """log P_language(y | x) of every digit response (P, 10^4), from the 256 equally likely paths."""
    paths = language_paths(prompts)
    index = (paths * torch.tensor([1000, 100, 10, 1])).sum(dim=2)  # (P, 256): row of all_responses()
    counts = torch.zeros(len(prompts), RESPONSES, dtype=torch.float64)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    return (counts / paths.size(1)).log()


def gold_table(preference, prompts):
    responses = torch.cartesian_prod(*[torch.arange(10)] * RESPONSE_LENGTH)
    return torch.stack([preference.reward(prompt.expand(RESPONSES, -1), responses)
                        for prompt in prompts]).double() * 5.0


def optimum_kls(name):
    log_ref = language_table(PROMPTS)
    optimum = optimal_log_probs(log_ref, gold_table(PREFERENCES[name], PROMPTS), beta=1.0)
    return kl_split(optimum, log_ref)


def test_for_first_digit_the_optimum_keeps_the_later_digits_of_the_language_exactly():
    kls = optimum_kls('first-digit')
    assert torch.all(kls['kl_1'] > 0.1)
    for position in (2, 3, 4):
        assert torch.all(kls[f'kl_{position}'].abs() < 1e-12)


def test_for_last_digit_the_optimum_moves_the_earlier_digits_too():
    # Reaching (x4 + 4) % 10 last takes a (x4 + 3) % 10 in the window: pi* shifts y1..y3 towards it.
    kls = optimum_kls('last-digit')
    for position in (1, 2, 3, 4):
        assert torch.all(kls[f'kl_{position}'] > 1e-3)


@pytest.mark.parametrize('sample', [PREFERENCES['first-digit'].sample_aligned,
                                    lambda prompts, generator: sample_aligned_path(PREFERENCES['first-digit'],
                                                                                   prompts, generator)])
def test_for_first_digit_the_generic_aligned_language_is_the_notebooks(sample):
    # The notebook's aligned language: the preferred first digit, then the language. Equal to the
    # last bit, so its exact metrics did not move when they became the generic ones.
    prompts = sample_prompts(500, torch.Generator().manual_seed(4))
    responses = sample(prompts, torch.Generator().manual_seed(5))
    notebooks = true_distributions(join(prompts, responses))
    notebooks[:, 0] = torch.nn.functional.one_hot(preferred_first_token(prompts), VOCAB_SIZE).float()
    assert torch.equal(aligned_next_tokens(PREFERENCES['first-digit'], prompts, responses), notebooks)
    assert torch.all(responses[:, 0] == (prompts[:, 3] + 1) % 10)


@pytest.mark.parametrize('name', ['last-digit', 'digit-sum', 'distinct'])
def test_an_aligned_response_is_valid_and_of_the_best_level(name):
    prompts = sample_prompts(500, torch.Generator().manual_seed(6))
    responses = PREFERENCES[name].sample_aligned(prompts, torch.Generator().manual_seed(7))
    assert torch.all(is_valid_output(prompts, responses))
    assert torch.all(reaches_best(PREFERENCES[name], prompts, responses))


# ---------------------------------------------------------------------------------------------
# A user's preference: module:function (this module's own functions).

def even_last_digit(prompts, responses):
    return (responses[:, -1] % 2 == 0).float()


def takes_one_argument(responses):
    return responses[:, 0].float()


def returns_nan(prompts, responses):
    return torch.full((len(prompts),), float('nan'))


def nan_when_the_last_prompt_digit_is_3(prompts, responses):
    # Finite on both probe prompts (they end in 5 and 9), NaN on every tenth prompt.
    return torch.where(prompts[:, -1] == 3, float('nan'), 1.0)


def changes_its_inputs(prompts, responses):
    prompts.zero_()
    responses.fill_(9)
    return torch.ones(len(prompts))


def exits_when_called_on_more_than_the_probe(prompts, responses):
    if len(prompts) != 2 * 10 ** 4:  # the probe batch passes
        raise SystemExit(0)
    return torch.zeros(len(prompts))


def rewards_every_response_alike(prompts, responses):
    return torch.zeros(len(prompts))


def returns_a_column(prompts, responses):
    return responses[:, :1].float()


def returns_integers(prompts, responses):
    return responses[:, 0]


def test_a_user_preference_is_resolved_and_checked():
    preference = resolve_preference('test_preferences:even_last_digit')
    assert preference.reward(PROMPT, torch.tensor([[6, 2, 7, 4]])).item() == 1.0
    assert preference.first_token is None and preference.pairs == 'language'
    assert preference.recipes == {'ppo': LONGER_PPO}  # measured to help on preferences nobody tuned for


@pytest.mark.parametrize('name, says', [
    ('no-such-preference', 'not a built-in'),
    ('no_such_module_anywhere:f', 'cannot import'),
    ('test_preferences:not_there', 'cannot import'),
    ('test_preferences:PROMPT', 'not a function'),
    ('test_preferences:takes_one_argument', 'must take (prompts, responses)'),
    ('test_preferences:returns_nan', 'returned nan for prompt 5 7 1 5, response 0 0 0 0; it must be finite'),
    ('test_preferences:returns_a_column', 'shape'),
    ('test_preferences:returns_integers', 'floats'),
])
def test_a_bad_user_preference_is_one_line_and_status_two_before_training(name, says, tmp_path, capsys):
    with pytest.raises(PreferenceError, match=says.replace('(', r'\(').replace(')', r'\)')):
        resolve_preference(name)
    # Through the command line: no sft.pt exists, so reaching training would be another error.
    with pytest.raises(SystemExit) as exit_:
        cli.run_command('reward', ['--run-dir', str(tmp_path), '--preference', name, '--quiet'])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and says in error and 'Traceback' not in error


def test_a_user_preference_runs_the_reward_model_and_ppo_end_to_end(sft_policy):
    name = 'test_preferences:even_last_digit'
    reward_model, _ = train_reward(sft_policy, RewardConfig(preference=name, pairs=500, held_out_pairs=100, iters=30),
                                   progress=False)
    policy, history = train_ppo(sft_policy, reward_model, PPOConfig(iters=2, prompts_per_iter=16), resolve_preference(name),
                                progress=False)
    preference = resolve_preference(name)
    # The rollout log follows the user's preference: half the digits are even, and the language's
    # best level (an even last digit) is reachable for every prompt, so the rate is near 0.5, not
    # the first digit's 0.33.
    assert 0.2 < history[0]['gold/preference_rate'] < 0.8
    metrics = evaluate_policy(policy, sft_policy, 200, seed=0, preference=preference)
    assert all(math.isfinite(value) for value in metrics.values() if isinstance(value, float))
    tables = exact_tables(sft_policy, reward_model, PROMPTS[:1], preference)
    row = compare_to_optimum(tables.log_ref, tables.log_ref, tables.gold(1.0), PROMPTS[:1], 1.0, preference)
    assert row['gap_closed'] == pytest.approx(0.0, abs=1e-9)  # the reference itself closes none of the gap
    assert 0 < row['optimal_preference_rate'] <= 1


def test_a_user_preference_is_checked_wherever_it_is_called_and_named_with_the_stage(sft_policy, tmp_path):
    preference = resolve_preference('test_preferences:nan_when_the_last_prompt_digit_is_3')  # the probe passes
    with pytest.raises(PreferenceError, match=r'returned nan for prompt 1 2 3 3, response 4 4 4 4; it must be finite'):
        preference.reward(torch.tensor([[1, 2, 3, 3]]), torch.tensor([[4, 4, 4, 4]]))
    save_checkpoint(tmp_path / 'sft.pt', sft_policy, 'policy', {}, {})
    config = RewardConfig(preference=preference.name, pairs=64, held_out_pairs=64, iters=1)
    with pytest.raises(PreferenceError, match=r'^reward: --preference test_preferences:nan_when'):
        reward_stage(tmp_path, config, progress=False)
    assert not (tmp_path / 'reward.pt').exists()


def test_a_user_preference_gets_copies_of_its_inputs():
    preference = resolve_preference('test_preferences:changes_its_inputs')
    prompts, responses = torch.tensor([[5, 7, 1, 5]]), torch.tensor([[6, 2, 7, 3]])
    preference.reward(prompts, responses)
    assert prompts.tolist() == [[5, 7, 1, 5]] and responses.tolist() == [[6, 2, 7, 3]]


def test_a_user_module_that_exits_on_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / 'exits_on_import.py').write_text('import sys\nsys.exit(0)\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PreferenceError, match=r'cannot import it \(SystemExit: 0\)'):
        resolve_preference('exits_on_import:f')


def test_a_user_preference_that_exits_when_called_is_one_line():
    preference = resolve_preference('test_preferences:exits_when_called_on_more_than_the_probe')
    with pytest.raises(PreferenceError, match=r'failed \(SystemExit: 0\)'):
        preference.reward(torch.tensor([[5, 7, 1, 5]]), torch.tensor([[6, 2, 7, 3]]))


def test_a_preference_with_nothing_to_prefer_is_one_line_before_training(sft_policy, tmp_path):
    save_checkpoint(tmp_path / 'sft.pt', sft_policy, 'policy', {}, {})
    config = RewardConfig(preference='test_preferences:rewards_every_response_alike', pairs=64, held_out_pairs=64)
    with pytest.raises(PreferenceError, match=r'^reward: .*every held-out pair is a tie'):
        reward_stage(tmp_path, config, progress=False)
    assert not (tmp_path / 'reward.pt').exists()
