"""The exact optimum: enumeration against teacher forcing, the closed form against its defining
properties, and the gold metrics against hand-checked cases. Small random models with fixed seeds
(no trained checkpoints), in float64 so that exact identities can be checked to ~1e-9."""
import math

import pytest
import torch

from mingpt.model import GPT
from toy_rlhf.enumeration import all_responses, all_response_log_probs, all_response_rewards
from toy_rlhf.language import join
from toy_rlhf.optimal import (ExactTables, compare_to_optimum, evaluate_against_optimum, gold_metrics, kl_split,
                              non_digit_mass, objective, optimal_frontier, optimal_log_probs, optimal_value)
from toy_rlhf.policy import policy_config, next_token_log_probs
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import reward_model_config, score_sentences


BETAS = (0.05, 0.3, 1.0, 4.0)
# Float64 tables of O(10) numbers summed over 10^4 responses: rounding is ~1e-13, so 1e-9 is loose
# for identities that hold exactly, and tight enough to catch any real mistake (those are >= 1e-3).
EXACT = 1e-9
FIRST_DIGIT = PREFERENCES['first-digit']  # the gold metrics' preference


def random_model(config, seed, head_std):
    """A float64 GPT with a sharp output head (std head_std instead of 0.02): far-from-uniform
    distributions, rewards with a spread of a few units, so that mistakes show up."""
    torch.manual_seed(seed)
    model = GPT(config).double().eval()
    torch.nn.init.normal_(model.lm_head.weight, std=head_std)
    return model


@pytest.fixture(scope='module')
def prompts():
    return torch.randint(10, (3, 4), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def reference():
    return random_model(policy_config(), seed=1, head_std=1.0)


@pytest.fixture(scope='module')
def policy():
    return random_model(policy_config(), seed=2, head_std=1.0)


@pytest.fixture(scope='module')
def reward_model():
    return random_model(reward_model_config(), seed=3, head_std=3.0)


@pytest.fixture(scope='module')
def log_ref(reference, prompts):
    return all_response_log_probs(reference, prompts)


@pytest.fixture(scope='module')
def log_pi(policy, prompts):
    return all_response_log_probs(policy, prompts)


@pytest.fixture(scope='module')
def rewards(reward_model, prompts):
    return all_response_rewards(reward_model, prompts, prompts_per_pass=2)  # two passes


def sampled_sentences(prompts, n, seed):
    """n random responses per prompt as full sentences, and their indices in all_responses()."""
    index = torch.randint(10 ** 4, (len(prompts), n), generator=torch.Generator().manual_seed(seed))
    sentences = join(prompts.repeat_interleave(n, dim=0), all_responses()[index.flatten()])
    return sentences, index


# --- the enumeration ------------------------------------------------------------------------------

def test_all_responses_lists_every_four_digit_string_once_in_lexicographic_order():
    responses = all_responses()
    assert responses.shape == (10 ** 4, 4)
    place_values = torch.tensor([1000, 100, 10, 1])
    assert torch.equal((responses * place_values).sum(dim=1), torch.arange(10 ** 4))


def test_trie_log_probs_equal_teacher_forced_log_probs_of_full_sequences(reference, prompts, log_ref):
    sentences, index = sampled_sentences(prompts, 300, seed=0)
    with torch.no_grad():
        per_token = next_token_log_probs(reference, sentences).gather(2, sentences[:, 5:].unsqueeze(2))
    teacher_forced = per_token.view(len(prompts), -1, 4).sum(dim=2)
    assert torch.allclose(log_ref.gather(1, index), teacher_forced, rtol=0, atol=EXACT)


def test_digit_responses_and_the_non_digit_mass_add_up_to_one(log_ref):
    # The policy can write SEP (here ~1e-5 of the mass, far above the tolerance): not just 1 + 0.
    assert (non_digit_mass(log_ref) > 1e-6).all()
    total = log_ref.exp().sum(dim=1) + non_digit_mass(log_ref)
    assert torch.allclose(total, torch.ones(len(log_ref), dtype=torch.float64), rtol=0, atol=EXACT)


def test_reward_table_equals_the_scores_of_full_sentences(reward_model, prompts, rewards):
    sentences, index = sampled_sentences(prompts, 300, seed=1)
    with torch.no_grad():
        scores = score_sentences(reward_model, sentences).view(len(prompts), -1)
    assert rewards.std() > 1.0  # rewards that vary by units, as a trained reward model's do
    assert torch.allclose(rewards.gather(1, index), scores, rtol=0, atol=EXACT)


# --- the optimum ----------------------------------------------------------------------------------

@pytest.mark.parametrize('beta', (0.0,) + BETAS)
def test_the_optimal_policy_is_a_distribution_over_digit_responses(log_ref, rewards, beta):
    total = optimal_log_probs(log_ref, rewards, beta).exp().sum(dim=1)
    assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=EXACT)


def test_at_huge_beta_the_optimum_is_the_reference_and_its_value_the_expected_reward(log_ref, rewards):
    beta = 1e6
    reward_range = (rewards.amax(dim=1) - rewards.amin(dim=1)).unsqueeze(1)
    log_ref_digits = log_ref - log_ref.logsumexp(dim=1, keepdim=True)
    # log pi* - log pi_ref = (r - J*) / beta, and J* lies between min r and max r.
    assert ((optimal_log_probs(log_ref, rewards, beta) - log_ref_digits).abs()
            <= reward_range / beta + EXACT).all()
    # Hoeffding's lemma: 0 <= J* - E_ref[r] <= range^2 / (8 beta), ~1e-5 here.
    gap = optimal_value(log_ref, rewards, beta) - objective(log_ref, log_ref, rewards, beta)
    assert (gap >= -EXACT).all() and (gap <= reward_range.squeeze(1) ** 2 / (8 * beta) + EXACT).all()


def test_at_tiny_beta_the_value_is_the_best_reward(log_ref, rewards):
    beta = 1e-4
    best_reward, best = rewards.max(dim=1)
    log_ref_digits = log_ref - log_ref.logsumexp(dim=1, keepdim=True)
    # J* >= beta * log(pi_ref(y_best) exp(r_best / beta)) = r_best + beta log pi_ref(y_best).
    shortfall = best_reward - optimal_value(log_ref, rewards, beta)
    assert (shortfall >= -EXACT).all()
    assert (shortfall <= -beta * log_ref_digits.gather(1, best.unsqueeze(1)).squeeze(1) + EXACT).all()


def test_at_beta_zero_the_optimum_writes_the_best_response(log_ref, rewards):
    best_reward, best = rewards.max(dim=1)
    assert torch.equal(optimal_log_probs(log_ref, rewards, 0.0).argmax(dim=1), best)
    top = optimal_log_probs(log_ref, rewards, 0.0).exp().amax(dim=1)  # one-hot: the best is unique
    assert torch.allclose(top, torch.ones_like(top), rtol=0, atol=EXACT)
    assert torch.equal(optimal_value(log_ref, rewards, 0.0), best_reward)


@pytest.mark.parametrize('beta', (0.0,) + BETAS)
def test_the_objective_of_the_optimum_is_the_optimal_value(log_ref, rewards, beta):
    achieved = objective(optimal_log_probs(log_ref, rewards, beta), log_ref, rewards, beta)
    assert torch.allclose(achieved, optimal_value(log_ref, rewards, beta), rtol=0, atol=EXACT)


def test_the_objective_of_the_reference_is_its_expected_reward(log_ref, rewards):
    expected_reward = (log_ref.exp() * rewards).sum(dim=1) / log_ref.exp().sum(dim=1)
    for beta in BETAS:
        assert torch.allclose(objective(log_ref, log_ref, rewards, beta), expected_reward, rtol=0, atol=EXACT)


@pytest.mark.parametrize('beta', (0.0,) + BETAS)
def test_no_other_policy_beats_the_optimum(log_ref, log_pi, rewards, beta):
    best = optimal_value(log_ref, rewards, beta)
    assert (objective(log_pi, log_ref, rewards, beta) < best).all()
    assert (objective(log_ref, log_ref, rewards, beta) < best).all()


def test_a_first_digit_reward_leaves_the_later_digits_as_in_the_reference(log_ref):
    first_digit_reward = 5 * torch.randn(len(log_ref), 10, 1, generator=torch.Generator().manual_seed(0))
    rewards = first_digit_reward.double().expand(-1, -1, 1000).reshape(len(log_ref), -1)
    log_optimal = optimal_log_probs(log_ref, rewards, beta=0.5)
    split = kl_split(log_optimal, log_ref)
    assert (split['kl_first'] > 1e-3).all()
    assert torch.allclose(split['kl_later'], torch.zeros_like(split['kl_later']), rtol=0, atol=EXACT)
    # Stronger: log pi*(y2 y3 y4 | y1) = log pi_ref(y2 y3 y4 | y1) response by response.
    def later_given_first(log_probs):
        grouped = log_probs.view(len(log_probs), 10, 1000)
        return grouped - grouped.logsumexp(dim=2, keepdim=True)
    assert torch.allclose(later_given_first(log_optimal), later_given_first(log_ref), rtol=0, atol=EXACT)


def test_the_kl_split_is_two_nonnegative_parts_of_the_total(log_pi, log_ref):
    split = kl_split(log_pi, log_ref)
    assert (split['kl_first'] >= 0).all() and (split['kl_later'] >= 0).all()
    assert torch.allclose(split['kl_first'] + split['kl_later'], split['kl_total'], rtol=0, atol=EXACT)
    assert torch.equal(kl_split(log_ref, log_ref)['kl_total'], torch.zeros(len(log_ref), dtype=torch.float64))


def test_the_optimum_trades_reward_for_kl_as_beta_grows(log_ref, rewards, prompts):
    frontier = optimal_frontier(log_ref, rewards, prompts, (0.0,) + BETAS, FIRST_DIGIT)
    for smaller, larger in zip(frontier, frontier[1:]):
        # d E*[r] / d beta = -Var*(r) / beta^2, d KL* / d beta = -Var*(r) / beta^3, d J* / d beta = -KL*.
        assert larger['reward'] < smaller['reward']
        assert larger['kl_total'] < smaller['kl_total']
        assert larger['J_star'] < smaller['J_star']


# --- gold metrics and the summary ----------------------------------------------------------------

def test_gold_metrics_of_a_hand_checked_mixture():
    # Prompt 5 7 1 5 prefers 6. Half the mass on 6 2 7 3 (preferred, all digits valid); half on
    # 2 2 0 0: 2 = 1 + 1 is valid but not preferred, then 2 (window 7 1 5 2) valid, 0 (window
    # 1 5 2 2) and 0 (window 5 2 2 0) invalid: one of the later three digits valid.
    prompts = torch.tensor([[5, 7, 1, 5]])
    log_pi = torch.full((1, 10 ** 4), float('-inf'), dtype=torch.float64)
    log_pi[0, [6273, 2200]] = math.log(0.5)
    metrics = gold_metrics(log_pi, prompts, FIRST_DIGIT)
    assert metrics['preference_rate'].item() == pytest.approx(0.5, abs=EXACT)
    assert metrics['fidelity'].item() == pytest.approx(0.5 * 1 + 0.5 * 1 / 3, abs=EXACT)
    assert metrics['gold_rate'].item() == pytest.approx(0.5, abs=EXACT)


def test_tables_made_without_a_preference_have_no_gold_reward(prompts, log_ref, rewards):
    with pytest.raises(ValueError, match='without a preference'):
        ExactTables(prompts, log_ref, rewards).gold(1.0)
    gold = ExactTables(prompts, log_ref, rewards, FIRST_DIGIT).gold(2.0)  # 2 on the preferred digit, else 0
    assert torch.equal(gold, 2.0 * (all_responses()[:, 0] == (prompts[:, 3:] + 1) % 10).double())


def test_a_uniform_policy_prefers_the_preferred_digit_one_time_in_ten(prompts):
    uniform = torch.full((len(prompts), 10 ** 4), -math.log(10 ** 4), dtype=torch.float64)
    assert torch.allclose(gold_metrics(uniform, prompts, FIRST_DIGIT)['preference_rate'],
                          torch.full((len(prompts),), 0.1, dtype=torch.float64), rtol=0, atol=EXACT)


def test_the_reference_closes_none_of_the_gap_and_the_optimum_all_of_it(log_ref, rewards, prompts):
    beta = 0.3
    own = compare_to_optimum(log_ref, log_ref, rewards, prompts, beta, FIRST_DIGIT)
    assert own['J'] == pytest.approx(own['J_ref'], abs=EXACT) and own['gap_closed'] == pytest.approx(0, abs=EXACT)
    assert own['kl_total'] == 0 and own['J_star'] > own['J']
    optimum = compare_to_optimum(optimal_log_probs(log_ref, rewards, beta), log_ref, rewards, prompts, beta,
                                 FIRST_DIGIT)
    assert optimum['gap_closed'] == pytest.approx(1, abs=EXACT)
    assert optimum['kl_total'] == pytest.approx(optimum['optimal_kl_total'], abs=EXACT)


def test_evaluating_models_against_the_optimum_matches_the_tables(policy, reference, reward_model,
                                                                    prompts, log_pi, log_ref, rewards):
    beta = 1.0
    from_models = evaluate_against_optimum(policy, reference, reward_model, beta, prompts, FIRST_DIGIT)
    from_tables = compare_to_optimum(log_pi, log_ref, rewards, prompts, beta, FIRST_DIGIT)
    assert from_models.keys() == from_tables.keys()
    # gap_closed divides by J* - J_ref ~ 0.01: relative, not absolute, agreement.
    assert all(from_models[key] == pytest.approx(from_tables[key], rel=EXACT, abs=EXACT) for key in from_models)
    assert from_models['J'] < from_models['J_star'] and from_models['non_digit_mass'] > 0
