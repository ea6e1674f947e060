"""Trained models shared by the reward, PPO and metrics tests: one short SFT run and one
reward-model run per test session, instead of one per test."""
from dataclasses import replace

import pytest
import torch

from toy_rlhf.language import sample_prompts
from toy_rlhf import cli
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import exact_tables
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import RewardConfig, train_reward
from toy_rlhf.sft import SFTConfig, train_sft

# The suite is one process on CI's two cores: both threads, with OpenMP's passive waiting that
# toy_rlhf sets (measured: the suite 15% faster than with one thread). The learning tests' seeds and
# thresholds hold at one thread and at two.
torch.set_num_threads(2)

# A quarter of the default SFT schedule at half the batch: KL(true || model) ~0.07 nats per token and
# a preference rate ~0.31, close to the language's exact 0.325, which is all PPO needs to start from.
SHORT_SFT = SFTConfig(iters=250, batch_size=128, seed=0)


@pytest.fixture(scope='session')
def sft_policy():
    model, _ = train_sft(SHORT_SFT, progress=False)
    return model


@pytest.fixture(scope='session')
def reward_model(sft_policy):
    # The default schedule: started from even this short SFT policy it learns the preference (the
    # reward tests check that it did).
    model, _ = train_reward(sft_policy, RewardConfig(seed=0), progress=False)
    return model


class QuickRuns(dict):
    """{method name: (policy, history)}: each registered method trained once per session, on first
    use, with its registry's quick schedule (seed 0) from the shared SFT policy and reward model, for
    the first digit."""

    def __init__(self, sft_policy, reward_model):
        super().__init__()
        self.sft_policy, self.reward_model = sft_policy, reward_model

    def __missing__(self, name):
        self[name] = train_quickly(name, self.sft_policy, self.reward_model)
        return self[name]


def train_quickly(name, sft_policy, reward_model, **settings):
    """Method `name` trained with its quick schedule, and `settings` over it: (policy, history)."""
    method = METHODS[name]
    config = replace(method.config(), **{**dict(method.quick), **settings})
    models = {'reward_model': reward_model} if method.needs_reward_model else {}
    return method.train(sft_policy, config=config, preference=PREFERENCES['first-digit'], progress=False, **models)


@pytest.fixture(scope='session')
def quick_runs(sft_policy, reward_model):
    return QuickRuns(sft_policy, reward_model)


@pytest.fixture(scope='session')
def first_digit_tables(sft_policy, reward_model):
    """The exact tables (toy_rlhf.optimal.ExactTables) of the shared SFT policy and reward model on 20
    prompts, for the first digit: computed once per session (the reward model's 2 x 10^5 scores are
    the cost) for every test that measures trained policies exactly."""
    return exact_tables(sft_policy, reward_model, sample_prompts(20, torch.Generator().manual_seed(3)),
                        PREFERENCES['first-digit'])


def run_cli(command, arguments, capsys):
    """(exit status, stdout, stderr lines) of `toy-rlhf command arguments`, run in this process."""
    try:
        cli.run_command(command, arguments, prog=f'toy-rlhf {command}')
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()
