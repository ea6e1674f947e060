"""The off-policy study (toy_rlhf/studies/off_policy.py): each method turns the knobs its config has,
a correction where the sampler is the policy is the on-policy run, the table shows the median and
range over seeds, and a tiny study on a run folder writes its files and reuses its checkpoints."""
import json
import math
from dataclasses import asdict, replace

import pytest

from conftest import run_cli

from toy_rlhf import run as run_module
from toy_rlhf.checkpoint import save_checkpoint
from toy_rlhf.methods import METHODS
from toy_rlhf.studies import off_policy as study
from toy_rlhf.studies.off_policy import (CORRECTIONS, RATIO_VARIANTS, OffPolicyStudyConfig, base_configs, cells,
                                         method_schedules, off_policy_report, plot_off_policy)

CONFIG = OffPolicyStudyConfig()
SCHEDULE = method_schedules(CONFIG)
CELLS = cells(CONFIG, SCHEDULE)  # (method, knob, value, label, seed, Variant) of the default study


def labels_of(method, knob):
    return list(dict.fromkeys(cell[3] for cell in CELLS if cell[:2] == (method, knob)))


def variant_of(method, knob, value, label, seed=0):
    [variant] = [cell[-1] for cell in CELLS if cell[:5] == (method, knob, value, label, seed)]
    return variant


def test_ppo_and_grpo_turn_every_ratio_variant_and_correction_rloo_its_own_sequence_ratio():
    ratios, corrections = [label for label, _ in RATIO_VARIANTS], [label for label, _ in CORRECTIONS]
    for method in ('ppo', 'grpo'):
        assert labels_of(method, 'epochs') == ratios
        assert labels_of(method, 'staleness') == labels_of(method, 'temperature') == corrections
    assert labels_of('rloo', 'epochs') == ['sequence clip']
    # RLOO's weight is the whole response's anyway: no correction_level, so no 'tis (sequence)' row.
    assert labels_of('rloo', 'staleness') == labels_of('rloo', 'temperature') == ['none', 'tis', 'mis', 'icepop']
    rloo = [dict(cell[-1].settings) for cell in CELLS if cell[0] == 'rloo']
    assert not any('ratio' in settings or 'correction_level' in settings for settings in rloo)


def test_online_dpo_when_named_turns_the_sampler_with_no_correction_and_its_own_loss_over_epochs():
    config = OffPolicyStudyConfig(methods=('online_dpo',), seeds=(0,))
    online = cells(config, method_schedules(config))
    labels = {knob: sorted({cell[3] for cell in online if cell[1] == knob}) for knob in config.knobs}
    assert labels == {'epochs': ['its own loss'], 'staleness': ['none'], 'temperature': ['none']}
    stale = [cell[-1].config() for cell in online if cell[1:3] == ('staleness', 2)]
    assert [(c.staleness, c.anneal_lr) for c in stale] == [(2, True)]  # its quick schedule's constant step annealed


def test_distillation_sppo_and_nash_md_when_named_turn_the_sampler_nash_md_with_its_corrections():
    config = OffPolicyStudyConfig(methods=('distill', 'sppo', 'nash_md'), seeds=(0,))
    named = cells(config, method_schedules(config))
    labels = {(method, knob): sorted({cell[3] for cell in named if cell[:2] == (method, knob)})
              for method in config.methods for knob in config.knobs}
    for method in ('distill', 'sppo'):
        assert [labels[method, knob] for knob in config.knobs] == [['its own loss'], ['none'], ['none']]
    # Nash-MD's weight is the whole response's: every correction but the per-token level's.
    assert labels['nash_md', 'staleness'] == labels['nash_md', 'temperature'] == ['icepop', 'mis', 'none', 'tis']
    bases = base_configs(config, method_schedules(config))
    assert bases['distill'].anneal_lr and not hasattr(bases['sppo'], 'anneal_lr')
    # --schedule default: each method's own defaults, not its quick schedule.
    defaults = base_configs(replace(config, schedule='default'), method_schedules(replace(config, schedule='default')))
    assert all(defaults[name] == METHODS[name].config(beta=config.beta) for name in ('sppo', 'nash_md'))
    assert bases['nash_md'] != defaults['nash_md']


def test_every_cell_is_trained_on_every_seed_with_grpos_fixes_and_the_quick_schedule_scaled():
    assert sorted({cell[4] for cell in CELLS}) == [0, 1, 2]
    assert variant_of('ppo', 'epochs', 4, 'gspo', seed=2).config().seed == 2
    grpo = variant_of('grpo', 'staleness', 2, 'tis').config()
    assert (grpo.scale_rewards, grpo.kl, grpo.staleness, grpo.sampler_correction) == ('none', 'bias-corrected-k3', 2, 'tis')
    doubled = base_configs(OffPolicyStudyConfig(iters_scale=2), SCHEDULE)
    assert {name: config.iters for name, config in doubled.items()} == {
        name: 2 * dict(SCHEDULE[name])['iters'] for name in CONFIG.methods}
    assert all(config.anneal_lr for config in doubled.values())  # PPO's quick schedule's constant step too


def test_top_k_when_named_truncates_the_sampler_under_every_correction_from_the_on_policy_run():
    config = OffPolicyStudyConfig(methods=('ppo',), knobs=('top_k',), seeds=(0,))
    truncated = cells(config, method_schedules(config))
    assert sorted({(cell[2], cell[3]) for cell in truncated}) == sorted(
        (k, label) for k in (0, 4, 2) for label, _ in CORRECTIONS)
    assert {cell[-1] for cell in truncated if cell[2] == 0} == {variant_of('ppo', 'staleness', 0, 'none')}
    top_2 = [cell[-1].config() for cell in truncated if cell[2:4] == (2, 'tis')]
    assert [(c.sampler_top_k, c.sampler_correction) for c in top_2] == [(2, 'tis')]


def test_precision_when_named_rounds_the_samplers_logits_under_every_correction_from_the_on_policy_run():
    config = OffPolicyStudyConfig(methods=('ppo',), knobs=('precision',), seeds=(0,))
    rounded = cells(config, method_schedules(config))
    assert sorted({(cell[2], cell[3]) for cell in rounded}) == sorted(
        (dtype, label) for dtype in ('fp32', 'bf16', 'fp16') for label, _ in CORRECTIONS)
    assert {cell[-1] for cell in rounded if cell[2] == 'fp32'} == {variant_of('ppo', 'staleness', 0, 'none')}
    bf16 = [cell[-1].config() for cell in rounded if cell[2:4] == ('bf16', 'mis')]
    assert [(c.sampler_precision, c.sampler_correction) for c in bf16] == [('bf16', 'mis')]


def test_a_correction_where_the_sampler_is_the_policy_is_the_on_policy_run():
    for method in ('ppo', 'rloo', 'grpo'):
        on_policy = variant_of(method, 'staleness', 0, 'none')
        for knob, value in (('staleness', 0), ('temperature', 1.0)):
            assert {variant_of(method, knob, value, label) for label in labels_of(method, knob)} == {on_policy}
        assert variant_of(method, 'staleness', 2, 'tis') != variant_of(method, 'staleness', 2, 'none')
        first_ratio = labels_of(method, 'epochs')[0]
        assert variant_of(method, 'epochs', 1, first_ratio) == on_policy  # one run, shared by every knob
    assert variant_of('ppo', 'staleness', 0, 'tis').config().sampler_correction == 'none'


def hand_made_record():
    """Two methods, the staleness knob, three seeds: distance = method's base + value / 10 + seed / 100."""
    rows = [{'method': method, 'knob': 'staleness', 'value': value, 'variant': label, 'seed': seed,
             'distance': base + value / 10 + seed / 100, 'seconds': 1.0}
            for method, base, labels in (('ppo', 0.2, labels_of('ppo', 'staleness')),
                                         ('rloo', 0.3, labels_of('rloo', 'staleness')))
            for value in (0, 2, 4) for label in labels for seed in (0, 1, 2)]
    settings = asdict(OffPolicyStudyConfig(methods=('ppo', 'rloo'), knobs=('staleness',)))
    return {'preference': 'first-digit', 'settings': settings, 'targets': {'ppo': 'pi*', 'rloo': 'pi*'},
            'reference_distance': {'ppo': 5.0, 'rloo': 5.0},
            'on_policy': {'ppo': [0.2, 0.21, 0.22], 'rloo': [0.3, 0.31, 0.32]}, 'rows': rows}


def test_the_report_has_a_table_per_method_and_knob_of_medians_and_ranges_over_seeds(tmp_path):
    report = off_policy_report(hand_made_record())
    assert report.startswith("# Off-policy on purpose against each method's target (beta 1, first-digit)")
    assert 'Targets: PPO pi* (the SFT policy 5.000); RLOO pi* (the SFT policy 5.000).' in report
    assert '## PPO, staleness' in report and '## RLOO, staleness' in report and 'epochs' not in report
    assert '| staleness | none | tis | mis | icepop | tis (sequence) |' in report
    assert '| staleness | none | tis | mis | icepop |\n' in report
    assert '| 2 | 0.4100 [0.4000, 0.4200] | 0.4100 [0.4000, 0.4200] |' in report  # PPO: 0.2 + 0.2 + seed / 100
    assert '| 4 | 0.7100 [0.7000, 0.7200] |' in report  # RLOO
    assert report.count('\n| 0 |') == report.count('\n| 2 |') == report.count('\n| 4 |') == 2
    assert 'On-policy: PPO 0.2100 [0.2000, 0.2200]; RLOO 0.3100 [0.3000, 0.3200]' in report
    assert plot_off_policy(hand_made_record(), tmp_path / 'off_policy.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize('flags, message', [
    (['--methods', 'ppo', 'dpo'], "--methods: unsupported 'dpo'; supported: ppo, rloo, grpo"),
    (['--knobs', 'lag'], "--knobs: unsupported 'lag'; supported: epochs, staleness, temperature, top_k, precision"),
    (['--seeds', '1', '1'], '--seeds: each value once')])
def test_a_method_or_knob_the_study_does_not_turn_is_refused_in_one_line(flags, message, tmp_path, capsys):
    status, _, err = run_cli('off-policy', ['--run-dir', str(tmp_path / 'r'), *flags], capsys)
    assert status == 2 and len(err) == 1 and message in err[0]


def test_a_tiny_study_writes_its_files_and_a_rerun_reuses_every_checkpoint(sft_policy, reward_model, tmp_path,
                                                                         monkeypatch):
    run_dir = tmp_path / 'runs' / 'off_policy'
    save_checkpoint(run_dir / 'sft.pt', sft_policy, 'policy', {}, {})
    save_checkpoint(run_dir / 'reward.pt', reward_model, 'reward', {}, {})
    # One knob at two values, one seed, tiny rollouts: the study is tested, not what is learned; and
    # each trained policy's own sampled evaluation on a few prompts.
    monkeypatch.setattr(study, 'KNOBS', (('staleness', (0, 2), CORRECTIONS, 'staleness'),))
    monkeypatch.setattr(run_module, 'EVALUATION_PROMPTS', 20)
    config = OffPolicyStudyConfig(seeds=(1,), prompts=5)
    schedule = {name: (('iters', 2), ('prompts_per_iter', 4)) for name in config.methods}
    record = study.off_policy(run_dir, tmp_path / 'plots', config, progress=False, schedule=schedule)
    # staleness 0 is one run per method, whatever the correction; staleness 2 one per correction.
    assert len(record['rows']) == 2 * (5 + 4 + 5)
    assert len(list(run_dir.glob('*_seed1_*.pt'))) == 3 + (5 + 4 + 5)
    assert all(math.isfinite(row['distance']) and row['distance'] > 0 for row in record['rows'])
    assert json.loads((run_dir / 'off_policy.json').read_text())['rows'] == record['rows']
    assert '## GRPO, staleness' in (run_dir / 'off_policy.md').read_text()
    assert (tmp_path / 'plots' / 'off_policy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    made = {path: path.stat().st_mtime_ns for path in run_dir.glob('*.pt')}

    def trains(*args, **kwargs):
        raise AssertionError('a rerun trains nothing')
    monkeypatch.setattr(run_module, 'train_variant', trains)
    again = study.off_policy(run_dir, tmp_path / 'plots', config, progress=False, schedule=schedule)
    assert {path: path.stat().st_mtime_ns for path in run_dir.glob('*.pt')} == made
    assert [row['distance'] for row in again['rows']] == pytest.approx([row['distance'] for row in record['rows']])
