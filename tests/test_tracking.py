"""Metrics to a tracker: a run folder's logs replayed into TensorBoard (read back from its event files)
and through the wandb API (a fake wandb module records the calls); a tracker not installed, or a run
folder that is not one, is one line and exit status 2. No training: the run folder is written by hand."""
import sys
import types

import pytest

from mingpt.model import GPT
from toy_rlhf import cli, pipeline
from toy_rlhf.checkpoint import save_checkpoint
from toy_rlhf.files import jsonl_text
from toy_rlhf.policy import policy_config
from conftest import run_cli as run

# Each stage: (settings stored in its checkpoint, its log). An online method logs samples (its steps),
# the others iterations; the leaderboard keeps its cells a folder deeper.
STAGES = {
    'sft': ({'iters': 20, 'learning_rate': 0.001, 'versions': {'torch': '2.13'}},
            [{'iter': 0, 'loss': 2.4, 'lr': 0.0003}, {'iter': 10, 'loss': 2.0, 'lr': 0.0028}]),
    'ppo_beta1': ({'beta': 1.0, 'seed': 0, 'method': 'ppo', 'inputs': {'sft.pt': 'a1b2', 'reward.pt': 'c3d4'}},
                  [{'iter': 0, 'samples': 128, 'objective/kl': 0.0, 'gold/preference_rate': 0.26, 'note': 'text'},
                   {'iter': 1, 'samples': 256, 'objective/kl': 0.11, 'gold/preference_rate': 0.3}]),
    'seed0/first-digit/dpo_beta1': ({'beta': 1.0, 'method': 'dpo'}, [{'iter': 0, 'pairs': 64, 'loss': 0.69}]),
}


def write_run(folder, stages=STAGES):
    model = GPT(policy_config())
    for name, (settings, rows) in stages.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(folder / f'{name}.pt', model, 'policy', settings, metrics={})
        (folder / f'{name}.jsonl').write_text(jsonl_text(rows))
    return folder


def numbers(row):
    return {key: value for key, value in row.items() if key != 'note'}


def assert_one_line_error(result, *words):
    status, _, lines = result
    assert status == 2 and len(lines) == 1, lines
    assert 'Traceback' not in lines[0]
    for word in words:
        assert word in lines[0], lines


def test_tensorboard_holds_every_number_of_every_row_at_its_step_and_the_settings(tmp_path, capsys):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    write_run(tmp_path)
    assert run('track', [str(tmp_path)], capsys)[0] == 0
    assert run('track', [str(tmp_path)], capsys)[0] == 0  # a second replay replaces the first
    for name, (settings, rows) in STAGES.items():
        events = EventAccumulator(str(tmp_path / 'tensorboard' / name))
        events.Reload()
        steps = [row.get('samples', row['iter']) for row in rows]
        keys = set().union(*map(numbers, rows))
        assert set(events.Tags()['scalars']) == keys
        for key in keys:
            logged = [(event.step, event.value) for event in events.Scalars(key)]
            expected = [(step, row[key]) for step, row in zip(steps, rows) if key in row]
            assert [step for step, _ in logged] == [step for step, _ in expected]
            assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)
        table = events.Tensors('settings/text_summary')[0].tensor_proto.string_val[0].decode()
        assert all(f'| {key}' in table for key in settings)  # nested ones as versions.torch


class FakeWandb(types.ModuleType):
    """The calls the wandb API gets: init's arguments, then each run's logged rows and finish."""

    def __init__(self):
        super().__init__('wandb')
        self.runs = []

    def init(self, **arguments):
        run = types.SimpleNamespace(arguments=arguments, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, 'finished', True)
        self.runs.append(run)
        return run


@pytest.mark.parametrize('tracker', ['wandb', 'trackio'])
def test_the_wandb_api_gets_a_run_per_stage_with_its_settings_and_every_row(tracker, tmp_path, capsys, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, tracker, fake)
    monkeypatch.delenv('WANDB_MODE', raising=False)
    monkeypatch.delenv('WANDB_PROJECT', raising=False)
    write_run(tmp_path / 'myrun')
    assert run('track', [str(tmp_path / 'myrun'), '--to', tracker], capsys)[0] == 0
    by_name = {fake_run.arguments['name']: fake_run for fake_run in fake.runs}
    assert sorted(by_name) == sorted(f'myrun/{name}' for name in STAGES)
    for name, (settings, rows) in STAGES.items():
        logged = by_name[f'myrun/{name}']
        assert logged.arguments['config'] == settings and logged.arguments['project'] == 'toy-rlhf'
        assert logged.logged == [(row.get('samples', row['iter']), numbers(row)) for row in rows]
        assert logged.finished
        if tracker == 'wandb':  # offline by default: nothing asks for a login
            assert logged.arguments['mode'] == 'offline' and logged.arguments['group'] == 'myrun'
        else:  # trackio takes no mode, group or dir
            assert set(logged.arguments) == {'project', 'name', 'config'}


def test_wandb_mode_and_project_come_from_the_environment(tmp_path, capsys, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    monkeypatch.setenv('WANDB_MODE', 'online')
    monkeypatch.setenv('WANDB_PROJECT', 'mine')
    write_run(tmp_path, {'sft': STAGES['sft']})
    assert run('track', [str(tmp_path), '--to', 'wandb'], capsys)[0] == 0
    (only,) = fake.runs
    assert (only.arguments['mode'], only.arguments['project']) == ('online', 'mine')


def test_a_command_given_track_replays_its_run_folder_once_it_is_done(tmp_path, capsys, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    # The SFT stage, without training: a checkpoint and log written by hand.
    monkeypatch.setattr(pipeline, 'sft_stage', lambda run_dir, config, progress: write_run(run_dir, {'sft': STAGES['sft']}))
    assert run('sft', ['--run-dir', str(tmp_path / 'r'), '--track', 'wandb', '--quiet'], capsys)[0] == 0
    assert [(fake_run.arguments['name'], fake_run.logged) for fake_run in fake.runs] == \
        [('r/sft', [(row['iter'], row) for row in STAGES['sft'][1]])]


@pytest.mark.parametrize('tracker', ['tensorboard', 'wandb'])
def test_a_tracker_not_installed_is_one_line_naming_its_extra_before_any_training(tracker, tmp_path, capsys,
                                                                                  monkeypatch):
    for module in ('tensorboard', 'torch.utils.tensorboard', 'wandb'):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as with the package absent
    write_run(tmp_path / 'run')
    assert_one_line_error(run('track', [str(tmp_path / 'run'), '--to', tracker], capsys),
                          f'pip install -e ".[{tracker}]"')
    assert_one_line_error(run('all', ['--run-dir', str(tmp_path / 'new'), '--track', tracker, '--quiet'], capsys),
                          f'pip install -e ".[{tracker}]"')
    assert not (tmp_path / 'new').exists()


def test_a_folder_that_is_not_a_finished_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', FakeWandb())
    assert_one_line_error(run('track', [str(tmp_path / 'missing'), '--to', 'wandb'], capsys), 'missing', 'no such')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'stray.jsonl').write_text('{"iter": 0}\n')  # a log without its checkpoint
    assert_one_line_error(run('track', [str(tmp_path / 'empty'), '--to', 'wandb'], capsys), 'not a run folder')
    write_run(tmp_path / 'broken')
    log = tmp_path / 'broken' / 'ppo_beta1.jsonl'
    log.write_text(log.read_text() + '{"iter": 2, "samp\n')
    assert_one_line_error(run('track', [str(tmp_path / 'broken'), '--to', 'wandb'], capsys),
                          'ppo_beta1.jsonl, line 3', 'not JSON')
    log.write_text('[1, 2]\n')
    assert_one_line_error(run('track', [str(tmp_path / 'broken'), '--to', 'wandb'], capsys),
                          'line 1', 'not a JSON object')


def test_help_lists_every_flag_of_track_and_the_track_flag_of_every_command_that_trains(capsys):
    for command, spec in cli.commands().items():
        parser = cli.build_parser(command, f'toy-rlhf {command}')
        flags = [flag for action in parser._actions for flag in action.option_strings]
        assert ('--track' in flags) == spec.writes_run_dir, command
        if command == 'track':
            assert {'--to', '--logdir'} <= set(flags)
            with pytest.raises(SystemExit):
                parser.parse_args(['--help'])
            shown = capsys.readouterr().out
            assert 'RUN_DIR' in shown and all(flag in shown for flag in flags)
            assert 'pip install -e ".[tensorboard]"' in ' '.join(shown.split())
