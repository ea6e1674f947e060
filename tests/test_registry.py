"""The registry of methods is the one place a method is named: a method registered here (and nowhere
else) has a command, flags, a checkpoint name, a row in the comparison and a point in its figure; and
every field of every config is a flag of the same name, with the field's comment as its help."""
import json
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Literal

import matplotlib.pyplot as plt
import pytest
import torch

from mingpt.model import GPT
from toy_rlhf import cli, figures, pipeline
from toy_rlhf.checkpoint import how_to_make, save_checkpoint
from toy_rlhf.flags import NonNegativeFloat, PositiveFloat, PositiveInt, Seed, config_from_args, field_comments
from toy_rlhf.methods import METHODS, Method, method_of_stem, register, rollout, unregister
from toy_rlhf.policy import policy_config
from toy_rlhf.reward import RewardConfig, reward_model_config
from toy_rlhf.sft import SFTConfig
from toy_rlhf.studies import credit as credit_module
from toy_rlhf.studies.credit import CreditConfig, credit_assignment
from toy_rlhf.studies.main import RunAllConfig
from toy_rlhf.studies.methods import CompareConfig, SweepConfig, compare, sweep
from toy_rlhf.studies.overoptimisation import OverOptConfig, overoptimisation


@dataclass
class DummyConfig:
    learning_rate: PositiveFloat = 1e-3  # unused by the stand-in's update, needed by start_training
    beta: NonNegativeFloat = 1.0  # KL strength
    step: PositiveFloat = 0.5  # how far each round moves the output head
    iters: PositiveInt = 1  # rounds
    seed: Seed = 0  # random seed


def train_dummy(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """A stand-in online method that keeps the registry's contract: each round one rollout, the
    output head shifted by `step` (no learning), the rollout's row and what measure returns logged."""
    actor, reference, _, generator = rollout.start_training(sft_policy, config)
    rows = []
    for iteration in range(config.iters):
        batch = rollout.rollout(actor, reference, reward_model, rollout.prompt_groups(
            rollout.RolloutConfig(prompts_per_iter=4), generator), generator, preference)
        with torch.no_grad():
            actor.lm_head.weight.add_(config.step * torch.randn_like(actor.lm_head.weight) * 0.01)
        measured = measure(iteration + 1, actor) if measure is not None else {}
        rows.append({'iter': iteration, **rollout.rollout_row(batch, config.beta, 16 * (iteration + 1), 0.0),
                     **measured})
    return actor.eval(), rows


@pytest.fixture
def dummy():
    method = register(Method(name='dummy', label='Dummy', summary='a stand-in registered by a test',
                             config=DummyConfig, train=train_dummy, needs_reward_model=True,
                             color='#000000', marker='h'))
    yield method
    unregister('dummy')


def test_a_registered_method_gets_a_command_with_its_fields_as_flags(dummy, capsys):
    assert 'dummy' in cli.commands()
    with pytest.raises(SystemExit):
        cli.main(['--help'])
    assert 'a stand-in registered by a test' in capsys.readouterr().out
    parser = cli.build_parser('dummy', 'toy-rlhf dummy')
    args = parser.parse_args(['--step', '2', '--beta', '0.5'])
    assert config_from_args(args, DummyConfig) == DummyConfig(beta=0.5, step=2.0)
    assert 'how far each round moves the output head' in parser.format_help()
    compare_flags = cli.build_parser('compare', 'toy-rlhf compare').format_help()
    assert '--dummy.step' in compare_flags


def test_a_registered_method_names_its_checkpoints(dummy):
    assert method_of_stem('dummy_beta0.3') is dummy
    assert how_to_make('runs/x/dummy_beta0.3.pt') == 'toy-rlhf dummy --beta 0.3 --run x'
    assert method_of_stem('sft') is None and method_of_stem('unknown_beta1') is None


def test_a_registered_method_appears_in_the_comparison_and_the_sweep_tables_and_figures(dummy, tmp_path, monkeypatch):
    run_dir = tmp_path / 'runs' / 'default'
    torch.manual_seed(0)
    save_checkpoint(run_dir / 'sft.pt', GPT(policy_config()), 'policy', {}, {})
    save_checkpoint(run_dir / 'reward.pt', GPT(reward_model_config()), 'reward', {}, {})
    legends = []
    real_save = figures.save

    def save(fig, path):
        legends.extend(text.get_text() for legend in fig.legends for text in legend.get_texts())
        return real_save(fig, path)
    monkeypatch.setattr(figures, 'save', save)
    rows = compare(run_dir, tmp_path / 'plots', CompareConfig(methods=('dummy', 'best_of_n'), prompts=2),
                   progress=False)
    assert [row['method'] for row in rows] == ['dummy', 'best_of_n']
    for row in rows:
        assert row['J'] <= row['J_star'] + 1e-9  # exact: no policy beats the optimum
    assert '| Dummy beta=1 |' in (run_dir / 'methods.md').read_text()
    assert json.loads((run_dir / 'methods.json').read_text())['policies'][0]['label'] == 'Dummy beta=1'
    assert 'Dummy beta=1' in legends
    assert (tmp_path / 'plots' / 'methods.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    legends.clear()
    swept = sweep(run_dir, tmp_path / 'plots', SweepConfig(methods=('dummy',), betas=(1.0, 0.0), prompts=2),
                  progress=False)
    assert [row['label'] for row in swept] == ['Dummy beta=1', 'Dummy beta=0']
    assert '| Dummy beta=0 |' in (run_dir / 'sweep.md').read_text()
    assert 'Dummy beta=0' in legends
    assert plt.get_fignums() == []


def test_a_registered_online_method_appears_in_the_credit_study_and_its_figure(dummy, tmp_path, monkeypatch):
    run_dir = tmp_path / 'runs' / 'default'
    torch.manual_seed(0)
    save_checkpoint(run_dir / 'sft.pt', GPT(policy_config()), 'policy', {}, {})
    save_checkpoint(run_dir / 'reward.pt', GPT(reward_model_config()), 'reward', {}, {})
    # The study trains every online method of the registry; here the stand-in alone, to keep it short.
    monkeypatch.setattr(credit_module, 'METHODS', {'dummy': dummy})
    result = credit_assignment(run_dir, tmp_path / 'plots', CreditConfig(runs=1, iters=2, measure_every=1, prompts=1),
                               progress=False)
    assert list(result['variants']) == ['Dummy']
    (run,) = result['variants']['Dummy']['runs']
    assert run['gap_closed'] <= 1 + 1e-9  # measured exactly, every round
    assert '| Dummy |' in (run_dir / 'credit_assignment.md').read_text()


def test_a_registered_online_method_is_trained_on_the_proxies_of_the_overoptimisation_study(dummy, tmp_path,
                                                                                            monkeypatch):
    run_dir = tmp_path / 'runs' / 'default'
    torch.manual_seed(0)
    save_checkpoint(run_dir / 'sft.pt', GPT(policy_config()), 'policy', {}, {})
    monkeypatch.setattr(pipeline, 'rank_rate', lambda model, seed, preference: 0.0)  # the reward tests' business
    legends = []
    real_save = figures.save

    def save(fig, path):
        legends.extend(text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts())
        return real_save(fig, path)
    monkeypatch.setattr(figures, 'save', save)
    config = OverOptConfig(pairs=(40,), method='dummy', betas=(0.0,), snapshot_every=1, prompts=1,
                           reward=RewardConfig(iters=2, held_out_pairs=40))
    [proxy] = overoptimisation(run_dir, tmp_path / 'plots', config, progress=False)
    assert proxy['curves']['dummy_beta0']['round'] == [0, 1]  # the reference, then its one round, measured
    assert (run_dir / 'reward_pairs40_dummy_beta0.pt').is_file()
    assert '`dummy_betaB` Dummy snapshots' in (run_dir / 'overoptimisation.md').read_text()
    assert 'Dummy beta=0 snapshots (open: proxy)' in legends


# --- every setting reachable ----------------------------------------------------------------------

def other_value(hint, default):
    """A valid value of a field annotated `hint` that differs from its default, as command-line words."""
    if typing.get_origin(hint) is tuple:
        items = [other_value(typing.get_args(hint)[0], item)[0] for item in default]
        return items or other_value(typing.get_args(hint)[0], 1)
    if typing.get_origin(hint) is Literal:
        return [next(choice for choice in typing.get_args(hint) if choice != default)]
    if hint is bool:
        return ['--no-flag'] if default else ['--flag']
    if typing.get_origin(hint) is typing.Annotated:
        kind, bounds = typing.get_args(hint)[:2]
        for candidate in (default + 1, default - 1, default / 2) if default else (1, 0.5):
            value = kind(candidate)
            low_ok = value > bounds.low if bounds.low_open else value >= bounds.low
            if value != default and low_ok and value <= bounds.high:
                return [str(value)]
    return [str(default) + 'x']


def config_classes():
    """(command, config class, flag prefix, fields set by the command itself) of every config."""
    for command, study in (('all', RunAllConfig), ('overopt', OverOptConfig)):
        stages = [field.name for field in fields(study) if is_dataclass(field.type)]
        yield command, study, '', stages
        for stage in stages:
            yield command, type(getattr(study(), stage)), stage, study.SET_BY_STUDY
    yield 'sweep', SweepConfig, '', ()
    yield 'sft', SFTConfig, '', ()
    yield 'reward', RewardConfig, '', ()
    yield 'compare', CompareConfig, '', ()
    yield 'credit', CreditConfig, '', ()
    for method in (method for method in METHODS.values() if method.trains_online_on_a_reward_model):
        yield 'overopt', method.config, method.name, ('seed', 'beta', 'preference')
    for method in METHODS.values():
        if method.train is not None:
            yield method.name, method.config, '', ()
        yield 'compare', method.config, method.name, ('seed', 'beta', 'preference')


@pytest.mark.parametrize('command, config_class, prefix, skipped',
                         list(config_classes()), ids=lambda value: getattr(value, '__name__', str(value)))
def test_every_config_field_is_a_flag_named_after_it_with_its_comment_as_help(command, config_class, prefix,
                                                                             skipped):
    parser = cli.build_parser(command, f'toy-rlhf {command}')
    helps = {flag: action.help for action in parser._actions for flag in action.option_strings}
    hints = typing.get_type_hints(config_class, include_extras=True)
    comments = field_comments(config_class)
    for field in fields(config_class):
        if field.name in skipped:
            continue
        flag = '--' + (f'{prefix}.' if prefix else '') + field.name.replace('_', '-')
        assert comments[field.name], f'{config_class.__name__}.{field.name} has no comment to be its help'
        assert helps[flag].startswith(comments[field.name]), flag
        default = getattr(config_class(), field.name)
        words = other_value(hints[field.name], default)
        argv = [flag.replace('--', '--no-', 1) if words == ['--no-flag'] else flag] if hints[field.name] is bool \
            else [flag, *words]
        value = getattr(config_from_args(parser.parse_args(argv), config_class, prefix), field.name)
        assert value != default, flag
