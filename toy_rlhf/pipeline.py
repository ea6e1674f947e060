"""The stages of the pipeline as the command line runs them: train, measure, save, summarise."""
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy
import torch

from toy_rlhf.checkpoint import save_checkpoint
from toy_rlhf.language import entropy_floor
from toy_rlhf.metrics import language_kl
from toy_rlhf.sft import SFTConfig, train_sft
from toy_rlhf.training import write_jsonl


def versions():
    """The library versions a result was made with, stored beside it."""
    return {'python': platform.python_version(), 'torch': str(torch.__version__), 'numpy': numpy.__version__}


def sft_stage(run_dir, config, progress=True):
    """Train the SFT policy, measure it, write sft.pt and sft.jsonl to run_dir; returns its metrics."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    model, history = train_sft(config, progress)
    metrics = {'language_kl': language_kl(model, seed=config.seed), 'final_loss': history[-1]['loss'],
               'entropy_floor': entropy_floor(), 'seconds': time.perf_counter() - start}
    write_jsonl(run_dir / 'sft.jsonl', history)
    save_checkpoint(run_dir / 'sft.pt', model, 'policy', {**asdict(config), 'versions': versions()}, metrics)
    print(f"SFT: KL(true || model) {metrics['language_kl']:.4f} nats per token; loss "
          f"{metrics['final_loss']:.4f} (floor {metrics['entropy_floor']:.4f}); "
          f"{metrics['seconds']:.1f} s -> {run_dir / 'sft.pt'}")
    return metrics
