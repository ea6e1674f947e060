"""Where a study's variants train: here, one after another, or in worker processes.

Run.train takes a standard concurrent.futures.Executor, or None for here and now. Workers get their
inputs by value and run one thread each, so a variant's numbers are the same whichever worker trains
it (and the same as a serial run with --threads 1).
"""
import concurrent.futures
import contextlib


@contextlib.contextmanager
def executor(workers=1):
    """None (train here) for one worker, else a pool of `workers` processes; shut down on leaving."""
    if workers == 1:
        yield None
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        yield pool
