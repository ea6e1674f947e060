"""The scripts as a user runs them: every mistake a user can make ends with exit status 2 and one
line on stderr (never a traceback), and every script's --help lists all its flags.

Each run is a process of its own in an empty folder of its own (runs/ is relative to the working
directory). A fresh interpreter spends ~2 s of CPU importing torch and the package before a script
does anything, which for the ~20 runs here would be most of the test suite's time on two cores. So
one fresh interpreter imports toy_rlhf.cli (all any script imports) once and forks a child per run;
the child executes the script file as __main__, as `python scripts/X.py` does, and its exit status,
stdout and stderr are the process's own. One run is also made the plain way, to show that the two
are the same.
"""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mingpt.model import GPT
from toy_rlhf import cli
from toy_rlhf.checkpoint import load_model, save_checkpoint
from toy_rlhf.methods import METHODS, register, unregister
from toy_rlhf.policy import policy_config
from toy_rlhf.reward import reward_model_config


SCRIPTS = Path(__file__).resolve().parent.parent / 'scripts'
NO_CUDA = not torch.cuda.is_available()
TINY_SFT = ['--iters', '1', '--batch-size', '2', '--quiet']


def save_random_model(path, kind):
    config = policy_config() if kind == 'policy' else reward_model_config()
    save_checkpoint(path, GPT(config), kind, train_config={}, metrics={})


def sft_checkpoint(folder):
    save_random_model(folder / 'runs' / 'default' / 'sft.pt', 'policy')


def sft_and_reward_checkpoints(folder):
    sft_checkpoint(folder)
    save_random_model(folder / 'runs' / 'default' / 'reward.pt', 'reward')


def a_policy_trained_from_another_sft_model(folder):
    sft_checkpoint(folder)
    policy = GPT(policy_config())
    save_checkpoint(folder / 'runs' / 'default' / 'ppo_beta1.pt', policy, 'policy',
                    train_config={'beta': 1.0, 'inputs': {'sft.pt': '0123456789abcdef'}}, metrics={})


def a_policy_with_a_nan_weight(folder):
    sft_checkpoint(folder)
    policy = GPT(policy_config())
    with torch.no_grad():
        policy.lm_head.weight[0, 0] = float('nan')
    save_checkpoint(folder / 'runs' / 'default' / 'ppo_beta1.pt', policy, 'policy', train_config={}, metrics={})


def a_policy_whose_preference_names_a_module(folder):
    # `this` prints the Zen of Python when it is imported: were it ever imported, stdout would say so.
    sft_and_reward_checkpoints(folder)
    save_checkpoint(folder / 'runs' / 'default' / 'ppo_beta1.pt', GPT(policy_config()), 'policy',
                    train_config={'beta': 1.0, 'preference': 'this:x'}, metrics={})


def a_policy_with_a_beta_that_is_text(folder):
    sft_and_reward_checkpoints(folder)
    save_checkpoint(folder / 'runs' / 'default' / 'ppo_beta1.pt', GPT(policy_config()), 'policy',
                    train_config={'beta': '1'}, metrics={})


def a_first_digit_reward_model(folder):
    sft_checkpoint(folder)
    save_checkpoint(folder / 'runs' / 'default' / 'reward.pt', GPT(reward_model_config()), 'reward',
                    train_config={'preference': 'first-digit'}, metrics={})


def a_file_where_the_run_folder_goes(folder):
    # A regular file named like the run folder: nothing can be created inside it, even as root
    # (whom a read-only folder would not stop).
    (folder / 'runs').mkdir()
    (folder / 'runs' / 'x').write_text('not a folder\n')


# name: (script, arguments, what the folder holds before the run, words the error must contain)
FAILURES = {
    'negative beta': ('train_ppo.py', ['--beta', '-1'], None, ['--beta', '-1']),
    'zero learning rate': ('train_sft.py', ['--learning-rate', '0'], None, ['--learning-rate', '0']),
    'negative learning rate': ('train_reward.py', ['--learning-rate', '-0.001'], None, ['--learning-rate', '-0.001']),
    'zero iterations': ('train_reward.py', ['--iters', '0'], None, ['--iters', '0']),
    'zero batch size': ('train_sft.py', ['--batch-size', '0'], None, ['--batch-size', '0']),
    'unknown flag': ('train_sft.py', ['--lr', '0.1'], None, ['--lr']),
    'no sft checkpoint': ('train_ppo.py', ['--quiet'], None, ['sft.pt', 'toy-rlhf sft']),
    'reward model without an sft checkpoint': ('train_reward.py', ['--quiet'], None,
                                               ['sft.pt', 'toy-rlhf sft']),
    'no reward checkpoint': ('train_ppo.py', ['--quiet'], sft_checkpoint,
                             ['reward.pt', 'toy-rlhf reward']),
    'reward checkpoint as the policy': ('evaluate.py', ['runs/default/reward.pt'],
                                        sft_and_reward_checkpoints, ['reward.pt', 'reward', 'policy']),
    'a run name that climbs out of runs/': ('train_sft.py', ['--run', '..'] + TINY_SFT, None, ['--run', '..']),
    'an absolute run path': ('train_sft.py', ['--run', '/tmp/elsewhere'] + TINY_SFT, None, ['--run']),
    'an empty run name': ('train_sft.py', ['--run', ''] + TINY_SFT, None, ['--run']),
    'betas that print alike': ('run_all.py', ['--betas', '0.1', '0.1000001', '--quiet'], None,
                               ['--betas', '0.1 0.1']),
    # --optimal takes no value, so the path after it is the checkpoint, not a prompt count.
    '--optimal before the checkpoint': ('evaluate.py', ['--optimal', 'runs/default/missing.pt'], None,
                                        ['runs/default/missing.pt', 'no such checkpoint']),
    'a reference the policy was not trained from': ('evaluate.py', ['runs/default/ppo_beta1.pt'],
                                                    a_policy_trained_from_another_sft_model,
                                                    ['runs/default/sft.pt', 'trained from', '--other-inputs']),
    'nan weights': ('evaluate.py', ['runs/default/ppo_beta1.pt'], a_policy_with_a_nan_weight,
                    ['ppo_beta1.pt', 'NaN', 'lm_head.weight']),
    'unwritable run folder': ('train_sft.py', ['--run', 'x'] + TINY_SFT, a_file_where_the_run_folder_goes,
                              ['runs/x']),
    'a module named by a checkpoint': ('evaluate.py', ['runs/default/ppo_beta1.pt'],
                                       a_policy_whose_preference_names_a_module,
                                       ['ppo_beta1.pt', 'give --preference this:x', 'only when you name it']),
    'a stored beta that is text': ('evaluate.py', ['runs/default/ppo_beta1.pt', '--optimal'],
                                   a_policy_with_a_beta_that_is_text, ['ppo_beta1.pt', "setting beta is '1'"]),
    'PPO for another preference than its reward model': ('train_ppo.py', ['--preference', 'last-digit', '--quiet'],
                                                         a_first_digit_reward_model,
                                                         ['reward.pt', 'first-digit, not last-digit']),
    'more threads than cores': ('train_sft.py', ['--threads', '10000'] + TINY_SFT, None, ['--threads', '10000']),
    'more prompts than memory holds': ('evaluate.py', ['runs/default/sft.pt', '--prompts', '200000000'], None,
                                       ['--prompts', '200000000']),
    'beta 0 twice, once as -0': ('run_all.py', ['--betas', '0', '-0', '--quiet'], None, ['--betas', '0 0']),
    'a batch no memory holds': ('train_sft.py', ['--batch-size', '99999999999', '--quiet'], None, ['--batch-size']),
    'an empty plots folder': ('compare_methods.py', ['--plots-dir', '', '--quiet'], None, ['--plots-dir']),
    'the whole pipeline for another preference than the run': ('run_all.py', ['--preference', 'last-digit', '--quiet'],
                                                               a_first_digit_reward_model,
                                                               ['reward.pt', 'first-digit, not last-digit']),
    # 10^11 pairs: terabytes, which no allocation gets (and so no process is killed for trying).
    'more pairs than memory holds': ('train_reward.py', ['--pairs', '100000000000', '--quiet'], sft_checkpoint,
                                     ['out of memory', 'smaller sizes']),
}
if NO_CUDA:
    FAILURES['cuda without a cuda device'] = ('train_sft.py', ['--device', 'cuda'] + TINY_SFT, None,
                                              ['cuda'])
# A seed numpy cannot take (it accepts 0 .. 2^32 - 1).
SEED_MISTAKES = {
    'negative seed': ('train_sft.py', ['--seed', '-1'] + TINY_SFT, None, ['--seed', '-1']),
}

# The flags each script documents: every script has --seed (but track.py, which replays a finished run:
# nothing random), --threads, --quiet and --help; those that write a run folder also --run; those that
# train a network also --device.
SHARED_FLAGS = ['--seed', '--threads', '--quiet', '--help']
NOTHING_RANDOM = {'track.py'}
FLAGS = {
    'train_sft.py': ['--run', '--device', '--iters', '--batch-size', '--learning-rate', '--model-type'],
    'train_reward.py': ['--run', '--device', '--pairs', '--iters', '--batch-size', '--learning-rate',
                        '--gold-margin'],
    'train_ppo.py': ['--run', '--beta', '--iters', '--prompts-per-iter', '--samples-per-prompt', '--epochs',
                     '--minibatches', '--learning-rate', '--clip-epsilon', '--critic', '--gae-lambda',
                     '--value-clip', '--max-grad-norm'],
    'evaluate.py': ['--reference', '--prompts', '--json'],
    'track.py': ['--to', '--logdir'],
}
ALL_SCRIPTS = sorted(path.name for path in SCRIPTS.glob('*.py'))
ENVIRONMENT = {**os.environ, 'OMP_NUM_THREADS': '1'}

# Reads [[script, arguments, folder, stdout file, stderr file], ...] as JSON on stdin, runs each in a
# forked child, prints the exit statuses as JSON. An uncaught exception prints its traceback and
# exits 1, and SystemExit sets the status, as the interpreter itself does at the top level.
FORKING_RUNNER = """
import json, os, runpy, sys, traceback
import toy_rlhf.cli
statuses = []
for script, arguments, folder, stdout, stderr in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.chdir(folder)
        os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.argv = [script, *arguments]
        sys.path[0] = os.path.dirname(script)
        status = 0
        try:
            runpy.run_path(script, run_name='__main__')
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                status = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(statuses))
"""


def run_forked(runs, output_folder):
    """[(script, arguments, folder)] -> [CompletedProcess], each run in a forked child."""
    files = [(output_folder / f'{i}.out', output_folder / f'{i}.err') for i in range(len(runs))]
    plan = [[str(SCRIPTS / script), arguments, str(folder), str(out), str(err)]
            for (script, arguments, folder), (out, err) in zip(runs, files)]
    runner = subprocess.run([sys.executable, '-c', FORKING_RUNNER], input=json.dumps(plan), text=True,
                            capture_output=True, timeout=300, env=ENVIRONMENT)
    assert runner.returncode == 0, runner.stderr
    return [subprocess.CompletedProcess(['python', str(SCRIPTS / script), *arguments], status,
                                        out.read_text(), err.read_text())
            for (script, arguments, _), status, (out, err) in zip(runs, json.loads(runner.stdout), files)]


def run_plainly(script, arguments, folder):
    return subprocess.run([sys.executable, str(SCRIPTS / script), *arguments], cwd=folder,
                          capture_output=True, text=True, timeout=300, env=ENVIRONMENT)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """{case: (completed process, its folder)} for every failure, every --help and one tiny
    successful run."""
    cases = {name: (script, arguments, setup)
             for name, (script, arguments, setup, _) in {**FAILURES, **SEED_MISTAKES}.items()}
    cases.update({f'help {script}': (script, ['--help'], None) for script in ALL_SCRIPTS})
    cases['tiny sft run'] = ('train_sft.py', ['--learning-rate', '0.001'] + TINY_SFT, None)
    folders = {}
    for name, (_, _, setup) in cases.items():
        folders[name] = tmp_path_factory.mktemp('cli')
        if setup:
            setup(folders[name])
    runs = [(script, arguments, folders[name]) for name, (script, arguments, _) in cases.items()]
    completed = run_forked(runs, tmp_path_factory.mktemp('cli-output'))
    return {name: (result, folders[name]) for name, result in zip(cases, completed)}


def test_a_forked_run_is_the_same_as_a_plain_one(results, tmp_path):
    forked, _ = results['no sft checkpoint']
    plain = run_plainly('train_ppo.py', ['--quiet'], tmp_path)
    assert (plain.returncode, plain.stdout, plain.stderr) == (forked.returncode, forked.stdout, forked.stderr)


def checkpoints_in(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob('*.pt'))


def assert_one_line_error(result, script, words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr + result.stdout
    assert lines[0].startswith(f'scripts/{script}: error: ')
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize('case', sorted(FAILURES))
def test_a_user_mistake_ends_with_status_two_and_one_line_naming_it(results, case, tmp_path):
    script, _, setup, words = FAILURES[case]
    result, folder = results[case]
    assert_one_line_error(result, script, words)
    # Nothing was written: the folder holds the checkpoints it was given and no others.
    if setup:
        setup(tmp_path)
    assert checkpoints_in(folder) == checkpoints_in(tmp_path)


def test_a_module_named_in_a_checkpoint_is_never_imported(results):
    result, _ = results['a module named by a checkpoint']
    assert result.stdout == ''


def test_a_tiny_run_with_valid_flags_succeeds_and_writes_its_checkpoint_under_the_working_folder(results):
    # The control for the failures above: the same harness and flags with valid values work.
    result, folder = results['tiny sft run']
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert 'sft.pt' in result.stdout
    load_model(folder / 'runs' / 'default' / 'sft.pt', 'policy')  # a complete policy checkpoint


@pytest.mark.parametrize('script', ALL_SCRIPTS)
def test_help_exits_zero_and_mentions_every_flag(results, script):
    result, _ = results[f'help {script}']
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    if script == 'train.py':  # any method: its help lists them all
        assert all(name in result.stdout for name, method in METHODS.items() if method.train is not None)
        return
    (command,) = [name for name, spec in cli.commands().items() if spec.script == script]
    parser = cli.build_parser(command, f'scripts/{script}')
    defined = [flag for action in parser._actions for flag in action.option_strings]
    shared = [flag for flag in SHARED_FLAGS if not (flag == '--seed' and script in NOTHING_RANDOM)]
    expected = shared + FLAGS.get(script, [])
    assert set(expected) <= set(defined)
    for flag in set(defined) | set(expected):
        assert re.search(rf'(?<![\w-]){re.escape(flag)}(?![\w-])', result.stdout), flag


def test_a_reward_checkpoint_given_as_the_policy_is_answered_with_a_command_that_makes_a_policy(results):
    result, _ = results['reward checkpoint as the policy']
    assert 'toy-rlhf reward' not in result.stderr


def test_a_seed_numpy_cannot_take_is_a_one_line_error(results):
    script, _, _, words = SEED_MISTAKES['negative seed']
    assert_one_line_error(results['negative seed'][0], script, words)


@pytest.fixture
def a_method_with_a_long_name():
    method = register(replace(METHODS['ppo'], name='a_method_with_a_long_name', summary='a stand-in'))
    yield method
    unregister(method.name)


def summary_columns(listing, summaries):
    """{name: the column its summary starts at} in a listing of `  NAME  SUMMARY` lines."""
    columns = {}
    for name, summary in summaries.items():
        (line,) = [line for line in listing.splitlines() if line.startswith(f'  {name} ')]
        assert line.endswith(summary)
        columns[name] = len(line) - len(summary)
    return columns


def test_the_command_list_keeps_its_summaries_in_one_column_whatever_the_longest_name(a_method_with_a_long_name):
    summaries = {name: spec.summary for name, spec in cli.commands().items()}
    assert len(set(summary_columns(cli.usage(), summaries).values())) == 1


def test_the_method_list_keeps_its_summaries_in_one_column_whatever_the_longest_name(a_method_with_a_long_name,
                                                                                     capsys):
    with pytest.raises(SystemExit):
        cli.train_main(['--help'])
    summaries = {name: method.summary for name, method in METHODS.items() if method.train is not None}
    assert len(set(summary_columns(capsys.readouterr().out, summaries).values())) == 1


def test_a_worker_process_that_dies_ends_with_status_two_and_one_line(tmp_path, monkeypatch, capsys):
    # As a worker the kernel kills for memory: the pool breaks, and the command says what happened.
    from toy_rlhf.executors import ExecutorConfig, executor
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        with cli.running('compare', ['--quiet']):
            with executor(ExecutorConfig(workers=2)) as pool:
                pool.submit(os._exit, 9).result()
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert 'a worker process died' in error and '--workers' in error and 'Traceback' not in error


@pytest.mark.parametrize('command', ['leaderboard', 'collapse'])
def test_executor_dask_without_dask_says_how_to_install_it_before_anything_trains(tmp_path, monkeypatch, capsys,
                                                                                   command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, 'distributed', None)  # as where it is not installed: import fails
    with pytest.raises(SystemExit) as stop:
        cli.run_command(command, ['--executor', 'dask', '--quiet'])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert 'pip install -e ".[dask]"' in line
    assert not list(tmp_path.iterdir())  # said before any run folder or checkpoint was made


@pytest.mark.slow  # dask's client waits out its 10 s connection timeout: `pytest -m slow` (with the [dask] extra)
def test_a_dask_address_where_no_scheduler_answers_is_one_line_before_anything_trains(tmp_path, monkeypatch, capsys):
    pytest.importorskip('distributed')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.run_command('collapse', ['--executor', 'dask', '--address', 'tcp://127.0.0.1:1', '--quiet'])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert '--address tcp://127.0.0.1:1: no dask scheduler answered' in line
    assert not list(tmp_path.iterdir())
