"""Online DPO: the labeller against the Bradley-Terry probabilities and TRL's hard rule, the target
against the loss, then what a short seeded run learns from the short SFT policy and reward model
(tests/conftest.py)."""
import copy
import math

import pytest
import torch

from conftest import train_quickly
from toy_rlhf.methods import METHODS
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods.dpo import dpo_loss
from toy_rlhf.methods.online_dpo import OnlineDPOConfig, chosen_and_rejected, first_wins, train_online_dpo
from toy_rlhf.metrics import evaluate_policy
from toy_rlhf.optimal import exact_tables, objective, optimal_value
from toy_rlhf.preferences import PREFERENCES


DRAWS = 20000  # labels per score difference


# --- the labeller ---------------------------------------------------------------------------------

@pytest.mark.parametrize('difference, probability', [
    (-2.0, 0.11920292),  # sigmoid(-2) = 1 / (1 + e^2) = 1 / 8.3891
    (-0.5, 0.37754067),  # 1 / (1 + e^0.5) = 1 / 2.6487
    (0.0, 0.5),  # a tie: a fair coin
    (1.0, 0.73105858),  # 1 / (1 + e^-1) = 1 / 1.3679
    (3.0, 0.95257413),  # 1 / (1 + e^-3) = 1 / 1.0498
])
def test_bradley_terry_labels_choose_the_first_with_probability_sigmoid_of_the_score_difference(
        difference, probability):
    # The pair's scores are shifted by 7 to show only the difference counts.
    scores = torch.tensor([[7.0 + difference, 7.0]]).expand(DRAWS, 2)
    frequency = first_wins(scores, 'bradley-terry', torch.Generator().manual_seed(0)).float().mean().item()
    # The count is binomial: standard error sqrt(p (1 - p) / 20000) <= 0.0035. Four of them (0.014)
    # is missed by a right labeller with probability 6e-5, while the nearest wrong answers (the two
    # scores swapped, or the difference doubled) are off by 0.04 or more (over 10 standard errors)
    # at every row but the tie.
    standard_error = math.sqrt(probability * (1 - probability) / DRAWS)
    assert abs(frequency - probability) < 4 * standard_error


def test_hard_labels_choose_the_higher_score_and_give_a_tie_to_the_first():
    scores = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-4.0, -4.0]])
    assert first_wins(scores, 'hard').tolist() == [False, True, True, True]


def test_an_unknown_label_rule_is_an_error():
    with pytest.raises(ValueError, match='hard'):
        first_wins(torch.zeros(1, 2), 'soft')


def test_the_chosen_and_rejected_indices_point_into_the_adjacent_pairs_of_the_rollout():
    # Pairs (0, 1), (2, 3), (4, 5); the first wins in pairs 0 and 2.
    chosen, rejected = chosen_and_rejected(torch.tensor([True, False, True]))
    assert chosen.tolist() == [0, 3, 4] and rejected.tolist() == [1, 2, 5]


@pytest.mark.parametrize('beta', [0.5, 2.0])
def test_where_beta_times_the_log_ratio_gap_equals_the_score_gap_bradley_terry_labels_give_no_gradient(beta):
    # At pi* = pi_ref exp(s / beta) / Z, beta * (log pi/pi_ref (y1) - log pi/pi_ref (y2)) = s1 - s2.
    # The expected loss over the label, p * L(y1 chosen) + (1 - p) * L(y2 chosen) with p =
    # sigmoid(s1 - s2), then has gradient beta * (sigmoid(beta * dh) - p) = 0: pi* is a fixed point.
    s1, s2 = 1.3, -0.4
    p = torch.sigmoid(torch.tensor(s1 - s2, dtype=torch.float64))
    log_ratio_1 = torch.tensor([(s1 - s2) / beta], dtype=torch.float64, requires_grad=True)
    log_ratio_2, zero = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    expected_loss = (p * dpo_loss(log_ratio_1, log_ratio_2, zero, zero, beta)[0]
                     + (1 - p) * dpo_loss(log_ratio_2, log_ratio_1, zero, zero, beta)[0])
    expected_loss.backward()
    assert abs(log_ratio_1.grad.item()) < 1e-12
    # Hard labels (y1 always chosen, s1 > s2) still push: gradient -beta * sigmoid(-(s1 - s2)) != 0.
    log_ratio_1.grad = None
    dpo_loss(log_ratio_1, log_ratio_2, zero, zero, beta)[0].backward()
    assert math.isclose(log_ratio_1.grad.item(), -beta / (1 + math.exp(s1 - s2)), rel_tol=1e-9)


# --- what training does ---------------------------------------------------------------------------

# 15 rounds of 64 pairs (1-2 s on one core). From the shared short SFT policy (exact preference rate
# 0.30) this reached 0.83-0.85 at seeds 0-2, and closed 0.68-0.76 of the gap from the reference to
# J* on the 5 prompts below (0.85 on 20 prompts at seed 0).
SHORT = dict(METHODS['online_dpo'].quick)  # the registry's quick schedule
TINY = dict(iters=2, prompts_per_iter=8)  # for the properties that need no learning
# Preference rate to within ~0.01 (exact per prompt), for the preference the reward model learnt.
EVALUATION = dict(n_prompts=500, seed=1, preference=PREFERENCES['first-digit'])
TRL_NAMES = ['loss', 'rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies',
             'logps/chosen', 'logps/rejected', 'objective/scores', 'objective/kl', 'gold/preference_rate']


@pytest.fixture(scope='module')
def short_run(quick_runs):
    return quick_runs['online_dpo']


def test_a_short_run_raises_the_preference_rate_far_above_the_sft_policys(sft_policy, short_run):
    before = evaluate_policy(sft_policy, sft_policy, **EVALUATION)['preference_rate']
    after = evaluate_policy(short_run[0], sft_policy, **EVALUATION)['preference_rate']
    # Measured 0.30 -> 0.83-0.85; 0.75 and a rise of 0.4 leave room for other platforms.
    assert after >= 0.75 and after > before + 0.4


def test_a_short_run_stays_below_the_exact_optimum_and_closes_most_of_the_gap(sft_policy, reward_model,
                                                                              short_run):
    # Exact over all 10^4 responses of each prompt: J <= J* holds for every policy, up to float64
    # rounding of sums of 10^4 terms of size ~10 (1e-9 is far above it).
    tables = exact_tables(sft_policy, reward_model, sample_prompts(5, torch.Generator().manual_seed(3)),
                          EVALUATION['preference'])
    log_pi = all_response_log_probs(short_run[0], tables.prompts)
    J = objective(log_pi, tables.log_ref, tables.rewards, beta=1.0)
    J_star = optimal_value(tables.log_ref, tables.rewards, beta=1.0)
    J_ref = objective(tables.log_ref, tables.log_ref, tables.rewards, beta=1.0)
    assert (J <= J_star + 1e-9).all()
    # Measured 0.68-0.76 at seeds 0-2; half the gap is far from the reference's 0.
    assert ((J - J_ref) / (J_star - J_ref)).mean() > 0.5


def test_the_log_has_one_row_per_round_with_trls_names_and_two_samples_per_prompt(short_run):
    history = short_run[1]
    assert [row['samples'] for row in history] == [64 * 2 * (i + 1) for i in range(SHORT['iters'])]
    for row in history:
        assert all(math.isfinite(row[name]) for name in TRL_NAMES)
        assert math.isclose(row['rewards/margins'], row['rewards/chosen'] - row['rewards/rejected'],
                            rel_tol=1e-4, abs_tol=1e-5)
    # The first round samples from the SFT policy itself: its exact preference rate, ~0.3, on 64
    # prompts (per-prompt rates spread ~0.13: 0.2-0.45 is 6 standard errors either side).
    assert 0.2 < history[0]['gold/preference_rate'] < 0.45


def test_the_reference_and_the_reward_model_are_left_unchanged(sft_policy, reward_model):
    before = [copy.deepcopy(model.state_dict()) for model in (sft_policy, reward_model)]
    policy, _ = train_online_dpo(sft_policy, reward_model, OnlineDPOConfig(**TINY), PREFERENCES['first-digit'], progress=False)
    for model, weights in zip((sft_policy, reward_model), before):
        assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert not all(torch.equal(tensor, before[0][name]) for name, tensor in policy.state_dict().items())


def test_the_label_rule_changes_the_run(sft_policy, reward_model):
    def run(**settings):
        _, history = train_quickly('online_dpo', sft_policy, reward_model, **TINY, **settings)
        return [{k: v for k, v in row.items() if k != 'time/seconds'} for row in history]

    assert run(labels='hard') != run()


def test_a_greedy_sampler_writes_each_pair_as_the_same_response_twice(sft_policy, reward_model):
    # Top-k 1: the sampler, not the policy, writes each pair, and writes the same response twice (the
    # policy would write two different ones for most prompts). So every margin is exactly 0 and the
    # loss exactly log 2.
    config = OnlineDPOConfig(sampler_top_k=1, **TINY)
    _, history = train_online_dpo(sft_policy, reward_model, config, PREFERENCES['first-digit'], progress=False)
    assert all(row['rewards/margins'] == 0 and math.isclose(row['loss'], math.log(2), rel_tol=1e-6) for row in history)
    _, on_policy = train_online_dpo(sft_policy, reward_model, OnlineDPOConfig(**TINY), PREFERENCES['first-digit'],
                                    progress=False)
    assert all(row['rewards/margins'] != 0 for row in on_policy)
