"""Reward over-optimisation: Gao et al.'s fits, the exact curves, and the study's stages reused."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from toy_rlhf import figures, pipeline
from toy_rlhf.checkpoint import load_checkpoint
from toy_rlhf.studies import overoptimisation as study, overoptimisation_curves as study_math
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.language import join, sample_prompts
from toy_rlhf.methods.best_of_n import best_of_n_log_probs
from toy_rlhf.methods.ppo import PPOConfig
from toy_rlhf.metrics import true_distributions
from toy_rlhf.enumeration import all_responses
from toy_rlhf.reward import RewardConfig
from toy_rlhf.run import Variant
from toy_rlhf.sft import SFTConfig
from conftest import one_thread
from test_figures import assert_png

D = np.linspace(0.05, 4.0, 80)


def language_log_probs(prompts):
    """log pi(y|x) of every response under the exact language: (P, 10^4), -inf off the language."""
    responses = all_responses()
    tables = []
    for prompt in prompts:
        sentences = join(prompt.expand(len(responses), -1), responses)
        probabilities = true_distributions(sentences).gather(2, responses.unsqueeze(2)).squeeze(2)  # (N, 4)
        tables.append(probabilities.double().log().sum(dim=1))
    return torch.stack(tables)


@pytest.mark.parametrize('form', ['best_of_n', 'rl'])
def test_the_fit_recovers_alpha_and_beta_from_noiseless_points_of_its_form(form):
    gain = 0.7 * D - 0.15 * study_math.FORMS[form](D)
    fit = study_math.gao_fit(D, gain, form)
    # Least squares on exact data is exact up to the conditioning of a 2-column system: ~1e-14.
    assert fit['alpha'] == pytest.approx(0.7, rel=1e-8)
    assert fit['beta'] == pytest.approx(0.15, rel=1e-8)
    assert fit['rms'] < 1e-10


@pytest.mark.parametrize('form', ['best_of_n', 'rl'])
def test_the_fit_recovers_alpha_and_beta_from_noisy_points_within_four_standard_errors(form):
    sigma = 0.02
    noise = np.random.default_rng(0).normal(0, sigma, len(D))
    fit = study_math.gao_fit(D, 0.7 * D - 0.15 * study_math.FORMS[form](D) + noise, form)
    design = np.stack([D, -study_math.FORMS[form](D)], axis=1)
    standard_errors = sigma * np.sqrt(np.diag(np.linalg.inv(design.T @ design)))
    # An unbiased estimator misses by more than 4 standard errors with probability ~6e-5.
    assert abs(fit['alpha'] - 0.7) < 4 * standard_errors[0]
    assert abs(fit['beta'] - 0.15) < 4 * standard_errors[1]
    assert fit['rms'] == pytest.approx(sigma, rel=0.25)  # 80 residuals: the RMS is within ~10% of sigma


def test_a_curve_peaks_where_it_first_reaches_its_highest_value_and_reports_its_fall():
    curve = {'d': [0.0, 1.0, 2.0, 3.0, 4.0], 'kl': [0.0, 1.0, 4.0, 9.0, 16.0]}
    rises_and_falls = study_math.peak({**curve, 'gold': [0.0, 0.5, 0.8, 0.6, 0.3]})
    assert (rises_and_falls['d'], rises_and_falls['kl'], rises_and_falls['drop']) == (2.0, 4.0, pytest.approx(0.5))
    saturates = study_math.peak({**curve, 'gold': [0.0, 0.5, 0.9, 0.9, 0.9 + 1e-9]})
    assert (saturates['d'], saturates['drop']) == (2.0, 0.0)


@pytest.fixture(scope='module')
def language_tables():
    prompts = sample_prompts(3, torch.Generator().manual_seed(0))
    gold, valid = study_math.gold_tables(PREFERENCES['first-digit'].reward, prompts)
    return language_log_probs(prompts), gold, valid


def test_with_the_gold_reward_as_proxy_gold_and_proxy_coincide_and_neither_falls(language_tables):
    log_ref, gold, valid = language_tables
    values = {'proxy': gold, 'gold': gold, 'gold_valid': gold * valid}
    for curve in (study_math.optimum_curve(log_ref, gold, values, study.BETAS),
                  study_math.best_of_n_curve(log_ref, gold, values, study.BEST_OF_N)):
        assert curve['proxy'] == curve['gold']
        assert np.all(np.diff(curve['d']) >= -1e-12)  # ordered by growing KL
        assert np.all(np.diff(curve['gold']) >= -1e-12)  # the optimiser cannot hack the truth
        # Within the language every response is valid, so nothing is lost to invalid digits either.
        assert np.allclose(curve['gold_valid'], curve['gold'], atol=1e-12)
        # At the far end (beta -> 0, n = 10^4) every prompt gets its preferred first digit.
        assert curve['gold'][-1] == pytest.approx(1 - study_math.expectations(log_ref, log_ref, {'g': gold})['g'], abs=1e-9)


def test_the_best_of_n_curve_is_the_enumerated_best_of_n_for_every_n(language_tables):
    log_ref, gold, valid = language_tables
    # Scores on a coarse grid, so that many responses tie as the reward model's float32 scores do.
    rewards = (torch.randn(log_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4).round()
    values = {'proxy': rewards, 'gold': gold, 'gold_valid': gold * valid}
    ns = [1, 2, 7, 100, 10 ** 4]
    curve = study_math.best_of_n_curve(log_ref, rewards, values, ns)
    reference = study_math.expectations(log_ref, log_ref, values)
    for i, n in enumerate(ns):
        point = study_math.expectations(best_of_n_log_probs(log_ref, rewards, n), log_ref, values)
        assert curve['kl'][i] == pytest.approx(point['kl'], abs=1e-10)
        for name in study_math.MEASURED:
            assert curve[name][i] == pytest.approx(point[name] - reference[name], abs=1e-10)


def test_proxies_and_snapshots_are_reused_and_a_new_pair_count_trains_only_its_own(tmp_path, monkeypatch):
    # What is tested is which stages run: the figure and the proxies' rank rate (2,000 prompts, the
    # reward tests' business) are left out, and every schedule is a few steps.
    monkeypatch.setattr(study, 'plot_overoptimisation', lambda results, method_label, runs, path: path)
    monkeypatch.setattr(pipeline, 'rank_rate', lambda model, seed, preference: 0.0)
    pipeline.sft_stage(tmp_path, SFTConfig(iters=2, batch_size=8), progress=False)
    config = study.OverOptConfig(pairs=(50, 60), betas=(0.0,), snapshot_every=1, prompts=1,
                                 reward=RewardConfig(iters=4, held_out_pairs=50))
    ppo = PPOConfig(iters=2, prompts_per_iter=4)
    name = Variant.of(replace(ppo, beta=0.0), 'ppo').name  # ppo_beta0_<hash of its settings>

    def made():
        return {path.name: path.stat().st_mtime_ns for path in tmp_path.glob('reward_*.pt')}

    first = study.overoptimisation(tmp_path, tmp_path / 'plots', config, ppo, progress=False)
    assert set(made()) == {'reward_pairs50.pt', 'reward_pairs60.pt', f'reward_pairs50_{name}.pt',
                           f'reward_pairs60_{name}.pt'}
    assert first[0]['curves'][name]['round'] == [0, 1, 2]  # the reference, then every round
    before = made()
    with monkeypatch.context() as rerun:  # everything current: no exact table is computed again
        for table in ('all_response_log_probs', 'all_response_rewards'):
            rerun.setattr(study_math, table, lambda *args, table=table: pytest.fail(f'{table} computed on a rerun'))
        again = study.overoptimisation(tmp_path, tmp_path / 'plots', config, ppo, progress=False)
    assert made() == before
    assert again[0]['curves'] == first[0]['curves']

    study.overoptimisation(tmp_path, tmp_path / 'plots', study.OverOptConfig(
        **{**config.__dict__, 'pairs': (50, 70)}), ppo, progress=False)
    after = made()
    kept = ['reward_pairs50.pt', f'reward_pairs50_{name}.pt', 'reward_pairs60.pt', f'reward_pairs60_{name}.pt']
    assert {path: after[path] for path in kept} == {path: before[path] for path in kept}
    assert {'reward_pairs70.pt', f'reward_pairs70_{name}.pt'} <= set(after)


@pytest.mark.parametrize('executor', ['process', pytest.param('dask', marks=pytest.mark.slow)])  # dask: `pytest -m slow`
def test_workers_give_the_numbers_of_a_serial_run_at_one_thread(executor, tmp_path, monkeypatch):
    if executor == 'dask':
        pytest.importorskip('distributed')
    monkeypatch.setattr(study, 'plot_overoptimisation', lambda results, method_label, runs, path: path)
    pipeline.sft_stage(tmp_path, SFTConfig(iters=2, batch_size=8), progress=False)
    config = study.OverOptConfig(pairs=(50, 60), betas=(0.0,), snapshot_every=1, prompts=1,
                                 reward=RewardConfig(iters=4, held_out_pairs=50))
    ppo = PPOConfig(iters=2, prompts_per_iter=4)
    runs = {}
    for workers, folder in ((1, tmp_path / 'serial'), (2, tmp_path / 'workers')):
        folder.mkdir()
        (folder / 'sft.pt').write_bytes((tmp_path / 'sft.pt').read_bytes())
        where = {'workers': 2, 'executor': executor} if workers == 2 else {}  # else here, one after another
        with one_thread():
            runs[workers] = study.overoptimisation(folder, tmp_path / 'plots', replace(config, **where), ppo,
                                                   progress=False)
    assert [proxy['curves'] for proxy in runs[2]] == [proxy['curves'] for proxy in runs[1]]
    assert len(runs[1]) == 2 and all(len(proxy['curves']) == 3 for proxy in runs[1])  # pi*, best-of-n, the run
    made = {workers: sorted(path.name for path in (tmp_path / folder).glob('reward_*.pt'))
            for workers, folder in ((1, 'serial'), (2, 'workers'))}
    assert made[2] == made[1] and len(made[1]) == 4
    for name in made[1]:  # the same weights, every one written by the main process
        serial, workers = (load_checkpoint(tmp_path / folder / name)['state_dict'] for folder in ('serial', 'workers'))
        assert all(torch.equal(serial[key], workers[key]) for key in serial)


def test_the_figure_draws_every_proxy_with_its_fits_peaks_and_snapshots(language_tables, tmp_path):
    log_ref, gold, valid = language_tables
    results = []
    for margin in (1.0, 20.0):  # two proxies: the gold reward itself, and a noisy one in units of 20
        noise = torch.randn(log_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        rewards = margin * gold + (margin > 1) * noise
        values = {'proxy': rewards / margin, 'gold': gold, 'gold_valid': gold * valid}
        optimum = study_math.optimum_curve(log_ref, rewards, values, study.BETAS)
        snapshots = {key: value[::10] for key, value in optimum.items()}  # stands in for PPO's snapshots
        curves = {'optimum': optimum, 'best_of_n': study_math.best_of_n_curve(log_ref, rewards, values, study.BEST_OF_N),
                  'ppo_beta0': snapshots}
        results.append({'name': f'margin{margin:g}', 'pairs': 100, 'margin': margin, 'curves': curves,
                        'fits': study_math.fits(curves), 'peaks': study_math.peaks(curves)})
    # As a rerun reads them back from overoptimisation.json: plain lists and numbers.
    path = study.plot_overoptimisation(json.loads(json.dumps(results)), 'PPO', [('ppo_beta0', 'PPO beta=0')],
                                       tmp_path / 'overoptimisation.png')
    assert_png(path, figures.FIGURE_SIZES['overoptimisation'])
