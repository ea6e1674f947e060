"""Benchmark the default pipeline: median seconds and samples/s per stage, peak memory, quality."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('benchmark')
