"""The whole story in one call: SFT -> reward model -> PPO for each beta -> evaluation -> figures -> report.

A stage whose checkpoint was made with the same settings from the same input checkpoints is reused;
everything after a retrained stage is retrained (its inputs changed). Evaluation, figures and the
report are always made afresh from the checkpoints, with fixed seeds, so two runs with the same
settings write the same metrics.json byte for byte.
"""
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from toy_rlhf import plots
from toy_rlhf.checkpoint import load_checkpoint, load_model
from toy_rlhf.files import write_json
from toy_rlhf.flags import Device, Digit, NonNegativeFloat, Seed
from toy_rlhf.language import entropy_floor
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.ppo import PPOConfig
from toy_rlhf.metrics import EVALUATION_PROMPTS, PREFERENCE_TARGET, evaluate_policy, samples_to_preference
from toy_rlhf.pipeline import ensure_method, ensure_stage, machine, reward_stage, sft_stage, versions
from toy_rlhf.preferences import DEFAULT_PREFERENCE, resolve_preference
from toy_rlhf.report import write_report
from toy_rlhf.reward import RewardConfig
from toy_rlhf.sft import SFTConfig

REFERENCE = 'reference (SFT)'
PPO = METHODS['ppo']  # the story run_all tells is PPO's; the comparison of every method is compare.py


@dataclass
class RunAllConfig:
    betas: tuple[NonNegativeFloat, ...] = (1.0, 0.0)  # compared KL strengths; the first is the "aligned" one
    seed: Seed = 0  # random seed of every stage: the same seed gives the same numbers
    quick: bool = False  # a much smaller schedule, for smoke tests
    fresh: bool = False  # retrain every stage even if its checkpoint was made with the same settings
    prompt: tuple[Digit, Digit, Digit, Digit] = (5, 7, 1, 5)  # the prompt of the per-sentence figures
    response: tuple[Digit, Digit, Digit, Digit] = (6, 2, 7, 3)  # the response of the per-sentence figures
    device: Device = 'cpu'  # where SFT and the reward model train (PPO and evaluation run on the CPU)
    preference: str = DEFAULT_PREFERENCE  # first-digit, last-digit, digit-sum, distinct or module:function
    # The stages' own settings (flags --sft.iters, --reward.pairs, --ppo.learning-rate, ...); seed,
    # device, preference and beta come from the fields above.
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


def quick_schedule(config):
    """config with the stages' schedules cut to a smoke test's (seconds instead of a minute)."""
    return replace(config, quick=True, sft=replace(config.sft, iters=60, warmup_iters=10),
                   reward=replace(config.reward, iters=60, pairs=1000, held_out_pairs=500),
                   ppo=replace(config.ppo, iters=6, prompts_per_iter=32))


def stage_configs(config):
    """The settings of each training stage, keyed by checkpoint stem."""
    sft = replace(config.sft, seed=config.seed, device=config.device)
    reward = replace(config.reward, seed=config.seed, device=config.device, preference=config.preference)
    ppo = replace(config.ppo, seed=config.seed, preference=config.preference)
    return {'sft': sft, 'reward': reward, 'ppo': {beta: replace(ppo, beta=beta) for beta in config.betas}}


def run_all(run_dir, plots_dir, config, progress=True):
    """Run every stage into run_dir, draw the figures into plots_dir, write report.md,
    metrics.json and timings.json into run_dir. Returns the metrics."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    configs = stage_configs(config)
    # The reward model starts from the SFT policy, and PPO from both: new inputs mean a new run.
    timings = {'sft': ensure_stage(run_dir, 'sft', configs['sft'], (), sft_stage, config.fresh, progress),
               'reward': ensure_stage(run_dir, 'reward', configs['reward'], (run_dir / 'sft.pt',), reward_stage,
                                      config.fresh, progress)}
    stems = {beta: PPO.stem(ppo) for beta, ppo in configs['ppo'].items()}
    for beta, ppo in configs['ppo'].items():
        timings[stems[beta]] = ensure_method(run_dir, PPO, ppo, config.fresh, progress)

    start = time.perf_counter()
    reference = load_model(run_dir / 'sft.pt', 'policy')
    models = {REFERENCE: reference}
    histories = {}
    for beta in config.betas:
        models[f'beta={beta:g}'] = load_model(run_dir / f'{stems[beta]}.pt', 'policy')
        histories[f'beta={beta:g}'] = load_checkpoint(run_dir / f'{stems[beta]}.pt')['history']
    metrics = measure(run_dir, models, histories, config)
    timings['evaluation'] = {'seconds': time.perf_counter() - start}

    start = time.perf_counter()
    figures = draw(run_dir, plots_dir, models, histories, config, metrics)
    timings['figures'] = {'seconds': time.perf_counter() - start}
    timings['total'] = {'seconds': sum(stage['seconds'] for stage in timings.values())}

    settings = {'seed': config.seed, 'betas': list(config.betas), 'quick': config.quick,
                'preference': config.preference,
                'stages': {'sft': asdict(configs['sft']), 'reward': asdict(configs['reward']),
                           **{stems[beta]: asdict(ppo) for beta, ppo in configs['ppo'].items()}},
                'versions': versions(), 'machine': machine()}
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
    preference = resolve_preference(config.preference)
    return {
        'sft': {'language_kl': sft['language_kl'], 'entropy_floor': entropy_floor()},
        'reward': {'pairwise_accuracy': reward['pairwise_accuracy'], 'rank_rate': reward['rank_rate']},
        'policies': {label: evaluate_policy(model, reference, EVALUATION_PROMPTS, config.seed, preference)
                     for label, model in models.items()},
        'ppo_samples_to_99_percent_preference': {label: samples_to_preference(history, PREFERENCE_TARGET)
                                                 for label, history in histories.items()},
    }


def draw(run_dir, plots_dir, models, histories, config, metrics):
    """The figures; returns their paths by name. The first-digit probabilities are drawn for a
    preference on the first digit only."""
    prompt, response = torch.tensor(config.prompt), torch.tensor(config.response)
    reward_model = load_model(run_dir / 'reward.pt', 'reward')
    preference = resolve_preference(config.preference)
    rate_label = 'P(first digit is the preferred one)' if preference.first_token is not None \
        else 'P(the best gold level reachable)'
    figures = {
        'sft_loss': plots.plot_sft_loss(load_checkpoint(run_dir / 'sft.pt')['history'], entropy_floor(),
                                        plots_dir / 'sft_loss.png'),
        'reward_model': plots.plot_reward_model(load_checkpoint(run_dir / 'reward.pt')['history'], reward_model,
                                                prompt, response, plots_dir / 'reward_model.png',
                                                preference=preference),
        'ppo_curves': plots.plot_ppo_curves(histories, plots_dir / 'ppo_curves.png', rate_label=rate_label),
        'next_token_probs': plots.plot_next_token_probs(models, prompt, response,
                                                        plots_dir / 'next_token_probs.png', preference),
        'kl_by_position': plots.plot_kl_by_position(metrics['policies'], plots_dir / 'kl_by_position.png'),
        'attention': plots.plot_attention(models, prompt, response, plots_dir / 'attention.png'),
    }
    if preference.first_token is not None:
        figures['first_token'] = plots.plot_first_token(models, plots_dir / 'first_token.png', seed=config.seed)
    return figures
