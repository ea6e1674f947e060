"""The credit-assignment study: measuring leaves a run unchanged, samples are counted on measured
rounds only, a tiny study measures every variant and seed exactly and draws its figure, and worker
processes give its numbers (and the collapse study's)."""
import dataclasses
import functools
import json

import pytest
import torch

from mingpt.model import GPT
from toy_rlhf.checkpoint import save_checkpoint
from conftest import one_thread
from toy_rlhf.studies import collapse as collapse_module
from toy_rlhf.studies.collapse import CollapseConfig, collapse
from toy_rlhf.studies.credit import CreditConfig, credit_assignment, credit_variants, samples_to_target
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import KL_POSITIONS
from toy_rlhf.policy import policy_config
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import reward_model_config


def test_samples_count_only_the_measured_rounds_where_the_rate_first_reaches_the_target():
    history = [{'samples': 0, 'exact/best_level_rate': 0.1}, {'samples': 8},  # an unmeasured round
               {'samples': 16, 'exact/best_level_rate': 0.5}, {'samples': 24, 'exact/best_level_rate': 0.4},
               {'samples': 32, 'exact/best_level_rate': 0.7}]
    assert samples_to_target(history, 0.5) == 16
    assert samples_to_target(history, 0.6) == 32
    assert samples_to_target(history, 0.8) is None


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    return GPT(policy_config()), GPT(reward_model_config())


ONLINE = [name for name, method in METHODS.items() if method.online and method.train is not None]


@pytest.mark.parametrize('name', ONLINE)
def test_every_online_method_measured_is_the_same_run_as_unmeasured(models, name):
    reference, reward_model = models
    config = METHODS[name].config(iters=3, prompts_per_iter=4)
    measured_rounds = []

    def measure(rounds, actor):  # as ExactMeasure: forward passes, no random numbers drawn
        measured_rounds.append(rounds)
        actor(torch.zeros(2, 8, dtype=torch.long))
        return {'exact/rounds': rounds}

    inputs = dict(reward_model=reward_model, config=config, preference=PREFERENCES['first-digit'], progress=False)
    plain, _ = METHODS[name].train(reference, **inputs)
    measured, history = METHODS[name].train(reference, **inputs, measure=measure)
    assert measured_rounds == [1, 2, 3] and [row['exact/rounds'] for row in history] == [1, 2, 3]
    assert all(torch.equal(plain.state_dict()[key], value) for key, value in measured.state_dict().items())


def test_a_tiny_study_measures_every_variant_and_seed_exactly_and_draws_its_figure(models, tmp_path, monkeypatch):
    reference, reward_model = models
    variants = [variant for variant, _ in credit_variants()]
    for name in {variant.method for variant in variants}:  # tiny rollouts: the study is tested, not learning
        short = functools.partial(METHODS[name].config, prompts_per_iter=8)
        monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], config=short))
    run_dir = tmp_path / 'runs' / 'default'
    save_checkpoint(run_dir / 'sft.pt', reference, 'policy', {}, {})
    save_checkpoint(run_dir / 'reward.pt', reward_model, 'reward', {}, {})
    config = CreditConfig(runs=2, iters=2, measure_every=2, prompts=1)
    result = credit_assignment(run_dir, tmp_path / 'plots', config, progress=False)
    assert list(result['variants']) == [variant.label for variant in variants]
    for label, row in result['variants'].items():
        assert [run['seed'] for run in row['runs']] == [0, 1]
        for run in row['runs']:
            # Exact: no policy beats J*, and the chain rule splits the KL into its positions.
            assert run['gap_closed'] <= 1 + 1e-9, label
            assert sum(run[name] for name in KL_POSITIONS) == pytest.approx(run['kl_total'], abs=1e-6)
    optimum = result['optimum']
    assert result['target_rate'] == pytest.approx(0.95 * optimum['preference_rate'])
    assert sum(optimum[name] for name in KL_POSITIONS) == pytest.approx(optimum['kl_total'], abs=1e-6)
    assert json.loads((run_dir / 'credit_assignment.json').read_text())['variants'].keys() == result['variants'].keys()
    report = (run_dir / 'credit_assignment.md').read_text()
    assert all(f'| {variant.label} |' in report for variant in variants)
    assert (tmp_path / 'plots' / 'credit_assignment.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow  # two studies twice, and two workers started: `pytest -m slow`
def test_the_credit_and_collapse_studies_give_a_serial_runs_numbers_in_worker_processes(models, tmp_path):
    reference, reward_model = models
    studies = {'credit': lambda folder, **where: credit_assignment(
                   folder, tmp_path / 'plots', CreditConfig(runs=1, iters=1, prompts=1, **where), progress=False),
               'collapse': lambda folder, **where: collapse(
                   folder, tmp_path / 'plots', CollapseConfig(methods=('rloo',), rounds=1, exact_steps=2, exact_pool=4,
                                                              exact_prompts_per_step=4, prompts=1, **where),
                   progress=False)}
    results = {}
    for where, folder in (({}, tmp_path / 'serial'), ({'workers': 2}, tmp_path / 'workers')):
        save_checkpoint(folder / 'sft.pt', reference, 'policy', {}, {})
        save_checkpoint(folder / 'reward.pt', reward_model, 'reward', {}, {})
        with one_thread():
            results[len(where)] = {name: study(folder, **where) for name, study in studies.items()}

    def numbers(result):  # every measured number, without the settings (the workers) or wall seconds
        if isinstance(result, dict):
            return {key: numbers(value) for key, value in result.items() if key not in ('settings', 'seconds')}
        return [numbers(value) for value in result] if isinstance(result, list) else result
    assert numbers(results[1]) == numbers(results[0])
    assert len(results[0]['credit']['variants']) == len(credit_variants())
    assert [curve['label'] for curve in results[0]['collapse']['curves']][0] == METHODS['rloo'].label


def test_a_collapse_study_called_again_reuses_its_kept_runs_and_trains_only_what_is_missing(models, tmp_path,
                                                                                          monkeypatch):
    reference, reward_model = models
    save_checkpoint(tmp_path / 'sft.pt', reference, 'policy', {}, {})
    save_checkpoint(tmp_path / 'reward.pt', reward_model, 'reward', {}, {})
    config = CollapseConfig(methods=('rloo',), rounds=1, exact_steps=2, exact_pool=4, exact_prompts_per_step=4,
                            prompts=1)
    study = functools.partial(collapse, tmp_path, tmp_path / 'plots', progress=False)
    with one_thread():
        first = study(config)
    trained = []  # what each call trains: the sampled methods by name, the exact paths as 'exact'
    real_run, real_path = collapse_module.train_measured, collapse_module.exact_path_job
    monkeypatch.setattr(collapse_module, 'train_measured', lambda method, *rest, **keywords: trained.append(method)
                        or real_run(method, *rest, **keywords))
    monkeypatch.setattr(collapse_module, 'exact_path_job', lambda *arguments, **keywords: trained.append('exact')
                        or real_path(*arguments, **keywords))

    def again(config):
        trained.clear()
        with one_thread():
            record = study(config)
        return trained[:], {key: value for key, value in record.items() if key != 'settings'}

    expected = {key: value for key, value in first.items() if key != 'settings'}
    assert again(config) == ([], expected)  # nothing trained: every run kept, the same record
    kept = tmp_path / 'collapse_runs.json'
    stored = json.loads(kept.read_text())
    del stored['results'][json.dumps(METHODS['rloo'].label)]  # as a study killed before its last run
    kept.write_text(json.dumps(stored))
    assert again(config) == (['rloo'], expected)  # only the missing one, with the numbers it had
    ran, record = again(dataclasses.replace(config, fresh=True))
    assert sorted(ran) == ['exact'] * len(collapse_module.exact_paths(config)) + ['rloo'] and record == expected
