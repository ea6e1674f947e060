"""The whole story in one call: SFT -> reward model -> PPO for each beta -> evaluation -> figures -> report.

A stage whose checkpoint was made with the same settings from the same input checkpoints is reused;
everything after a retrained stage is retrained (its inputs changed). Evaluation, figures and the
report are always made afresh from the checkpoints, with fixed seeds, so two runs with the same
settings write the same metrics.json byte for byte.
"""
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from toy_rlhf import plots
from toy_rlhf.checkpoint import load_checkpoint, load_model
from toy_rlhf.files import read_jsonl, write_json
from toy_rlhf.language import entropy_floor
from toy_rlhf.metrics import evaluate_policy
from toy_rlhf.pipeline import (EVALUATION_PROMPTS, PPOConfig, RewardConfig, SFTConfig, ppo_name,
                               ppo_stage, reward_stage, sft_stage, stage_is_current, versions)
from toy_rlhf.report import write_report

REFERENCE = 'reference (SFT)'


@dataclass
class RunAllConfig:
    betas: tuple = (1.0, 0.0)  # compared KL strengths; the first is the "aligned" one
    seed: int = 0
    quick: bool = False  # a much smaller schedule, for smoke tests
    fresh: bool = False  # retrain every stage even if its checkpoint is current
    prompt: tuple = (5, 7, 1, 5)  # the fixed input of the per-sentence figures
    response: tuple = (6, 2, 7, 3)
    device: str = 'cpu'


def stage_configs(config):
    """The settings of each training stage, keyed by checkpoint stem."""
    sft = SFTConfig(seed=config.seed, device=config.device)
    reward = RewardConfig(seed=config.seed, device=config.device)
    ppo = PPOConfig(seed=config.seed)
    if config.quick:
        sft = replace(sft, iters=150)
        reward = replace(reward, iters=150, pairs=2000, held_out_pairs=1000)
        ppo = replace(ppo, iters=8, prompts_per_iter=32)
    return {'sft': sft, 'reward': reward,
            **{ppo_name(beta): replace(ppo, beta=beta) for beta in config.betas}}


def run_all(run_dir, plots_dir, config, progress=True):
    """Run every stage into run_dir, draw the figures into plots_dir, write report.md,
    metrics.json and timings.json into run_dir. Returns the metrics."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    configs = stage_configs(config)
    timings = {}
    for name, stage_config in configs.items():
        path = run_dir / f'{name}.pt'
        # The reward model starts from the SFT policy, and PPO from both: new inputs mean a new run.
        sft, reward = run_dir / 'sft.pt', run_dir / 'reward.pt'
        inputs = {'sft': (), 'reward': (sft,)}.get(name, (sft, reward))
        start = time.perf_counter()
        if not config.fresh and stage_is_current(path, stage_config, inputs):
            print(f'{name}: reusing {path} (made with the same settings)')
            timings[name] = {'seconds': time.perf_counter() - start, 'reused': True}
            continue
        stage = {'sft': sft_stage, 'reward': reward_stage}.get(name, ppo_stage)
        stage(run_dir, stage_config, progress)
        timings[name] = {'seconds': time.perf_counter() - start, 'reused': False}

    start = time.perf_counter()
    reference = load_model(run_dir / 'sft.pt', 'policy')
    models = {REFERENCE: reference}
    for beta in config.betas:
        models[f'beta={beta:g}'] = load_model(run_dir / f'{ppo_name(beta)}.pt', 'policy')
    histories = {label: read_jsonl(run_dir / f'{ppo_name(beta)}.jsonl')
                 for label, beta in zip(list(models)[1:], config.betas)}
    metrics = measure(run_dir, models, histories, config)
    timings['evaluation'] = {'seconds': time.perf_counter() - start}

    start = time.perf_counter()
    figures = draw(run_dir, plots_dir, models, histories, config)
    timings['figures'] = {'seconds': time.perf_counter() - start}
    timings['total'] = {'seconds': sum(stage['seconds'] for stage in timings.values())}

    settings = {'seed': config.seed, 'betas': list(config.betas), 'quick': config.quick,
                'stages': {name: asdict(stage_config) for name, stage_config in configs.items()},
                'versions': versions()}
    write_json(run_dir / 'metrics.json', {'settings': settings, **metrics})
    write_json(run_dir / 'timings.json', timings)
    write_report(run_dir / 'report.md', settings, metrics, timings, figures)
    print(f"Report: {run_dir / 'report.md'}; figures in {plots_dir}/; total {timings['total']['seconds']:.1f} s")
    return metrics


def measure(run_dir, models, histories, config):
    """The quality numbers of every stage, all recomputed from the checkpoints with fixed seeds."""
    sft = load_checkpoint(run_dir / 'sft.pt')['metrics']
    reward = load_checkpoint(run_dir / 'reward.pt')['metrics']
    reference = models[REFERENCE]
    return {
        'sft': {'language_kl': sft['language_kl'], 'entropy_floor': entropy_floor()},
        'reward': {'pairwise_accuracy': reward['pairwise_accuracy'], 'rank_rate': reward['rank_rate']},
        'policies': {label: evaluate_policy(model, reference, EVALUATION_PROMPTS, seed=config.seed)
                     for label, model in models.items()},
        'ppo_samples_to_99_percent_preference': {label: samples_to_preference(history, 0.99)
                                                 for label, history in histories.items()},
    }


def samples_to_preference(history, target):
    """Rollout samples PPO drew until the rollout's exact preference rate first reached target
    (None if it never did)."""
    return next((row['samples'] for row in history if row['gold/preference_rate'] >= target), None)


def draw(run_dir, plots_dir, models, histories, config):
    """The six figures; returns their paths by name."""
    prompt, response = torch.tensor(config.prompt), torch.tensor(config.response)
    reward_model = load_model(run_dir / 'reward.pt', 'reward')
    return {
        'sft_loss': plots.plot_sft_loss(read_jsonl(run_dir / 'sft.jsonl'), entropy_floor(),
                                        plots_dir / 'sft_loss.png'),
        'reward_model': plots.plot_reward_model(read_jsonl(run_dir / 'reward.jsonl'), reward_model,
                                                prompt, response, plots_dir / 'reward_model.png'),
        'ppo_curves': plots.plot_ppo_curves(histories, plots_dir / 'ppo_curves.png'),
        'next_token_probs': plots.plot_next_token_probs(models, prompt, response,
                                                        plots_dir / 'next_token_probs.png'),
        'attention': plots.plot_attention(models, prompt, response, plots_dir / 'attention.png'),
        'first_token': plots.plot_first_token(models, plots_dir / 'first_token.png', seed=config.seed),
    }
