"""The one-command pipeline at the quick schedule: files, reuse, byte-for-byte reproducibility,
interruption and numerical faults; and the beta sweep run on its checkpoints."""
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toy_rlhf import cli, pipeline
from toy_rlhf.checkpoint import load_checkpoint
from toy_rlhf.files import jsonl_text
from toy_rlhf.methods import METHODS, rollout
from toy_rlhf.methods.dpo import DPOConfig
from toy_rlhf.methods.ppo import PPOConfig
from toy_rlhf.reward import train_reward
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.run import Run, Variant
from toy_rlhf.run_dir import LOCK
from toy_rlhf.sft import train_sft
from toy_rlhf.studies.main import RunAllConfig, config_from_flags, quick_schedule, run_all, stage_configs
from toy_rlhf.studies.methods import SweepConfig, sweep
from toy_rlhf.training import TrainingError

SCRIPTS = Path(__file__).resolve().parent.parent / 'scripts'
FIGURES = ('sft_loss', 'reward_model', 'ppo_curves', 'next_token_probs', 'kl_by_position', 'attention',
           'first_token')


# The quick schedule cut further: what these tests check is the pipeline around the stages, not what
# they learn. The same schedule as command-line flags, for the tests that run the main command.
TINY = {'sft': {'iters': 20}, 'reward': {'iters': 20, 'pairs': 256, 'held_out_pairs': 128},
        'ppo': {'iters': 3, 'prompts_per_iter': 16}}
TINY_FLAGS = [word for stage, settings in TINY.items() for name, value in settings.items()
              for word in (f"--{stage}.{name.replace('_', '-')}", str(value))]


def tiny_schedule():
    config = quick_schedule(RunAllConfig())
    return dataclasses.replace(config, **{stage: dataclasses.replace(getattr(config, stage), **settings)
                                          for stage, settings in TINY.items()})


# PPO's checkpoints at beta 1 and 0: the tiny schedule's settings differ from PPO's defaults, so their
# names carry a hash of them (toy_rlhf.methods.Method.stem).
PPO_STEMS = [METHODS['ppo'].stem(config) for config in stage_configs(tiny_schedule())['ppo'].values()]
CHECKPOINTS = ('sft.pt', 'reward.pt', *(f'{stem}.pt' for stem in PPO_STEMS))


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    """One pipeline run at the tiny schedule: (run folder, plots folder, printed output)."""
    import contextlib
    import io
    root = tmp_path_factory.mktemp('quick')
    run_dir, plots_dir, printed = root / 'runs' / 'a', root / 'plots', io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_all(run_dir, plots_dir, tiny_schedule(), progress=False)
    return run_dir, plots_dir, printed.getvalue()


def test_the_quick_pipeline_writes_every_checkpoint_figure_and_report(quick_run):
    run_dir, plots_dir, _ = quick_run
    for name in CHECKPOINTS:
        assert (run_dir / name).stat().st_size > 0
    for name in FIGURES:
        assert (plots_dir / f'{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    for name in ('report.md', 'metrics.json', 'timings.json'):
        assert (run_dir / name).stat().st_size > 0


def test_metrics_json_holds_no_times_dates_or_paths(quick_run):
    run_dir, _, _ = quick_run
    text = (run_dir / 'metrics.json').read_text()
    assert 'seconds' not in text
    assert str(run_dir.parent.parent) not in text
    assert not re.search(r'\d{4}-\d{2}-\d{2}', text)


def test_the_report_table_holds_the_numbers_of_metrics_json(quick_run):
    run_dir, _, _ = quick_run
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    report = (run_dir / 'report.md').read_text()
    for label, values in metrics['policies'].items():
        row = next(line for line in report.splitlines() if line.startswith(f'| {label} |'))
        cells = [cell.strip() for cell in row.strip('|').split('|')][1:]
        assert cells[0] == f"{values['preference_rate']:.2%}"
        assert cells[1] == f"{values['fidelity']:.2%}"
        assert cells[2] == f"{values['gold_rate']:.2%}"
        assert cells[3] == f"{values['kl_to_reference']:.3f}"
        assert cells[4] == f"{values['kl_to_aligned']:.3f}"
    assert f"{metrics['sft']['language_kl']:.4f}" in report


RECIPES = {name: preference.recipes['ppo'] for name, preference in PREFERENCES.items() if 'ppo' in preference.recipes}


def test_some_built_in_preference_carries_a_ppo_recipe_and_first_digit_none():
    assert RECIPES and 'first-digit' not in RECIPES
    assert all(set(recipe) <= {field.name for field in dataclasses.fields(PPOConfig)} for recipe in RECIPES.values())


@pytest.mark.parametrize('name', [*RECIPES, 'first-digit'])
def test_a_preferences_ppo_recipe_sets_ppos_defaults_in_the_main_command_and_flags_still_win(name, tmp_path):
    recipe = RECIPES.get(name, {})
    parser = cli.build_parser('all', 'toy-rlhf all')
    flags = ['--run-dir', str(tmp_path), '--preference', name]
    assert config_from_flags(parser.parse_args(flags)).ppo == PPOConfig(**recipe)
    assert config_from_flags(parser.parse_args([*flags, '--ppo.iters', '7'])).ppo == PPOConfig(**{**recipe, 'iters': 7})
    quick = config_from_flags(parser.parse_args([*flags, '--quick'])).ppo  # a smoke test stays one
    assert (quick.iters, quick.prompts_per_iter, quick.warm_start_prompts) == (6, 32, 64)
    assert quick.warm_start_n == recipe.get('warm_start_n', 0)


@pytest.mark.parametrize('name', [*RECIPES, 'first-digit'])
def test_a_preferences_ppo_recipe_sets_the_defaults_of_toy_rlhf_ppo_too(name, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(Run, 'train', lambda run, variants: trained.extend(variants))
    command = cli.commands()['ppo']
    flags = ['--run-dir', str(tmp_path), '--preference', name]
    for argv in (flags, [*flags, '--learning-rate', '1e-4']):
        args = cli.build_parser('ppo', 'toy-rlhf ppo').parse_args(argv)
        args.progress = False  # what cli.prepare sets from --quiet
        command.run(args)
    recipe = RECIPES.get(name, {})
    assert [variant.config() for variant in trained] == [PPOConfig(**recipe),
                                                         PPOConfig(**{**recipe, 'learning_rate': 1e-4})]


def test_every_stage_retrained_with_the_same_seed_gives_the_same_weights_and_history():
    # With the reuse run of the Ctrl-C test (every stage reused, metrics.json the same byte for
    # byte), this says a fresh run with the same seed repeats every number. Tiny schedules: what is
    # tested is determinism, not quality.
    configs = stage_configs(tiny_schedule())
    sft_config = dataclasses.replace(configs['sft'], iters=4, batch_size=16, warmup_iters=1)
    reward_config = dataclasses.replace(configs['reward'], iters=4, pairs=64, held_out_pairs=32)
    ppo_config = dataclasses.replace(configs['ppo'][1.0], iters=2, prompts_per_iter=8)

    def train_every_stage():
        policy, sft_history = train_sft(sft_config, progress=False)
        reward_model, reward_history = train_reward(policy, reward_config, progress=False)
        actor, ppo_history = METHODS['ppo'].train(policy, reward_model=reward_model, config=ppo_config,
                                                  preference=PREFERENCES['first-digit'],
                                                  progress=False)
        untimed = [{key: value for key, value in row.items() if not key.startswith('time/')} for row in ppo_history]
        return [policy, reward_model, actor], [sft_history, reward_history, untimed]

    (models, histories), (models_again, histories_again) = train_every_stage(), train_every_stage()
    assert histories == histories_again
    for model, again in zip(models, models_again):
        weights, weights_again = model.state_dict(), again.state_dict()
        assert all(torch.equal(weights[key], weights_again[key]) for key in weights)


def test_a_stage_killed_between_its_checkpoint_and_its_log_gets_its_own_log_back(quick_run, tmp_path, monkeypatch):
    run_dir, _, _ = quick_run
    copy = tmp_path / 'runs' / 'a'
    shutil.copytree(run_dir, copy)
    longer = dataclasses.replace(stage_configs(tiny_schedule())['sft'], iters=3, batch_size=8)
    real_write_text = pipeline.write_text

    def killed_before_the_log(path, text):
        if str(path).endswith('.jsonl'):
            raise KeyboardInterrupt
        real_write_text(path, text)

    monkeypatch.setattr(pipeline, 'write_text', killed_before_the_log)
    with pytest.raises(KeyboardInterrupt):
        pipeline.sft_stage(copy, longer, progress=False)
    monkeypatch.undo()
    history = load_checkpoint(copy / 'sft.pt')['history']
    assert (copy / 'sft.jsonl').read_text() != jsonl_text(history)  # the old run's log
    timing = pipeline.ensure_stage(copy, 'sft', longer, (), pipeline.sft_stage, progress=False)
    assert timing['reused']
    assert (copy / 'sft.jsonl').read_text() == jsonl_text(history)


def test_a_changed_sft_model_makes_the_reward_model_and_ppo_which_start_from_it_stale(quick_run, tmp_path):
    # What run_all retrains is what current_checkpoint refuses (the retraining itself is the fresh
    # run of the reuse test).
    run_dir, _, _ = quick_run
    copy = tmp_path / 'runs' / 'a'
    shutil.copytree(run_dir, copy)
    configs = stage_configs(tiny_schedule())
    ppo_inputs = (copy / 'sft.pt', copy / 'reward.pt')
    stages = {'sft': lambda: pipeline.provenance(configs['sft']),
              'reward': lambda: pipeline.provenance(configs['reward'], (copy / 'sft.pt',)),
              **{f'ppo beta={beta:g}': functools.partial(pipeline.provenance, ppo, ppo_inputs, 'first-digit')
                 for beta, ppo in configs['ppo'].items()}}
    names = dict(zip(stages, CHECKPOINTS))

    def current():  # the provenance as it is now: the inputs' fingerprints read again
        return {stage: pipeline.current_checkpoint(copy / names[stage], made_from()) is not None
                for stage, made_from in stages.items()}

    assert all(current().values())
    # The same settings, other weights (as another thread count could give): SFT itself is current.
    checkpoint = torch.load(copy / 'sft.pt', weights_only=True)
    checkpoint['state_dict']['transformer.wte.weight'] += 0.01
    torch.save(checkpoint, copy / 'sft.pt')
    assert current() == {'sft': True, 'reward': False, 'ppo beta=1': False, 'ppo beta=0': False}


def test_the_sweep_puts_every_policy_at_or_below_the_exact_optimum_and_reuses_its_checkpoints(
        quick_run, tmp_path, monkeypatch, capsys):
    run_dir, _, _ = quick_run
    copy = tmp_path / 'runs' / 'a'
    shutil.copytree(run_dir, copy)
    # Tiny PPO and DPO schedules: what is tested is the sweep around them, not their quality.
    short = {'ppo': PPOConfig(iters=3, prompts_per_iter=16), 'dpo': DPOConfig(iters=5, pairs=256)}
    config = SweepConfig(betas=(1.0, 0.0), prompts=2)  # DPO at 1 only: its objective has no beta 0
    rows = sweep(copy, tmp_path / 'plots', config, short, progress=False)
    assert [row['label'] for row in rows] == ['PPO beta=1', 'PPO beta=0', 'DPO beta=1']
    for row in rows:
        # J* is the maximum of J over all policies, computed exactly: no trained policy exceeds it.
        assert row['J'] <= row['J_star'] + 1e-9, row['label']
        assert row['gold_gap_closed'] <= 1 + 1e-9, row['label']
    report = (copy / 'sweep.md').read_text()
    assert all(f"| {row['label']} |" in report for row in rows)
    assert (tmp_path / 'plots' / 'frontier.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    capsys.readouterr()
    again = sweep(copy, tmp_path / 'plots', config, short, progress=False)
    assert capsys.readouterr().out.count('reusing') == 3
    assert [row['J'] for row in again] == [row['J'] for row in rows]


def test_ctrl_c_during_a_stage_keeps_finished_checkpoints_and_the_main_command_resumes_repairing_logs_leaving_git_status_clean(
        quick_run, tmp_path, monkeypatch, capsys):
    # In a clone of the repository, as a new user's: the quick run's checkpoints are current for
    # `run_all.py --quick` with the tiny schedule's flags, so after the interruption the main command reuses them all and only
    # evaluates, draws and reports (the same metrics, byte for byte), rewrites broken logs from the
    # checkpoints' histories, and every file it writes stays out of git's way.
    clone = tmp_path / 'clone'
    subprocess.run(['git', 'clone', '--quiet', str(SCRIPTS.parent), str(clone)], check=True)
    run_dir = clone / 'runs' / 'default'
    shutil.copytree(quick_run[0], run_dir)
    before = {name: (run_dir / name).read_bytes() for name in CHECKPOINTS}
    # A long SFT run into the same folder, interrupted while it trains. SIGINT as a terminal delivers
    # it: a shell starts a background job (pytest in `cmd &`, say) with SIGINT ignored, and its
    # children would inherit that.
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS / 'train_sft.py'), '--iters', '100000', '--quiet'], cwd=clone,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_until_training(process, run_dir)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # never leave a 100,000-step run behind a failed test
    assert process.returncode == 130
    assert len(stderr.strip().splitlines()) == 1 and 'Traceback' not in stderr
    assert {name: (run_dir / name).read_bytes() for name in CHECKPOINTS} == before
    assert not [path for path in run_dir.iterdir() if path.name.startswith('.')]
    # Logs broken beside current checkpoints: one missing, one truncated, one another stage's.
    (run_dir / 'sft.jsonl').unlink()
    (run_dir / 'reward.jsonl').write_text('{"loss": 0.1, "ite')
    (run_dir / f'{PPO_STEMS[0]}.jsonl').write_text((run_dir / f'{PPO_STEMS[1]}.jsonl').read_text())
    metrics = (run_dir / 'metrics.json').read_bytes()
    monkeypatch.chdir(clone)
    from toy_rlhf.cli import run_command
    run_command('all', ['--quick', '--quiet', *TINY_FLAGS])
    printed = capsys.readouterr().out
    assert printed.count('reusing') == len(CHECKPOINTS)
    assert printed.count('rewritten from the history in its checkpoint') == 3
    for name in CHECKPOINTS:
        log = (run_dir / name).with_suffix('.jsonl')
        assert log.read_text() == jsonl_text(load_checkpoint(run_dir / name)['history']), name
    assert (run_dir / 'metrics.json').read_bytes() == metrics
    assert (run_dir / 'plots' / 'ppo_curves.png').is_file()
    status = subprocess.run(['git', 'status', '--porcelain'], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == ''


def _wait_until_training(process, run_dir, timeout=60):
    """Wait until the process holds the run folder's lock (imports done, the stage started) and has
    used one more CPU second since (SFT under way)."""
    deadline, locked_at = time.time() + timeout, None
    while time.time() < deadline:
        assert process.poll() is None, 'the training process ended early'
        ticks = int(Path(f'/proc/{process.pid}/stat').read_text().rsplit(')', 1)[1].split()[11])
        if locked_at is None and (run_dir / LOCK).exists():
            locked_at = ticks
        if locked_at is not None and ticks - locked_at > os.sysconf('SC_CLK_TCK'):
            return
        time.sleep(0.1)
    raise AssertionError('the training process did not start training in time')


def test_a_nan_reward_stops_ppo_naming_stage_iteration_and_quantity(quick_run, monkeypatch, tmp_path):
    run_dir, _, _ = quick_run
    real_score = rollout.score_sentences
    monkeypatch.setattr(rollout, 'score_sentences', lambda model, sentences: real_score(model, sentences) * float('nan'))
    copy = tmp_path / 'runs' / 'nan'
    copy.mkdir(parents=True)
    for name in ('sft.pt', 'reward.pt'):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    config = PPOConfig(iters=2, prompts_per_iter=8)
    with pytest.raises(TrainingError, match=r'^ppo: iteration 0: rewards is nan'):
        Run(copy).train([Variant.of(config, 'ppo')])
    assert not [path for path in copy.iterdir() if path.name.startswith('ppo')]


def test_a_nan_loss_stops_sft_with_one_line(monkeypatch):
    from toy_rlhf import sft
    real_forward = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, 'cross_entropy',
                        lambda *args, **kwargs: real_forward(*args, **kwargs) * float('inf'))
    with pytest.raises(TrainingError, match=r'^sft: iteration 0: loss is inf'):
        sft.train_sft(sft.SFTConfig(iters=3, batch_size=8), progress=False)
