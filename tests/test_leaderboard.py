"""The leaderboard: the same grid gives the same numbers wherever its methods train (here, a process
pool, a dask cluster), a second call recomputes nothing, and bad input is one line, exit status 2."""
import functools
import json
import os
import signal
import threading
import time
import uuid
from dataclasses import replace

import pytest

from conftest import one_thread
from toy_rlhf import cli, executors, run as run_module
from toy_rlhf.studies import leaderboard as study
from toy_rlhf.studies.leaderboard import LeaderboardConfig, leaderboard

# What is tested is where the variants train and what is reused, not what they learn: tiny stages.
TINY = {'sft': (('iters', 3), ('batch_size', 8), ('warmup_iters', 1)),
        'reward': (('iters', 2), ('pairs', 32), ('held_out_pairs', 32)),
        'ppo': (('iters', 2), ('prompts_per_iter', 4)), 'dpo': (('iters', 2), ('pairs', 32))}
GRID = LeaderboardConfig(preferences=('first-digit',), methods=('ppo', 'dpo'), seeds=(1,), prompts=2)


def numbers(folder):
    """Every measured number of the leaderboard in folder (training seconds left out: wall time)."""
    rows = json.loads((folder / 'leaderboard.json').read_text())['rows']
    return [{key: value for key, value in row.items() if key != 'seconds'} for row in rows]


def logged(log):
    """A training log's rows without their wall times."""
    return [{key: value for key, value in json.loads(line).items() if not key.startswith('time/')}
            for line in log.read_text().splitlines()]


def at_one_thread(folder, config):
    with one_thread():
        leaderboard(folder, config, progress=False, schedule=TINY)


def with_the_same_inputs(serial, folder):
    """folder holding the serial run's SFT policies and reward models (not its methods' checkpoints),
    so that only the methods train again."""
    for path in [*serial.glob('seed*/sft.pt'), *serial.glob('seed*/*/sft.pt'), *serial.glob('seed*/*/reward.pt')]:
        copy = folder / path.relative_to(serial)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope='module')
def serial(tmp_path_factory):
    folder = tmp_path_factory.mktemp('serial')
    at_one_thread(folder, GRID)
    return folder


def test_a_process_pool_gives_the_numbers_of_a_serial_run(serial, tmp_path):
    at_one_thread(with_the_same_inputs(serial, tmp_path), replace(GRID, workers=2))
    assert sorted(path.name for path in tmp_path.rglob('*.pt')) == sorted(path.name for path in serial.rglob('*.pt'))
    assert numbers(tmp_path) == numbers(serial)
    assert {row['label'] for row in numbers(serial)} == {'PPO beta=1', 'DPO beta=1'}


def state_left_by_the_parent():
    return getattr(executors, 'PARENT_STATE', None)


def test_the_process_pools_workers_are_spawned_not_forked(monkeypatch):
    # A forked worker inherits the driver's memory, autograd's device threads included, and torch
    # refuses to run autograd in it on any machine with a GPU; a spawned one starts clean.
    monkeypatch.setattr(executors, 'PARENT_STATE', 'set after import', raising=False)
    with executors.executor(executors.ExecutorConfig(workers=2)) as pool:
        assert pool.submit(state_left_by_the_parent).result() is None


def test_a_second_call_with_nothing_changed_trains_and_measures_nothing(serial, monkeypatch):
    stamps = {path: path.stat().st_mtime_ns for path in serial.rglob('*.pt')}
    before = numbers(serial)

    def forbidden(*args, **kwargs):
        raise AssertionError('recomputed')

    monkeypatch.setattr(run_module, 'train_variant', forbidden)
    monkeypatch.setattr(study, 'variant_row', forbidden)
    monkeypatch.setattr(study, 'row_job', forbidden)
    monkeypatch.setattr(study, 'reward_job', forbidden)
    monkeypatch.setattr(run_module, 'exact_tables', forbidden)  # the tables are read back
    monkeypatch.setattr(study, 'sft_stage', forbidden)
    leaderboard(serial, GRID, progress=False, schedule=TINY)
    assert numbers(serial) == before
    assert {path: path.stat().st_mtime_ns for path in serial.rglob('*.pt')} == stamps


def test_a_changed_checkpoint_is_measured_again(serial, monkeypatch):
    # The rows are keyed by the checkpoint's fingerprint: another checkpoint under the same name is remeasured.
    (policy,) = (serial / 'seed1' / 'first-digit').glob('dpo_beta1*.pt')
    stored = json.loads((policy.parent / 'rows.json').read_text())
    stored[policy.stem]['key']['made_from'][policy.name] = 'another'
    (policy.parent / 'rows.json').write_text(json.dumps(stored))
    measured = []
    real = study.row_job
    monkeypatch.setattr(study, 'row_job', lambda variant, *args, **kwargs: measured.append(variant.name)
                        or real(variant, *args, **kwargs))
    at_one_thread(serial, GRID)  # remeasured as it was measured: the other tests compare with it
    assert measured == [policy.stem]


@pytest.mark.slow  # starting a local cluster takes most of it: `pytest -m slow` (with the [dask] extra)
def test_a_dask_local_cluster_gives_the_numbers_of_a_serial_run(serial, tmp_path):
    pytest.importorskip('distributed')
    at_one_thread(with_the_same_inputs(serial, tmp_path), replace(GRID, workers=2, executor='dask'))
    assert numbers(tmp_path) == numbers(serial)


@pytest.mark.slow  # starting a local cluster: `pytest -m slow` (with the [dask] extra)
def test_a_dask_local_clusters_workers_keep_glibcs_adaptive_allocator():
    pytest.importorskip('distributed')
    from toy_rlhf.executors import dask_executor
    # dask's own default would set MALLOC_TRIM_THRESHOLD_ in each worker (1.2-1.4x slower training).
    with dask_executor(1, 'local') as pool:
        assert pool.submit(os.environ.get, 'MALLOC_TRIM_THRESHOLD_').result() is None
        assert pool.submit(os.environ.get, 'OMP_NUM_THREADS').result() == '1'  # dask's other settings stay


@pytest.mark.slow  # starting a local cluster: `pytest -m slow` (with the [dask] extra)
def test_a_dask_executor_runs_every_submit_even_two_identical_ones():
    pytest.importorskip('distributed')
    from toy_rlhf.executors import dask_executor
    with dask_executor(1, 'local') as pool:
        first, second = pool.submit(uuid.uuid4), pool.submit(uuid.uuid4)  # both held: dask would share one run
        assert first.result() != second.result()


@pytest.mark.slow  # a cluster of its own, and cells long enough to be killed in: `pytest -m slow`
def test_a_dask_worker_killed_mid_grid_loses_only_its_cell_which_dask_trains_again(serial, tmp_path):
    distributed = pytest.importorskip('distributed')
    longer = {**TINY, 'ppo': (('iters', 40), ('prompts_per_iter', 8)), 'dpo': (('iters', 60), ('pairs', 64))}
    # The serial numbers of the same longer grid, to compare with.
    reference = with_the_same_inputs(serial, tmp_path / 'serial')
    run_grid = functools.partial(leaderboard, progress=False, schedule=longer)
    with one_thread():
        run_grid(reference, GRID)
    killed = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        def kill_a_busy_worker():
            # SIGKILL, as a machine lost: no clean-up runs in the worker. Its nanny starts another.
            pids = client.run(os.getpid)
            while not killed:
                busy = [worker for worker, tasks in client.processing().items() if tasks]
                if busy:
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])
                time.sleep(0.05)
        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        folder = with_the_same_inputs(serial, tmp_path / 'dask')
        with one_thread():
            run_grid(folder, replace(GRID, workers=2, executor='dask', address=cluster.scheduler_address))
        killer.join(timeout=5)
    assert killed, 'no worker was busy to kill'
    assert numbers(folder) == numbers(reference)  # every cell done, with the serial numbers
    assert sorted(p.relative_to(folder) for p in folder.rglob('*') if p.is_file() and p.suffix != '.png') == \
        sorted(p.relative_to(reference) for p in reference.rglob('*') if p.is_file() and p.suffix != '.png')
    for log in folder.rglob('*_beta1*.jsonl'):  # each cell's log written once, not appended to twice
        assert logged(log) == logged(reference / log.relative_to(folder))


def test_the_summary_ranks_methods_and_says_which_the_seeds_cannot_separate():
    rows = [{'label': label, 'preference': 'p', 'seed': seed, 'gap_closed': gap}
            for label, gaps in (('A', (0.9, 0.8)), ('B', (0.85, 0.95)), ('C', (0.1, 0.2))) for seed, gap in enumerate(gaps)]
    summary = study.summarise(rows)
    assert summary['method_rank'] == {'A': 2, 'B': 1, 'C': 3}
    assert summary['seed_order'] == {'p': False}  # A first on seed 0, B on seed 1
    assert summary['inseparable'] == {'p': [['A', 'B']]}
    assert summary['cells']['A']['p']['gap_closed'] == {'median': pytest.approx(0.85), 'low': 0.8, 'high': 0.9}


@pytest.fixture
def sigterm_handler_restored():
    handler = signal.getsignal(signal.SIGTERM)  # run_command sets its own
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize('arguments, words', [
    (['--preferences', 'no-such-preference'], ['no-such-preference']),
    (['--seeds'], ['--seeds']),
    (['--methods', 'no_such_method'], ['no_such_method']),
])
def test_bad_input_is_one_line_and_status_two(tmp_path, monkeypatch, capsys, sigterm_handler_restored, arguments,
                                              words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.run_command('leaderboard', [*arguments, '--quiet'], prog='scripts/leaderboard.py')
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith('scripts/leaderboard.py: error: ') and all(word in line for word in words)
    assert not (tmp_path / 'runs' / 'leaderboard' / 'seed0').exists()
