"""Credit assignment, measured: how each online method passes the reward back to the tokens that earned it.

The reward model scores the whole response at its last token. Where the preference depends on earlier
tokens (last-digit: the last digit can be (x4 + 4) % 10 only if the earlier ones counted up to it), a
method has to tell which tokens earned the score, each its own way:

  PPO, leave-one-out        every token's return to go minus the mean of the other samples' of the
                            prompt at the same position: no network
  PPO, critic, GAE 0.95     a learned value of every prefix; GAE with lambda 0.95 leans on it
  PPO, critic, GAE 1        the Monte-Carlo return to go minus the learned value
  RLOO                      one advantage for the whole response: score - beta * KL, leave-one-out
  GRPO                      one group-normalised advantage for the whole response, k3 KL in the loss
                            (TRL's default, whose fixed point is not pi*: toy_rlhf/methods/grpo.py)

Each is trained from the run's SFT policy and reward model on the same seeds and measured exactly
(all 10^4 responses of the evaluation prompts) every few rounds: the rate of the preference's best
gold level, the gap to J* closed under the reward model and under the gold reward, and the KL per
position next to pi*'s. The measurements ride in each run's log; they draw no random numbers, so a
measured run is the same run as an unmeasured one.
"""
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.lines import Line2D

from toy_rlhf import figures
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.executors import ExecutorConfig, executor, run_kept_jobs
from toy_rlhf.figures import DASHES, FIGURE_SIZES
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveInt, Probability, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import (EXACT_PROMPTS, KL_POSITIONS, distribution_summary, expected_reward, gold_metrics,
                              kl_split, objective, optimal_log_probs, optimal_value)
from toy_rlhf.run import Run, Variant, train_measured
from toy_rlhf.studies.output import markdown_table, write_study


@dataclass
class CreditConfig(ExecutorConfig):
    seed: Seed = 0  # seed of the evaluation prompts and of the first run of each variant
    runs: PositiveInt = 3  # runs of each variant, on seeds seed, seed + 1, ...
    beta: NonNegativeFloat = 1.0  # KL strength of every run
    # On last-digit PPO's best-level rate takes off after 50-100 rounds and levels off by 200.
    iters: PositiveInt = 200  # rollout-and-update rounds of every run
    measure_every: PositiveInt = 10  # rounds between exact measurements
    target: Probability = 0.95  # samples to this fraction of pi*'s best-level rate are counted
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of the exact evaluation (each: all 10^4 responses)
    preference: str = ''  # the run's (its reward model's); name it only if it is module:function, imported only when named
    fresh: bool = False  # train every run again, even those kept from an earlier call with the same settings


def credit_variants():
    """Every online method of the registry that learns from the reward model, at its defaults and at
    each of its presets: [(Variant, colour)], seeds and schedule set by the study."""
    variants = []
    for method in METHODS.values():
        if method.trains_online_on_a_reward_model:
            variants.append((Variant(method.name, label=method.label), method.color))
            variants += [(Variant(method.name, settings=settings, label=label), color)
                         for label, settings, color in method.presets]
    return variants


def samples_to_target(history, target_rate):
    """Rollout samples drawn until the exactly measured best-level rate first reached target_rate
    (None if it never did); only rounds that were measured count."""
    return next((row['samples'] for row in history if row.get('exact/best_level_rate', -1) >= target_rate), None)


class ExactMeasure:
    """measure(rounds, actor) for a training loop: every `every` rounds and at `last`, the policy's
    exact best-level rate, gap to J* closed (reward model and gold) and KL per position; and the
    seconds it spends, so that they can be left out of the run's time. J* and J_ref are the same for
    every measurement, so they are computed once."""

    def __init__(self, tables, gold, beta, every, last):
        self.tables, self.beta, self.every, self.last = tables, beta, every, last
        self.rewards = {'gap_closed': tables.rewards, 'gold_gap_closed': gold}
        self.bounds = {name: (expected_reward(tables.log_ref, rewards).mean().item(),
                              optimal_value(tables.log_ref, rewards, beta).mean().item())
                       for name, rewards in self.rewards.items()}
        self.seconds = 0.0

    def __call__(self, rounds, actor):
        if rounds % self.every and rounds != self.last:
            return {}
        start = time.perf_counter()
        tables = self.tables
        log_pi = all_response_log_probs(actor.eval(), tables.prompts)
        kl = kl_split(log_pi, tables.log_ref)
        best_level_rate = gold_metrics(log_pi, tables.prompts, tables.preference)['preference_rate']
        row = {'exact/best_level_rate': best_level_rate.mean().item(),
               **{f'exact/{name}': kl[name].mean().item() for name in ('kl_total', *KL_POSITIONS)}}
        for name, rewards in self.rewards.items():
            J_ref, J_star = self.bounds[name]
            J = objective(log_pi, tables.log_ref, rewards, self.beta).mean().item()
            row[f'exact/{name}'] = (J - J_ref) / (J_star - J_ref)
        self.seconds += time.perf_counter() - start
        return row


def credit_assignment(run_dir, plots_dir, config, progress=True):
    """Train every variant on every seed from the run's checkpoints, measure exactly, draw
    plots_dir/credit_assignment.png, write run_dir/credit_assignment.md and .json; returns the summary."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    run = Run(run_dir, config.preference, progress=progress).build(config.seed)
    tables = run.tables(sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed)))
    gold = tables.gold(run.gold_margin)
    optimum = distribution_summary(optimal_log_probs(tables.log_ref, tables.rewards, config.beta), tables.log_ref,
                                   tables.rewards, tables.prompts, run.preference)
    target_rate = config.target * optimum['preference_rate']
    # Every curve starts from the SFT policy, measured the same way (gap closed 0 by definition).
    start = {'samples': 0, **ExactMeasure(tables, gold, config.beta, 1, 0)(0, run.sft_policy)}

    variants = credit_variants()
    seeds = range(config.seed, config.seed + config.runs)
    runs = {(variant.label, seed): replace(variant, beta=config.beta, seed=seed,
                                           settings=(*variant.settings, ('iters', config.iters)))
            for variant, _ in variants for seed in seeds}
    trained = {}  # (label, seed): (history, seconds)
    with executor(config) as pool:
        run_kept_jobs(pool, {key: (train_measured, seeded.method, seeded.config(), run.preference.name, run.sft_policy,
                                   run.reward_model, ExactMeasure(tables, gold, config.beta, config.measure_every,
                                                                  config.iters))
                             for key, seeded in runs.items()}, trained.__setitem__,
                      run_dir / 'credit_assignment_runs.json', config, (run.sft_path, run.reward_path), progress)

    curves, summary = [], {}  # curves: one record per variant and seed, {'variant', 'seed', 'rows'}
    for variant, _ in variants:
        finals = []
        for seed in seeds:
            history, seconds = trained[variant.label, seed]
            history = [start, *history]
            curves.append({'variant': variant.label, 'seed': seed, 'rows': history})
            finals.append(final_numbers(history, seed, target_rate, seconds))
        summary[variant.label] = {'runs': finals, **medians(finals)}
        print_variant(variant.label, summary[variant.label])

    result = {'preference': run.preference.name, 'settings': asdict(config), 'target_rate': target_rate,
              'optimum': {name: optimum[name] for name in ('preference_rate', 'kl_total', *KL_POSITIONS)},
              'variants': summary}
    figure = plot_credit_assignment(curves, {variant.label: color for variant, color in variants}, result,
                                    plots_dir / 'credit_assignment.png')
    report = write_study(run_dir, 'credit_assignment', credit_report(result), result, figure)
    print(f'Credit assignment: {report}, {figure}')
    return result


def final_numbers(history, seed, target_rate, seconds):
    """What one run of a variant ends with: its last measurement, and the samples it took to the target."""
    final = history[-1]
    return {'seed': seed, 'samples_to_target': samples_to_target(history, target_rate),
            'gap_closed': final['exact/gap_closed'], 'gold_gap_closed': final['exact/gold_gap_closed'],
            'best_level_rate': final['exact/best_level_rate'], 'kl_total': final['exact/kl_total'],
            **{name: final[f'exact/{name}'] for name in KL_POSITIONS}, 'seconds': seconds}


def medians(runs):
    """The median over seeds of each number (samples to target: over the runs that reached it, and
    how many did)."""
    reached = [run['samples_to_target'] for run in runs if run['samples_to_target'] is not None]
    numbers = [name for name in runs[0] if name not in ('seed', 'samples_to_target')]
    return {'median_samples_to_target': statistics.median(reached) if reached else None, 'reached': len(reached),
            **{name: statistics.median(run[name] for run in runs) for name in numbers}}


def print_variant(label, row):
    reached = ', '.join('never' if run['samples_to_target'] is None else f"{run['samples_to_target']:,}"
                        for run in row['runs'])
    print(f"{label}: samples to target {reached}, "
          f"gap closed {row['gap_closed']:.2%} (gold {row['gold_gap_closed']:.2%}), median {row['seconds']:.1f} s")


def credit_table(result):
    """The medians over seeds of every variant, against pi*."""
    optimum = result['optimum']
    baseline_seconds = next(iter(result['variants'].values()))['seconds']  # the first variant's: PPO's
    rows = []
    for label, row in result['variants'].items():
        samples = 'not reached' if row['median_samples_to_target'] is None else f"{row['median_samples_to_target']:,.0f}"
        rows.append([label, f"{samples} ({row['reached']}/{len(row['runs'])})", f"{row['gap_closed']:.2%}",
                     f"{row['gold_gap_closed']:.2%}", f"{row['best_level_rate']:.2%}", f"{row['kl_total']:.2f}",
                     *(f'{row[name]:.2f}' for name in KL_POSITIONS), f"{row['seconds'] / baseline_seconds:.2f}x"])
    rows.append(['pi*', '', '100.00%', '', f"{optimum['preference_rate']:.2%}", f"{optimum['kl_total']:.2f}",
                 *(f'{optimum[name]:.2f}' for name in KL_POSITIONS), ''])
    header = ['variant', 'samples to target', 'gap closed', 'gap closed (gold)', 'best level', 'KL',
              *(f'KL y{position}' for position in range(1, len(KL_POSITIONS) + 1)), 'time']
    return markdown_table(header, rows)


def credit_report(result):
    """credit_assignment.md: the table of medians over seeds, against pi*."""
    settings = result['settings']
    return f"""# Credit assignment: {result['preference']}

Every variant trained {settings['iters']} rounds at beta = {settings['beta']:g} from the run's SFT policy and
reward model, seeds {settings['seed']} to {settings['seed'] + settings['runs'] - 1}; measured exactly over all 10^4 responses of
{settings['prompts']} prompts every {settings['measure_every']} rounds. Medians over seeds. Samples: rollout
samples until the best-level rate first reached {settings['target']:.0%} of pi*'s ({result['target_rate']:.2%}),
and how many seeds did. Gap closed: (J - J_ref) / (J* - J_ref) under the reward model, and under the
gold reward. Time: training seconds (measurements left out) relative to PPO with the leave-one-out baseline.

{credit_table(result)}
"""


def plot_credit_assignment(curves, colors, result, path):
    """The exact best-level rate and the gap to J* closed against rollout samples, one line per
    variant and seed (colour: variant, dashes: seed), and the KL each variant spends per position at
    the end (median over seeds) beside pi*'s.

    curves: records {'variant' (its label), 'seed', 'rows'}, the measured rows carrying 'exact/...'
    numbers; colors: variant label -> colour; result: credit_assignment's summary."""
    seeds = sorted({curve['seed'] for curve in curves})
    fig, (rate, gap, kl) = plt.subplots(1, 3, figsize=FIGURE_SIZES['credit_assignment'], layout='constrained')
    for curve in curves:
        measured = [row for row in curve['rows'] if 'exact/best_level_rate' in row]
        samples = [row['samples'] for row in measured]
        style = dict(color=colors[curve['variant']], linestyle=DASHES[seeds.index(curve['seed']) % len(DASHES)],
                     linewidth=1.5)
        rate.plot(samples, [row['exact/best_level_rate'] for row in measured], **style)
        gap.plot(samples, [row['exact/gap_closed'] for row in measured], **style)
    optimum = result['optimum']
    rate.axhline(optimum['preference_rate'], color='black', linestyle='--', linewidth=1)
    rate.axhline(result['target_rate'], color='black', linestyle=':', linewidth=1)
    rate.set_ylim(0, 1.02)
    rate.set_ylabel('rate of the best gold level (exact)')
    rate.set_title(f"Best-level rate ({result['preference']}); dashed: pi*, dotted: the target")
    gap.axhline(1.0, color='black', linestyle='--', linewidth=1)
    gap.set_ylim(min(0.0, gap.get_ylim()[0]), 1.05)
    gap.set_ylabel('gap to J* closed (reward model)')
    gap.set_title('(J - J_ref) / (J* - J_ref); dashed: pi*')
    for ax in (rate, gap):
        ax.set_xlabel('rollout samples')
        ax.grid(alpha=0.3)
    _kl_by_position(kl, result['variants'], optimum, colors)
    handles = [Line2D([], [], color=colors[variant], linewidth=2.5, label=variant) for variant in result['variants']]
    handles += [Line2D([], [], color='black', linestyle=DASHES[i % len(DASHES)], label=f'seed {seed}')
                for i, seed in enumerate(seeds)]
    handles.append(Line2D([], [], color='black', marker='_', markersize=20, linestyle='none', label='pi*'))
    fig.legend(handles=handles, loc='outside lower center', ncols=min(len(handles), 5), fontsize=9)
    fig.suptitle(f"Credit assignment at beta = {result['settings']['beta']:g}: every variant from the same SFT "
                 'policy and reward model, measured exactly')
    return figures.save(fig, path)


def _kl_by_position(ax, variants, optimum, colors):
    """Bars of each variant's median KL per position, pi*'s as a black tick over each group."""
    positions = np.arange(len(KL_POSITIONS))
    width = 0.8 / len(variants)
    for i, (variant, row) in enumerate(variants.items()):
        ax.bar(positions - 0.4 + width * (i + 0.5), [row[name] for name in KL_POSITIONS], width,
               color=colors[variant], label=variant)
    ax.scatter(positions, [optimum[name] for name in KL_POSITIONS], marker='_', s=900, color='black', linewidth=2.5,
               zorder=3, label='pi*')
    ax.set_xticks(positions, [f'y{t + 1}' for t in positions])
    ax.set_ylabel('KL at the position, nats (median over seeds)')
    ax.set_title('Where the KL is spent, at the end')
    ax.grid(alpha=0.3, axis='y')
