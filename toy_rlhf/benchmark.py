"""Benchmark: run the default pipeline several times from scratch and report medians.

Each repetition is a fresh subprocess in a temporary folder (`toy-rlhf all --fresh`), so imports,
process start and every stage count, as they do for a user. Speed is printed next to the quality
figures of the same runs, so a faster schedule can never hide a worse result.
"""
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from toy_rlhf.methods import method_of_stem


def samples_per_stage(settings):
    """How many training samples each stage processes: SFT sentences, preference pairs (each pair
    is two sequences), PPO rollout responses."""
    stages = settings['stages']
    counts = {'sft': stages['sft']['iters'] * stages['sft']['batch_size'],
              'reward': stages['reward']['iters'] * stages['reward']['batch_size']}
    for name, config in stages.items():
        if method_of_stem(name) is not None:  # the PPO runs, one per beta
            counts[name] = config['iters'] * config['prompts_per_iter'] * config['samples_per_prompt']
    return counts


def run_once(folder, extra_args):
    """One fresh pipeline run in `folder`; returns (timings, metrics) as written by the run, the
    timings with the wall time of the whole process added (start-up and imports included)."""
    command = [sys.executable, '-c', 'from toy_rlhf.cli import main; main()', 'all', '--fresh', '--quiet',
               '--plots-dir', 'plots', *extra_args]
    start = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    run_dir = Path(folder) / 'runs' / 'default'
    timings = json.loads((run_dir / 'timings.json').read_text())
    return {**timings, 'whole process': {'seconds': wall}}, json.loads((run_dir / 'metrics.json').read_text())


def benchmark(repeats=3, extra_args=()):
    """Run the pipeline `repeats` times; returns medians per stage, samples/s, peak memory, quality."""
    seconds = defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            timings, metrics = run_once(folder, extra_args)
            for stage, timing in timings.items():
                seconds[stage].append(timing['seconds'])
    # ru_maxrss of children: the largest resident set of any one run, in KiB on Linux.
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    medians = {stage: statistics.median(values) for stage, values in seconds.items()}
    samples = samples_per_stage(metrics['settings'])
    return {
        'repeats': repeats,
        'median_seconds': medians,
        'samples_per_second': {stage: samples[stage] / medians[stage] for stage in samples if stage in medians},
        'peak_memory_mib': peak_mib,
        'quality': {'sft_language_kl': metrics['sft']['language_kl'], **metrics['reward'],
                    **{f'{label}: {name}': value for label, values in metrics['policies'].items()
                       for name, value in values.items()}},
    }


def format_report(result):
    lines = [f"median of {result['repeats']} fresh runs", '', f"{'stage':<14} {'seconds':>8} {'samples/s':>10}"]
    for stage, value in result['median_seconds'].items():
        rate = result['samples_per_second'].get(stage)
        lines.append(f"{stage:<14} {value:>8.2f} {'' if rate is None else f'{rate:>10.0f}'}")
    lines += ['', f"peak resident memory of a run: {result['peak_memory_mib']:.0f} MiB", '', 'quality (last run):']
    lines += [f'  {name:<40} {value:.4f}' for name, value in result['quality'].items()]
    return '\n'.join(lines)
