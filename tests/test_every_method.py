"""What every registered method that trains must do, checked once for all of them (a new method is
checked here with no edit): from the shared SFT policy its quick schedule learns the preference, no
prompt's objective exceeds its exact optimum, the same seed gives the same run and another seed
another, and neither the reference nor the reward model is changed or given a gradient."""
import pytest
import torch

from conftest import train_quickly
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import expected_reward, objective, optimal_value

TRAINED = [name for name, method in METHODS.items() if method.train is not None]


@pytest.fixture(scope='module')
def tables(first_digit_tables):
    # Exact over all 10^4 responses of 20 prompts: the best-level rate of a policy is then exact per
    # prompt, and its mean over 20 prompts varies by ~0.05 across prompt draws.
    return first_digit_tables


def best_level_rate(log_pi, tables):
    return expected_reward(log_pi, tables.gold(1.0)).mean().item()


@pytest.mark.parametrize('name', TRAINED)
def test_its_quick_schedule_learns_the_preference_and_no_prompt_exceeds_its_optimum(name, quick_runs, tables):
    policy, _ = quick_runs[name]
    log_pi = all_response_log_probs(policy, tables.prompts)
    # The SFT policy's rate here is 0.30 (the language's 0.325). The slowest quick schedule (GRPO as TRL
    # ships it) reached 0.58, the others 0.72-0.98: 0.15 above the start is far outside the ~0.05 of
    # a prompt draw, and well below every method.
    assert best_level_rate(log_pi, tables) > best_level_rate(tables.log_ref, tables) + 0.15
    # J <= J* for every policy, exactly: in float64 it can only fail by rounding (~1e-15 per term).
    beta = dict(METHODS[name].quick).get('beta', METHODS[name].config().beta)
    J = objective(log_pi, tables.log_ref, tables.rewards, beta)
    assert (J <= optimal_value(tables.log_ref, tables.rewards, beta) + 1e-9).all()


def weights_and_gradients(model):
    return {name: (parameter.detach().clone(), None if parameter.grad is None else parameter.grad.clone(),
                   parameter.requires_grad) for name, parameter in model.named_parameters()}


@pytest.mark.parametrize('name', TRAINED)
def test_the_same_seed_gives_the_same_run_another_seed_another_and_the_inputs_stay_as_they_were(
        name, sft_policy, reward_model):
    # A method must leave the models it is given as they are (weights, requires_grad, any .grad a
    # caller's training left), and train a copy.
    before = {model: weights_and_gradients(model) for model in (sft_policy, reward_model)}

    def run(seed):
        policy, history = train_quickly(name, sft_policy, reward_model, iters=1, seed=seed)
        return policy.state_dict(), [{k: v for k, v in row.items() if not k.startswith('time/')} for row in history]

    (weights, history), (weights_again, history_again) = run(0), run(0)
    assert history == history_again
    assert all(torch.equal(tensor, weights_again[key]) for key, tensor in weights.items())
    assert run(1)[1] != history
    for model, parameters in before.items():
        for key, (weight, gradient, requires_grad) in parameters.items():
            parameter = dict(model.named_parameters())[key]
            assert torch.equal(parameter, weight) and parameter.requires_grad == requires_grad, key
            assert parameter.grad is None if gradient is None else torch.equal(parameter.grad, gradient), key
    assert not all(torch.equal(tensor, sft_policy.state_dict()[key]) for key, tensor in weights.items())
