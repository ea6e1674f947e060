"""The beta sweep: PPO (and DPO) policies for several betas, each measured exactly against the
closed-form optimum of its own objective, and the frontier they lie on.

The tables that make exact evaluation possible (log pi_ref and the reward of all 10^4 responses per
prompt) are computed once and reused for every policy and every beta.
"""
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from toy_rlhf import plots
from toy_rlhf.compare import FRONTIER_BETAS, variant_row
from toy_rlhf.files import write_json, write_text
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveFloat, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import EXACT_PROMPTS, optimal_frontier
from toy_rlhf.run import Run, Variant


SWEPT = ('ppo', 'dpo')  # the methods of the sweep (their settings: --ppo.*, --dpo.*)


@dataclass
class SweepConfig:
    betas: tuple[NonNegativeFloat, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)  # PPO runs, one per beta
    dpo_betas: tuple[PositiveFloat, ...] = (0.1, 1.0)  # DPO runs on the same preference pairs
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of the exact evaluation (each: all 10^4 responses)
    seed: Seed = 0  # random seed of every run and of the evaluation prompts
    fresh: bool = False  # retrain even where a checkpoint with the same settings exists
    preference: str = ''  # the run's (its reward model's); name it only if it is module:function, imported only when named


def sweep_variants(config, method_configs=None):
    """PPO at every beta and DPO at every DPO beta, on the sweep's seed, with the settings in
    method_configs ({name: config}) where given."""
    return [Variant.of(replace((method_configs or {}).get(name) or METHODS[name].config(), beta=beta, seed=config.seed),
                       name)
            for name, betas in zip(SWEPT, (config.betas, config.dpo_betas)) for beta in betas]


def sweep(run_dir, plots_dir, config, method_configs=None, progress=True):
    """Train, evaluate exactly, draw plots_dir/frontier.png and write run_dir/sweep.md and
    sweep.json. method_configs: {'ppo': ..., 'dpo': ...}, the methods' other settings (their beta,
    seed and preference are set here). Returns the rows of the table."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    run = Run(run_dir, config.preference, config.fresh, progress).build(config.seed)
    variants = sweep_variants(config, method_configs)
    run.train(variants)

    start = time.perf_counter()
    tables = run.tables(sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed)))
    rows = [variant_row(run, variant, tables) for variant in variants]
    frontier = optimal_frontier(tables.log_ref, tables.rewards, tables.prompts, FRONTIER_BETAS, tables.preference)
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
    lines = ['| policy | J | J* | gap closed | gap closed (gold) | preference | fidelity | gold | KL | '
             'KL first | KL later |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for row in rows:
        lines.append(f"| {row['label']} | {row['J']:.3f} | {row['J_star']:.3f} | {_rate(row['gap_closed'])} | "
                     f"{_rate(row['gold_gap_closed'])} | {row['preference_rate']:.2%} | {row['fidelity']:.2%} | "
                     f"{row['gold_rate']:.2%} | {row['kl_total']:.3f} | {row['kl_first']:.3f} | "
                     f"{row['kl_later']:.3f} |")
    return '\n'.join(lines)


def _rate(value):
    return 'n/a' if value is None else f'{value:.4f}'


def sweep_report(rows, config, figure, run_dir):
    optimum = {row['beta']: row for row in rows}  # the optimum depends on beta only
    optimum_lines = '\n'.join(
        f"| {beta:g} | {row['optimal_preference_rate']:.2%} | {row['optimal_fidelity']:.2%} | "
        f"{row['optimal_gold_rate']:.2%} | {row['optimal_kl_total']:.3f} | {row['optimal_kl_later']:.3f} |"
        for beta, row in sorted(optimum.items()))
    relative_figure = Path(os.path.relpath(figure, run_dir)).as_posix()
    return f"""# Beta sweep

Exact, over all 10^4 responses of {config.prompts} prompts (seed {config.seed}). J = E[r] - beta * KL(pi || pi_ref)
under the reward model, J* its maximum (the closed-form optimum at the same beta), gap closed =
(J - J_ref) / (J* - J_ref) with J_ref the reference's own J. Gap closed (gold): the same with the
labeler's gold reward in place of the reward model, the objective DPO solves. KL first: the part of
the KL spent on the first digit; KL later: on digits 2-4. The reward depends almost only on the first
digit, so the optimum spends almost nothing on digits 2-4: KL a policy spends there is waste, or
reward hacking.

{sweep_table(rows)}

The optimum itself at each beta (what the best possible policy under this reward model does):

| beta | preference | fidelity | gold | KL | KL later |
|---|---:|---:|---:|---:|---:|
{optimum_lines}

![frontier]({relative_figure})
"""
