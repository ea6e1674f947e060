"""Where a study's variants train: here, one after another, in worker processes, or on a dask cluster.

Run.train takes a standard concurrent.futures.Executor, or None for here and now. Workers get their
inputs by value and run one thread each, so a variant's numbers are the same whichever worker trains
it (and the same as a serial run with --threads 1). A variant carries its own seed: no worker's
state enters its numbers.

dask is an optional extra (pip install -e ".[dask]"): only --executor dask imports it.
"""
import concurrent.futures
import contextlib
import copy
import json
import multiprocessing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from toy_rlhf.files import fingerprint, write_json
from toy_rlhf.flags import PositiveInt

DASK_MISSING = '--executor dask needs dask and distributed: pip install -e ".[dask]"'
TRIM_SETTING = 'distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_'  # None: not set in the workers


class ExecutorError(Exception):
    """An executor that cannot be had (dask not installed, a scheduler that does not answer); one line."""


@dataclass
class ExecutorConfig:
    """Where a study's variants train: the --executor, --workers and --address flags of every study
    that trains several (their configs inherit these fields)."""
    executor: Literal['process', 'dask'] = 'process'  # where the variants train: processes here, or a dask cluster
    workers: PositiveInt = 1  # variants at once, each in a worker of one thread (1: here, one after another; --threads 1 gives the workers' numbers)
    address: str = 'local'  # --executor dask: tcp://HOST:PORT of a scheduler, or local for a LocalCluster here


@contextlib.contextmanager
def executor(config):
    """Where config (an ExecutorConfig) says the variants train: None (here) for one process worker,
    else a pool of config.workers processes; with executor 'dask', a dask cluster's executor: a
    LocalCluster of that many one-thread processes here (address 'local'), or the scheduler at
    config.address (tcp://HOST:PORT). Shut down on leaving."""
    if config.executor == 'dask':
        with dask_executor(config.workers, config.address) as pool:
            yield pool
        return
    if config.workers == 1:
        yield None
        return
    # Spawned, not forked: a fork of a process that has run autograd fails wherever torch has started
    # its device threads (any machine with a GPU: "Unable to handle autograd's threading in combination
    # with fork-based multiprocessing"), and the driver has trained the SFT policy by then.
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=context) as pool:
        yield pool


def check_executor(config):
    """Raise ExecutorError now, before a study trains anything, where config (an ExecutorConfig) could
    not be opened later: --executor dask without dask installed, or with no scheduler answering at
    --address (connected to once and let go; a local cluster starts only when the study opens it)."""
    if config.executor != 'dask':
        return
    if config.address == 'local':
        _dask()
        return
    with dask_executor(1, config.address):
        pass


def _dask():
    """(dask, distributed.Client, distributed.LocalCluster), or the one line saying how to install them."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise ExecutorError(DASK_MISSING) from None
    return dask, Client, LocalCluster


@contextlib.contextmanager
def dask_executor(workers, address):
    """A concurrent.futures.Executor on a dask cluster (Client.get_executor): see executor."""
    dask, Client, LocalCluster = _dask()
    with contextlib.ExitStack() as stack:
        try:
            scheduler = address
            if address == 'local':
                # dask's nannies start each worker with MALLOC_TRIM_THRESHOLD_=65536, which also turns
                # off glibc's adaptive mmap threshold: every large tensor is then mapped and unmapped
                # afresh, page faults and all (a PPO run: 4.8x the page faults, 1.2-1.4x the time).
                stack.enter_context(dask.config.set({TRIM_SETTING: None}))
                # One thread per worker process: the variants' numbers then match the process pool's.
                scheduler = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1,
                                                             processes=True, dashboard_address=None))
            client = stack.enter_context(Client(scheduler, timeout='10s'))
        except (OSError, TimeoutError, ValueError) as error:
            raise ExecutorError(f'--address {address}: no dask scheduler answered ({error})') from None
        # pure=False: every submit runs, as in any concurrent.futures.Executor; dask's default would
        # run two identical jobs once and hand both the same result.
        yield client.get_executor(pure=False)


def run_jobs(pool, jobs, done, progress=True):
    """Run each of jobs, {key: (function, *arguments)}, here one after another (pool None) or in the
    pool's workers at one thread each; done(key, result) in this process as each ends, so that only
    this process writes. Each function takes progress= and threads= besides its arguments; a worker
    gets its arguments by value and shows no progress bars."""
    if pool is None:
        for key, (function, *arguments) in jobs.items():
            done(key, function(*arguments, progress=progress))
        return
    futures = {start(pool, function, *arguments): key for key, (function, *arguments) in jobs.items()}
    for future in concurrent.futures.as_completed(futures):
        done(futures[future], future.result())


def run_kept_jobs(pool, jobs, done, path, config, inputs, progress=True):
    """run_jobs for a study whose results are JSON (its runs' histories): each result is also kept in
    the JSON file at path as it comes, under what the jobs are made from (config's settings but where
    they run and `fresh`, and the fingerprints of the input files). A job whose result is kept there
    under the same is handed to done at once instead of run again, unless config.fresh: a study killed
    midway reruns only what it had not finished. done gets every result as JSON gives it back (lists
    for tuples), kept or new, so the study's numbers are the same either way."""
    where = {field.name for field in fields(ExecutorConfig)} | {'fresh'}
    made_from = json.loads(json.dumps({'settings': {name: value for name, value in asdict(config).items()
                                                    if name not in where},
                                       'inputs': {Path(file).name: fingerprint(file) for file in inputs}}))
    kept = {'made_from': made_from, 'results': {}}
    try:
        stored = {} if config.fresh else json.loads(Path(path).read_text())
        if stored.get('made_from') == made_from and isinstance(stored.get('results'), dict):
            kept = stored
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or not ours as it should be: every job runs, and the file is rewritten
    names = {key: json.dumps(key) for key in jobs}
    reused = [key for key in jobs if names[key] in kept['results']]
    if reused:
        print(f'{path}: reusing {len(reused)} of {len(jobs)} runs made with the same settings (--fresh: run them again)')
    for key in reused:
        done(key, kept['results'][names[key]])

    def keep(key, result):
        kept['results'][names[key]] = json.loads(json.dumps(result))
        write_json(path, kept)  # at once: a study killed in the next job keeps this one
        done(key, kept['results'][names[key]])
    run_jobs(pool, {key: job for key, job in jobs.items() if key not in reused}, keep, progress)


def submit_by_value(pool, function, *arguments, **keywords):
    """pool.submit(function, *arguments, **keywords), the arguments copied first. A process pool
    pickles a job in a thread of its own, and torch's pickler for processes moves each tensor's storage
    into shared memory in place: while it does, this process may be reading the same models (the exact
    tables), and read half-moved weights. So each job travels as its own copies."""
    return pool.submit(function, *copy.deepcopy(arguments), **keywords)


def start(pool, function, *arguments, progress=True):
    """function(*arguments) as a future: run here and now without a pool (with progress bars as
    asked), else sent to the pool's workers as run_jobs sends a job (by value, one thread, no bars)."""
    if pool is None:
        future = concurrent.futures.Future()
        future.set_result(function(*arguments, progress=progress))
        return future
    return submit_by_value(pool, function, *arguments, progress=False, threads=1)
