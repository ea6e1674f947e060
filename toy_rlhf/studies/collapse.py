"""The collapse and the ceiling, measured exactly: where each method stops short of pi*, and why.

For one run (its SFT policy, reward model and preference):
- the collapse: each method trained from the SFT policy, measured every few rounds over all 10^4
  responses of held-out prompts: the mass of the most likely response, the entropy of responses, and
  the KL to the reference by position (chain rule), split into what pi* also pays at that position
  and the excess (the policy's less pi*'s; negative where it pays less);
- the ceiling: the best gap closed that any path of the exact optimiser (toy_rlhf.methods.exact)
  reached for this network on this preference, the path named; a method's optimiser gap is the
  ceiling less its own gap closed;
- the reward-model gap: what pi* of the reward model loses against pi* of the gold reward, under
  gold (its gold gap closed falls short of 1 by that much).
Writes collapse.md and collapse.json into the run folder and collapse.png into its plots: `toy-rlhf
collapse` (scripts/collapse.py).
"""
import functools
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from toy_rlhf import figures
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.executors import ExecutorConfig, executor, run_kept_jobs
from toy_rlhf.figures import MODEL_COLORS
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveInt, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.exact import ExactConfig, train_exact
from toy_rlhf.optimal import KL_POSITIONS, compare_to_optimum, digit_distribution, kl_split, optimal_log_probs
from toy_rlhf.preferences import resolve_preference
from toy_rlhf.run import Run, Variant, train_measured
from toy_rlhf.studies.output import markdown_table, write_study


@dataclass
class CollapseConfig(ExecutorConfig):
    methods: tuple[str, ...] = ('ppo', 'rloo', 'grpo')  # the sampled methods whose collapse is measured
    rounds: PositiveInt = 50  # rounds of each sampled method
    exact_steps: PositiveInt = 300  # steps of each exact-optimiser path (the forward path: half forward, half reverse)
    exact_prompts_per_step: PositiveInt = 8  # prompts per exact step
    exact_pool: PositiveInt = 128  # prompts the exact steps draw from (their tables computed once)
    measure_every: PositiveInt = 5  # rounds (or steps) between measurements
    prompts: ExactPrompts = 20  # held-out prompts of every measurement (each: all 10^4 responses)
    beta: NonNegativeFloat = 1.0  # the KL strength of every run
    seed: Seed = 0  # random seed of every run and of the held-out prompts
    preference: str = ''  # the run's (its reward model's); name it only if it is module:function, imported only when named
    fresh: bool = False  # train every run and path again, even those kept from an earlier call with the same settings


# ---------------------------------------------------------------------------------------------
# The measurements, as pure functions of (P, 10^4) tables.

def collapse_stats(log_pi, log_ref, log_optimum):
    """A policy's collapse statistics, means over prompts: top_mass (the most likely response's
    probability), entropy (of responses, nats), and per position t the KL term kl_t, pi*'s own kl_t
    and the excess kl_t(pi) - kl_t(pi*). (P, 10^4) x 3 -> {name: float}."""
    q = digit_distribution(log_pi).exp()
    own, optimum = kl_split(log_pi, log_ref), kl_split(log_optimum, log_ref)
    row = {'top_mass': q.amax(dim=1).mean().item(),
           'entropy': -(torch.where(q > 0, q * q.log(), 0.0)).sum(dim=1).mean().item(),
           'kl_total': own['kl_total'].mean().item(),
           'excess_kl': (own['kl_total'] - optimum['kl_total']).mean().item()}
    for name in KL_POSITIONS:
        row[name] = own[name].mean().item()
        row[f'optimal_{name}'] = optimum[name].mean().item()
        row[f'excess_{name}'] = row[name] - row[f'optimal_{name}']
    return row


class CollapseMeasure:
    """measure(rounds, policy) for a training loop: every `every` rounds, the collapse statistics and
    the gap closed (reward model, and gold at the run's margin) on the held-out tables."""

    def __init__(self, tables, gold, beta, every):
        self.tables, self.gold, self.beta, self.every = tables, gold, beta, every
        self.optimum = optimal_log_probs(tables.log_ref, tables.rewards, beta)
        self.seconds = 0.0

    def __call__(self, rounds, policy):
        if rounds % self.every:
            return {}
        start = time.perf_counter()
        row = {f'collapse/{name}': value for name, value in self.measure(all_response_log_probs(policy.eval(),
                                                                                                  self.tables.prompts)).items()}
        self.seconds += time.perf_counter() - start
        return row

    def measure(self, log_pi):
        t = self.tables
        exact = compare_to_optimum(log_pi, t.log_ref, t.rewards, t.prompts, self.beta, t.preference)
        gold = compare_to_optimum(log_pi, t.log_ref, self.gold, t.prompts, self.beta, t.preference)
        return {**collapse_stats(log_pi, t.log_ref, self.optimum), 'gap_closed': exact['gap_closed'],
                'gold_gap_closed': gold['gap_closed'], 'non_digit_mass': exact['non_digit_mass']}


# ---------------------------------------------------------------------------------------------
# The runs.

def exact_paths(config):
    """The exact optimiser's paths to the ceiling: (label, [ExactConfig, ...]), the configs run one
    after the other, each starting where the previous ended."""
    base = ExactConfig(beta=config.beta, iters=config.exact_steps, prompts_per_iter=config.exact_prompts_per_step,
                       prompt_pool=config.exact_pool, seed=config.seed)
    half = replace(base, iters=max(1, config.exact_steps // 2))
    return [('exact, reverse KL from SFT', [base]),
            ('exact, beta 8 -> target', [replace(base, beta_start=8.0)]),
            ('exact, forward KL then reverse', [replace(half, divergence='forward'), half])]


def exact_path_job(configs, sft_policy, reward_model, preference, measure, progress=True, threads=None):
    """Train the configs of an exact path in turn from sft_policy, each starting where the previous
    ended, measured as they train (a pure function of its arguments, so that a worker can run it):
    (the history of all of its steps, numbered on; its seconds, the measurements' left out)."""
    if threads:
        torch.set_num_threads(threads)
    started, measured = time.perf_counter(), measure.seconds
    policy, history = None, []
    for config in configs:
        policy, rows = train_exact(sft_policy, reward_model, config, resolve_preference(preference), progress=progress,
                                   measure=functools.partial(measure_after, measure, len(history)),
                                   start_policy=policy)
        history += rows
    return history, time.perf_counter() - started - (measure.seconds - measured)


def measure_after(measure, done, steps, model):
    """measure(done + steps, model): a later stage of a path counts its steps on from the earlier ones."""
    return measure(done + steps, model)


def collapse(run_dir, plots_dir, config, progress=True):
    """Measure every method and exact path of config on the run (an empty run folder gets its SFT
    policy and reward model first); write run_dir/collapse.md and .json and plots_dir/collapse.png;
    returns the record."""
    run = Run(run_dir, config.preference, progress=progress).build(config.seed)
    tables = run.tables(sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed + 1_000)))
    gold = tables.gold(run.gold_margin)
    measure = CollapseMeasure(tables, gold, config.beta, config.measure_every)
    start = {'round': 0, **measure.measure(tables.log_ref)}
    models = (run.sft_policy, run.reward_model)
    jobs = {METHODS[name].label: (train_measured, name, Variant(name, config.beta, config.seed,
                                                                (('iters', config.rounds),)).config(),
                                  run.preference.name, *models, measure)
            for name in config.methods}  # each sampled method at its defaults but beta, seed and rounds
    jobs.update({label: (exact_path_job, configs, *models, run.preference.name, measure)
                 for label, configs in exact_paths(config)})
    histories = {}
    with executor(config) as pool:
        run_kept_jobs(pool, jobs, lambda label, made: histories.update({label: made[0]}),
                      run.folder / 'collapse_runs.json', config, (run.sft_path, run.reward_path), progress)
    curves = [curve(label, start, histories[label]) for label in jobs]
    optimum = optimal_log_probs(tables.log_ref, tables.rewards, config.beta)
    exact = [c for c in curves if c['label'].startswith('exact')]
    best = max(exact, key=lambda c: c['rows'][-1]['gap_closed'])
    record = {'preference': run.preference.name, 'settings': asdict(config), 'curves': curves,
              'optimum': measure.measure(optimum), 'reward_model_gap': 1 - measure.measure(optimum)['gold_gap_closed'],
              'ceiling': best['rows'][-1]['gap_closed'], 'ceiling_path': best['label']}
    figure = plot_collapse(record, Path(plots_dir) / 'collapse.png')
    report = write_study(run.folder, 'collapse', collapse_report(record), record, figure)
    print(f'Collapse: {report}, {figure}')
    return record


def curve(label, start, history):
    """{'label', 'rows'}: the measured rows of a history (those with collapse numbers), from `start`."""
    rows = [start] + [{'round': index + 1, **{key.split('/', 1)[1]: value for key, value in row.items()
                                              if key.startswith('collapse/')}}
                      for index, row in enumerate(history) if 'collapse/top_mass' in row]
    return {'label': label, 'rows': rows}


# ---------------------------------------------------------------------------------------------
# The table and the figure.

def collapse_report(record):
    """The study's Markdown: the final numbers of every curve, the ceiling, each method's optimiser gap."""
    finals = {c['label']: c['rows'][-1] for c in record['curves']}
    ceiling, ceiling_label = record['ceiling'], record['ceiling_path']
    header = ['policy', 'rounds', 'gap closed', 'optimiser gap', 'gold gap closed', 'top mass', 'entropy',
              *[f'excess {name}' for name in KL_POSITIONS], 'SEP mass']
    rows = [[label, str(row['round']), f"{row['gap_closed']:.1%}",
             f"{ceiling - row['gap_closed']:+.1%}", f"{row['gold_gap_closed']:.1%}", f"{row['top_mass']:.3f}",
             f"{row['entropy']:.2f}", *[f"{row[f'excess_{name}']:+.3f}" for name in KL_POSITIONS],
             f"{row['non_digit_mass']:.1e}"] for label, row in finals.items()]
    optimum = record['optimum']
    rows.append(['pi* (reward model)', '', '100.0%', '', f"{optimum['gold_gap_closed']:.1%}",
                 f"{optimum['top_mass']:.3f}", f"{optimum['entropy']:.2f}", *['+0.000'] * len(KL_POSITIONS), ''])
    return (f"# Collapse and ceiling: {record['preference']}\n\n"
            f"Ceiling (best exact path): {ceiling:.1%}, by '{ceiling_label}'. Reward-model gap (pi* of the "
            f"reward model against pi* of gold, under gold): {record['reward_model_gap']:.1%}.\n\n"
            + markdown_table(header, rows) + '\n')


def plot_collapse(record, path):
    """Top mass, response entropy and excess KL against rounds, one curve per policy; pi*'s dashed."""
    panels = [('top_mass', 'mass of the most likely response'), ('entropy', 'response entropy (nats)'),
              ('excess_kl', 'KL beyond what pi* pays (nats)'), ('gap_closed', 'gap to J* closed')]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.5), layout='constrained')
    for ax, (key, title) in zip(axes, panels):
        for color, c in zip(MODEL_COLORS, record['curves']):
            ax.plot([row['round'] for row in c['rows']], [row[key] for row in c['rows']], color=color, label=c['label'])
        optimum = record['optimum'].get(key, 0.0 if key == 'excess_kl' else None)
        if optimum is not None:
            ax.axhline(optimum, color='black', linestyle='--', linewidth=1, label='pi*')
        ax.set(title=title, xlabel='rounds (exact: steps)')
    axes[0].legend(fontsize=8)
    fig.suptitle(f"The collapse on {record['preference']}: every policy against pi* (beta={record['settings']['beta']:g})")
    return figures.save(fig, path)
