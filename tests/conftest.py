"""Trained models shared by the reward, PPO and metrics tests: one short SFT run and one
reward-model run per run of the suite (shared by its xdist workers), instead of one per test."""
import os
from dataclasses import replace

import pytest
import torch
from filelock import FileLock

from mingpt.model import GPT
from toy_rlhf.language import sample_prompts
from toy_rlhf import cli
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import ExactTables, exact_tables
from toy_rlhf.policy import policy_config
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import RewardConfig, reward_model_config, train_reward
from toy_rlhf.sft import SFTConfig, train_sft

# pytest.ini runs one pytest-xdist worker per core, each on one thread: on 2 cores the suite took
# 0.77x the time of one process on two threads (measured side by side), since these small tensors are
# bound by per-op overhead a second thread does not share. `pytest -n 0` is one process on two threads. The learning tests' seeds and thresholds
# hold at one thread and at two (both runs of the suite pass; the numbers differ between them).
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else 2)

# A quarter of the default SFT schedule at half the batch: KL(true || model) ~0.07 nats per token and
# a preference rate ~0.31, close to the language's exact 0.325, which is all PPO needs to start from.
SHORT_SFT = SFTConfig(iters=250, batch_size=128, seed=0)


def computed_once(tmp_path_factory, name, make):
    """make() (a dict of tensors), computed once for the whole run: under pytest-xdist the first worker
    to ask saves it into the run's shared temporary folder and every worker, that one too, reads it
    back; without xdist, make() itself. The saved tensors are bit for bit the computed ones, so the
    models and tables are the same on every worker (all on one thread)."""
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return make()
    path = tmp_path_factory.getbasetemp().parent / f'{name}.pt'
    with FileLock(f'{path}.lock'):
        if not path.is_file():
            torch.save(make(), path)
        return torch.load(path, weights_only=True)


def model_from(state, config):
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope='session')
def sft_policy(tmp_path_factory):
    state = computed_once(tmp_path_factory, 'sft_policy', lambda: train_sft(SHORT_SFT, progress=False)[0].state_dict())
    return model_from(state, policy_config(SHORT_SFT.model_type))


@pytest.fixture(scope='session')
def reward_model(sft_policy, tmp_path_factory):
    # The default schedule: started from even this short SFT policy it learns the preference (the
    # reward tests check that it did).
    state = computed_once(tmp_path_factory, 'reward_model',
                          lambda: train_reward(sft_policy, RewardConfig(seed=0), progress=False)[0].state_dict())
    return model_from(state, reward_model_config())


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
def first_digit_tables(sft_policy, reward_model, tmp_path_factory):
    """The exact tables (toy_rlhf.optimal.ExactTables) of the shared SFT policy and reward model on 20
    prompts, for the first digit: computed once per run (the reward model's 2 x 10^5 scores are the
    cost) for every test that measures trained policies exactly."""
    def make():
        tables = exact_tables(sft_policy, reward_model, sample_prompts(20, torch.Generator().manual_seed(3)),
                              PREFERENCES['first-digit'])
        return {'prompts': tables.prompts, 'log_ref': tables.log_ref, 'rewards': tables.rewards}
    return ExactTables(**computed_once(tmp_path_factory, 'first_digit_tables', make),
                       preference=PREFERENCES['first-digit'])


def run_cli(command, arguments, capsys):
    """(exit status, stdout, stderr lines) of `toy-rlhf command arguments`, run in this process."""
    try:
        cli.run_command(command, arguments, prog=f'toy-rlhf {command}')
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()
