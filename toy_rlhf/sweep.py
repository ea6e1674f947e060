"""The beta sweep: PPO (and DPO) policies for several betas, each measured exactly against the
closed-form optimum of its own objective, and the frontier they lie on.

The tables that make exact evaluation possible (log pi_ref and the reward of all 10^4 responses per
prompt) are computed once and reused for every policy and every beta.
"""
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toy_rlhf import plots
from toy_rlhf.checkpoint import load_model
from toy_rlhf.data import gold_reward
from toy_rlhf.dpo import DPOConfig
from toy_rlhf.language import sample_prompts
from toy_rlhf.optimal import (all_responses, compare_to_optimum, optimal_frontier,
                              response_log_probs_exact, response_rewards_exact)
from toy_rlhf.files import write_json, write_text
from toy_rlhf.pipeline import PPOConfig, dpo_name, dpo_stage, ppo_name, ppo_stage, stage_is_current
from toy_rlhf.ppo import train_ppo
from toy_rlhf.run_all import samples_to_preference

# The optimum's frontier is drawn through these betas (log-spaced, plus the limits on both sides).
FRONTIER_BETAS = [0.0] + [10 ** (k / 8) for k in range(-20, 13)]


@dataclass
class SweepConfig:
    betas: tuple = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)  # PPO runs, one per beta
    dpo_betas: tuple = (0.1, 1.0)  # DPO runs on the same preference pairs
    prompts: int = 100  # prompts of the exact evaluation (each: all 10^4 responses)
    seed: int = 0
    fresh: bool = False  # retrain even where a checkpoint with the same settings exists


def train_policies(run_dir, config, progress=True):
    """PPO for every beta and DPO for every DPO beta, reusing current checkpoints; returns
    {label: (method, beta, checkpoint path)}."""
    run_dir = Path(run_dir)
    policies = {}
    for method, betas, make_config, stage, name, inputs in (
            ('PPO', config.betas, PPOConfig, ppo_stage, ppo_name, (run_dir / 'sft.pt', run_dir / 'reward.pt')),
            ('DPO', config.dpo_betas, DPOConfig, dpo_stage, dpo_name, (run_dir / 'sft.pt',))):
        for beta in betas:
            stage_config = make_config(beta=beta, seed=config.seed)
            path = run_dir / f'{name(beta)}.pt'
            if not config.fresh and stage_is_current(path, stage_config, inputs):
                print(f'{name(beta)}: reusing {path} (made with the same settings)')
            else:
                stage(run_dir, stage_config, progress)
            policies[f'{method} beta={beta:g}'] = (method, beta, path)
    return policies


def sweep(run_dir, plots_dir, config, progress=True):
    """Train, evaluate exactly, draw plots_dir/frontier.png and write run_dir/sweep.md and
    sweep.json. Returns the rows of the table."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    policies = train_policies(run_dir, config, progress)

    start = time.perf_counter()
    prompts = sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed))
    reference = load_model(run_dir / 'sft.pt', 'policy')
    log_ref = response_log_probs_exact(reference, prompts)
    rewards = response_rewards_exact(load_model(run_dir / 'reward.pt', 'reward'), prompts)
    # DPO never sees the reward model: its own optimum is built from the labeler's gold reward.
    margin = DPOConfig().gold_margin
    gold = torch.stack([gold_reward(prompt.expand(len(all_responses()), -1), all_responses(), margin)
                        for prompt in prompts]).double()

    rows = []
    for label, (method, beta, path) in policies.items():
        log_pi = response_log_probs_exact(load_model(path, 'policy'), prompts)
        row = {'label': label, 'method': method, **compare_to_optimum(log_pi, log_ref, rewards, prompts, beta)}
        if method == 'DPO':
            against_gold = compare_to_optimum(log_pi, log_ref, gold, prompts, beta)
            row.update({f'gold_objective_{key}': against_gold[key] for key in ('J', 'J_star', 'gap_closed')})
        rows.append(row)
    frontier = optimal_frontier(log_ref, rewards, prompts, FRONTIER_BETAS)
    seconds = time.perf_counter() - start

    figure = plots.plot_frontier(frontier, rows, plots_dir / 'frontier.png')
    write_json(run_dir / 'sweep.json', {'prompts': config.prompts, 'seed': config.seed, 'policies': rows,
                                        'frontier': frontier})
    write_text(run_dir / 'sweep.md', sweep_report(rows, config, figure, run_dir))
    print(f'Sweep: {len(rows)} policies evaluated exactly on {config.prompts} prompts x 10^4 responses '
          f'in {seconds:.1f} s; table in {run_dir / "sweep.md"}, figure {figure}')
    return rows


def sweep_table(rows):
    """The Markdown table of the sweep: one row per policy."""
    lines = ['| policy | J | J* | gap closed | preference | fidelity | gold | KL | KL first | KL later |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for row in rows:
        gap = '' if math.isnan(row['gap_closed']) else f"{row['gap_closed']:.4f}"
        lines.append(f"| {row['label']} | {row['J']:.3f} | {row['J_star']:.3f} | {gap} | "
                     f"{row['preference_rate']:.2%} | {row['fidelity']:.2%} | {row['gold_rate']:.2%} | "
                     f"{row['kl_total']:.3f} | {row['kl_first']:.3f} | {row['kl_later']:.3f} |")
    return '\n'.join(lines)


def sweep_report(rows, config, figure, run_dir):
    optimum_lines = '\n'.join(
        f"| {row['beta']:g} | {row['optimal_preference_rate']:.2%} | {row['optimal_fidelity']:.2%} | "
        f"{row['optimal_gold_rate']:.2%} | {row['optimal_kl_total']:.3f} | {row['optimal_kl_later']:.3f} |"
        for row in rows if row['method'] == 'PPO')
    dpo_lines = '\n'.join(
        f"| {row['label']} | {row['gold_objective_J']:.3f} | {row['gold_objective_J_star']:.3f} | "
        f"{row['gold_objective_gap_closed']:.4f} |" for row in rows if row['method'] == 'DPO')
    relative_figure = Path(os.path.relpath(figure, run_dir)).as_posix()
    return f"""# Beta sweep

Exact, over all 10^4 responses of {config.prompts} prompts (seed {config.seed}). J = E[r] - beta * KL(pi || pi_ref)
under the reward model, J* its maximum (the closed-form optimum at the same beta), gap closed =
(J - J_ref) / (J* - J_ref) with J_ref the reference's own J. KL first: the part of the KL spent on the
first digit; KL later: on digits 2-4. The reward depends almost only on the first digit, so the optimum
spends almost nothing on digits 2-4: KL a policy spends there is waste, or reward hacking.

{sweep_table(rows)}

The optimum itself at each PPO beta (what the best possible policy under this reward model does):

| beta | preference | fidelity | gold | KL | KL later |
|---|---:|---:|---:|---:|---:|
{optimum_lines}

DPO against the optimum built from the *true* preference (the labeler's gold reward,
{DPOConfig().gold_margin:g} for the preferred first digit), which is the objective DPO solves:

| policy | J (gold) | J* (gold) | gap closed |
|---|---:|---:|---:|
{dpo_lines}

![frontier]({relative_figure})
"""


def compare_critic(run_dir, plots_dir, seeds=(0, 1, 2), beta=1.0, progress=True):
    """PPO at beta with the leave-one-out baseline and with a critic, on the same seeds, from the
    run's SFT policy and reward model: draws plots_dir/ppo_variants.png and returns, per variant,
    the median rollout samples to 99% preference and the median wall seconds."""
    run_dir = Path(run_dir)
    reference = load_model(run_dir / 'sft.pt', 'policy')
    reward_model = load_model(run_dir / 'reward.pt', 'reward')
    histories, summary = {}, {}
    for variant, critic in (('leave-one-out', False), ('critic', True)):
        samples, seconds = [], []
        for seed in seeds:
            start = time.perf_counter()
            _, history = train_ppo(reference, reward_model, PPOConfig(beta=beta, seed=seed, critic=critic), progress)
            seconds.append(time.perf_counter() - start)
            samples.append(samples_to_preference(history, 0.99))
            histories[f'{variant}, seed {seed}'] = history
        reached = [count for count in samples if count is not None]
        summary[variant] = {'samples_to_99_percent_preference': samples,
                            'median_samples': statistics.median(reached) if reached else None,
                            'median_seconds': statistics.median(seconds)}
        print(f"{variant}: samples to 99% preference {samples}, median {summary[variant]['median_seconds']:.1f} s")
    figure = plots.plot_ppo_variants(histories, plots_dir / 'ppo_variants.png')
    write_json(run_dir / 'ppo_variants.json', summary)
    print(f'PPO variants: {figure}, {run_dir / "ppo_variants.json"}')
    return summary
