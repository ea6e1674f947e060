"""A run folder under faults: a second run on a held folder, a lock and temporary files left by a
killed run (and a user's own files beside them), a failure before anything was written, a full disk,
a value JSON cannot hold, SIGTERM. Most through the command line as a user meets it (cli.run_command,
in this process), ending in one line and a known status."""
import errno
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from toy_rlhf import files, pipeline
from toy_rlhf.files import WriteError, atomic_write, write_json
from toy_rlhf.run_dir import LOCK, open_run_dir
from conftest import run_cli as run


TINY_SFT = ['--iters', '1', '--batch-size', '2', '--quiet']


@pytest.fixture(autouse=True)
def in_a_fresh_folder(tmp_path, monkeypatch):
    """Each test in an empty working folder, with the SIGTERM handler run_command installs undone."""
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, handler)


def assert_one_line(lines, *words):
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines


def a_dead_process_id():
    process = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                             text=True, check=True)
    return int(process.stdout)


def left_by_a_killed_write(path):
    """The temporary file that a process killed outright (SIGKILL) while atomically writing path leaves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    before = set(path.parent.iterdir())
    code = ('import os, signal, sys; from toy_rlhf.files import atomic_write; '
            'atomic_write(sys.argv[1], lambda file: os.kill(os.getpid(), signal.SIGKILL))')
    source = Path(files.__file__).parents[1]  # the child writes with the code under test
    subprocess.run([sys.executable, '-c', code, str(path)], env={**os.environ, 'PYTHONPATH': str(source)})
    [temporary] = set(path.parent.iterdir()) - before
    return temporary


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    with open_run_dir(tmp_path / 'runs' / 'x'):
        status, _, lines = run('sft', ['--run', 'x'] + TINY_SFT, capsys)
    assert status == 2
    assert_one_line(lines, 'runs/x', 'in use', f'process {os.getpid()}')
    assert not (tmp_path / 'runs' / 'x' / 'sft.pt').exists()


def test_a_lock_and_temporary_files_left_by_a_killed_run_are_taken_over_and_removed(tmp_path, capsys):
    run_dir = tmp_path / 'runs' / 'default'
    (run_dir / 'plots').mkdir(parents=True)
    dead = a_dead_process_id()
    (run_dir / LOCK).write_text(f'{dead}\n')  # a lock file no process holds
    stale = [left_by_a_killed_write(run_dir / name) for name in ('sft.pt', 'plots/sft_loss.png')]
    status, out, _ = run('sft', TINY_SFT, capsys)
    assert status == 0
    assert f'taking over the lock of process {dead}' in out
    assert not any(path.exists() for path in stale)
    assert (run_dir / 'sft.pt').is_file()
    assert not (run_dir / LOCK).exists()  # released at the end


def test_opening_a_run_folder_removes_only_our_temporaries_and_only_where_we_write(tmp_path):
    run_dir = tmp_path / 'runs' / 'default'
    ours = [left_by_a_killed_write(run_dir / name) for name in ('sft.pt', 'plots/sft_loss.png')]
    users = [run_dir / '.editor.tmp', run_dir / 'sub' / 'deep' / '.notes.tmp', run_dir / '.x.tmp',
             run_dir / '.notes.a8d0q2zz.tmp',  # mkstemp's shape, without our marker
             run_dir / 'sub' / ours[0].name,  # our shape, in a folder we never write to
             run_dir / '.lock']  # a lock file of the user's own, beside ours
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    with open_run_dir(run_dir):
        pass
    assert not any(path.exists() for path in ours)
    assert all(path.read_text() == "the user's" for path in users)


def test_an_empty_run_dir_is_refused_not_taken_as_this_folder(tmp_path, capsys):
    status, _, lines = run('sft', ['--run-dir', ''] + TINY_SFT, capsys)
    assert status == 2
    assert_one_line(lines, '--run-dir')
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_when_the_folder_is_locked_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'pwrite', disk_full)  # writing our process id into the lock file
    status, _, lines = run('sft', ['--run', 'new'] + TINY_SFT, capsys)
    assert status == 2
    assert_one_line(lines, 'runs/new', 'No space left on device')
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path, capsys):
    status, _, lines = run('ppo', ['--run', 'new', '--quiet'], capsys)  # no sft.pt to start from
    assert status == 2
    assert_one_line(lines, 'sft.pt', 'toy-rlhf sft')
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_ends_with_one_line_naming_the_file_and_nothing_half_written(tmp_path, capsys, monkeypatch):
    def disk_full(file):
        file.write(b'the first bytes')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_atomic_write = atomic_write
    monkeypatch.setattr('toy_rlhf.files.atomic_write', lambda path, write: real_atomic_write(path, disk_full))
    monkeypatch.setattr('toy_rlhf.checkpoint.atomic_write', lambda path, write: real_atomic_write(path, disk_full))
    status, _, lines = run('sft', TINY_SFT, capsys)
    assert status == 2
    assert_one_line(lines, 'runs/default/sft.pt', os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file, no empty folder


@pytest.mark.parametrize('library_error', ['cause', 'context'])
def test_a_full_disk_behind_a_library_error_is_one_line_too(tmp_path, capsys, monkeypatch, library_error):
    def disk_full_inside_a_library(file):  # as torch.save reports ENOSPC: a RuntimeError chained to it
        file.write(b'the first bytes')
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            if library_error == 'cause':
                raise RuntimeError('PytorchStreamWriter failed writing file data/0') from error
            raise RuntimeError('PytorchStreamWriter failed writing file data/0')

    real_atomic_write = atomic_write
    monkeypatch.setattr('toy_rlhf.checkpoint.atomic_write',
                        lambda path, write: real_atomic_write(path, disk_full_inside_a_library))
    status, _, lines = run('sft', TINY_SFT, capsys)
    assert status == 2
    assert_one_line(lines, 'runs/default/sft.pt', os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file, no empty folder


@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
def test_json_with_a_nan_or_infinity_is_refused_naming_the_key_and_nothing_is_written(tmp_path, value):
    path = tmp_path / 'metrics.json'
    with pytest.raises(WriteError) as error:
        write_json(path, {'settings': {'beta': 1.0}, 'policies': [{'J': 0.5}, {'J': 0.5, 'gap_closed': value}]})
    assert '\n' not in str(error.value)
    assert str(path) in str(error.value) and 'policies[1].gap_closed' in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_stage_stops_it_like_ctrl_c(tmp_path, capsys, monkeypatch):
    def terminated_while_training(config, progress):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10 ** 8):  # the handler runs at the next bytecode boundary
            pass
        raise AssertionError('SIGTERM did not stop the stage')

    run('sft', TINY_SFT, capsys)
    before = (tmp_path / 'runs' / 'default' / 'sft.pt').read_bytes()
    monkeypatch.setattr(pipeline, 'train_sft', terminated_while_training)
    status, _, lines = run('sft', TINY_SFT, capsys)
    assert status == 128 + signal.SIGTERM
    assert_one_line(lines, 'terminated', 'nothing half-written')
    run_dir = tmp_path / 'runs' / 'default'
    assert (run_dir / 'sft.pt').read_bytes() == before
    assert sorted(path.name for path in run_dir.iterdir()) == ['sft.jsonl', 'sft.pt']  # no lock, no temporaries


def test_evaluate_measures_against_another_reference_only_when_asked(tmp_path, capsys):
    run('sft', TINY_SFT, capsys)
    run('sft', ['--run', 'other', '--seed', '1'] + TINY_SFT, capsys)
    run('dpo', ['--iters', '1', '--pairs', '8', '--batch-size', '2', '--warmup-iters', '1', '--quiet'], capsys)
    [policy], other = [str(path) for path in Path('runs/default').glob('dpo_beta1*.pt')], 'runs/other/sft.pt'
    status, _, lines = run('evaluate', [policy, '--reference', other, '--prompts', '4'], capsys)
    assert status == 2
    assert_one_line(lines, other, '--other-inputs')
    status, out, _ = run('evaluate', [policy, '--reference', other, '--prompts', '4', '--other-inputs', '--json'],
                         capsys)
    assert status == 0 and 'kl_to_reference' in out
