"""Benchmark: run the default pipeline several times from scratch and report medians.

Each repetition is a fresh subprocess in a temporary folder (`toy-rlhf all --fresh`), so imports,
process start and every stage count, as they do for a user. Speed is printed next to the quality
figures of the same runs, so a faster schedule can never hide a worse result.

The yardstick: the SFT stage of the blog notebook this project reproduces, run as the notebook runs
it (minGPT's Trainer on gpt-nano, block 8, vocabulary 11, learning rate 5e-4, batch 64, no DataLoader
workers, 5,000 iterations) on this project's mingpt. With notebook_iters, each repetition also times
that many of its iterations in a subprocess of its own, right after the pipeline (so the two share
the machine's state), scaled to the notebook's 5,000: the pipeline's time is then a ratio, which a
slower or busier machine changes far less than it changes seconds.
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

NOTEBOOK_SFT_ITERS = 5000
NOTEBOOK_STAGE = "notebook's SFT"


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


def notebook_sft_seconds(iters):
    """Seconds of `iters` iterations of the notebook's SFT stage on this project's mingpt (the model
    and its sentences made first, untimed)."""
    from mingpt.model import GPT
    from mingpt.trainer import Trainer
    from toy_rlhf.data import SupervisedDataset
    from toy_rlhf.language import VOCAB_SIZE

    model_config = GPT.get_default_config()
    model_config.model_type, model_config.vocab_size, model_config.block_size = 'gpt-nano', VOCAB_SIZE, 8
    train_config = Trainer.get_default_config()
    train_config.learning_rate, train_config.batch_size, train_config.num_workers = 5e-4, 64, 0
    train_config.max_iters, train_config.device = iters, 'cpu'
    trainer = Trainer(train_config, GPT(model_config), SupervisedDataset(64 * iters))
    start = time.perf_counter()
    trainer.run()
    return time.perf_counter() - start


def notebook_once(iters):
    """notebook_sft_seconds(iters) in a fresh subprocess, scaled to the notebook's 5,000 iterations."""
    code = f'from toy_rlhf.benchmark import notebook_sft_seconds; print(notebook_sft_seconds({iters}))'
    printed = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout
    return float(printed) * NOTEBOOK_SFT_ITERS / iters


def benchmark(repeats=3, extra_args=(), notebook_iters=0):
    """Run the pipeline `repeats` times (each followed by notebook_iters iterations of the notebook's
    SFT stage, if any); returns medians per stage, samples/s, peak memory, quality, and the ratio of
    the whole pipeline to the notebook's SFT stage."""
    seconds = defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            timings, metrics = run_once(folder, extra_args)
            for stage, timing in timings.items():
                seconds[stage].append(timing['seconds'])
            if notebook_iters:
                seconds[NOTEBOOK_STAGE].append(notebook_once(notebook_iters))
    # ru_maxrss of children: the largest resident set of any one run, in KiB on Linux.
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    medians = {stage: statistics.median(values) for stage, values in seconds.items()}
    samples = samples_per_stage(metrics['settings'])
    notebook = medians.pop(NOTEBOOK_STAGE, None)
    return {
        'repeats': repeats,
        'median_seconds': medians,
        'samples_per_second': {stage: samples[stage] / medians[stage] for stage in samples if stage in medians},
        'peak_memory_mib': peak_mib,
        'quality': {'sft_language_kl': metrics['sft']['language_kl'], **metrics['reward'],
                    **{f'{label}: {name}': value for label, values in metrics['policies'].items()
                       for name, value in values.items()}},
        'notebook_sft_seconds': notebook,
        'ratio_to_notebook': None if notebook is None else medians['whole process'] / notebook,
    }


def number_or_list(value):
    """A quality figure as text: a number, or a list of them (the KL by position)."""
    return ', '.join(f'{item:.4f}' for item in value) if isinstance(value, list) else f'{value:.4f}'


def format_report(result):
    lines = [f"median of {result['repeats']} fresh runs", '', f"{'stage':<14} {'seconds':>8} {'samples/s':>10}"]
    for stage, value in result['median_seconds'].items():
        rate = result['samples_per_second'].get(stage)
        lines.append(f"{stage:<14} {value:>8.2f} {'' if rate is None else f'{rate:>10.0f}'}")
    if result['notebook_sft_seconds'] is not None:
        lines += ['', f"the notebook's SFT stage ({NOTEBOOK_SFT_ITERS:,} iterations, scaled): "
                      f"{result['notebook_sft_seconds']:.2f} s; the whole pipeline: "
                      f"{result['ratio_to_notebook']:.2f}x of it"]
    lines += ['', f"peak resident memory of a run: {result['peak_memory_mib']:.0f} MiB", '', 'quality (last run):']
    lines += [f'  {name:<40} {number_or_list(value)}' for name, value in result['quality'].items()]
    return '\n'.join(lines)
