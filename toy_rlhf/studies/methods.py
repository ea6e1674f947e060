"""Every registered method, trained from the same SFT policy and reward model, measured exactly
against the optimum it aims at: where each one lands, and how fast it gets there (`toy-rlhf compare`).

For each beta: every method that trains is run (in parallel processes with --workers), a method
without a network (best-of-n) gives its exact distribution directly, and each resulting policy is
evaluated over all 10^4 responses of the same prompts (toy_rlhf.studies.against_optimum): J against
J*, the KL from pi* and from the method's own exact target (where that differs from pi*), gold
metrics, and what it consumed. Writes methods.md, methods.json and methods.png.

The beta sweep (`toy-rlhf sweep`) is a preset of the same study: the swept methods (PPO and DPO by
default; any registered ones with --methods) at each beta, the policies on the exact frontier of
reward against KL; it writes sweep.md, sweep.json and frontier.png. A method runs at the betas its
config takes: DPO's objective has no beta = 0 (its loss is flat there), while PPO's beta = 0 is the
point of the sweep's far end.
"""
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from toy_rlhf import figures
from toy_rlhf.figures import DASHES, FIGURE_SIZES, MODEL_COLORS, PREFERRED_COLOR, centred_average
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, Seed, value_fits
from toy_rlhf.executors import ExecutorConfig, executor
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import EXACT_PROMPTS, optimal_frontier
from toy_rlhf.run import Run, Variant
from toy_rlhf.studies.against_optimum import NO_TARGET, variant_row
from toy_rlhf.studies.output import markdown_table, write_study

# The optimum's frontier is drawn through these betas (log-spaced, plus the limit beta -> 0).
FRONTIER_BETAS = [0.0] + [10 ** (k / 8) for k in range(-20, 13)]


@dataclass
class CompareConfig(ExecutorConfig):
    betas: tuple[NonNegativeFloat, ...] = (1.0,)  # the KL strengths every method is run at
    methods: tuple[str, ...] = ()  # the methods to compare, by registry name (default: every registered one but the exact optimiser, a yardstick)
    presets: bool = True  # also each method's named presets (the registry's), a row each
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of the exact evaluation (each: all 10^4 responses)
    seed: Seed = 0  # random seed of every run and of the evaluation prompts
    fresh: bool = False  # retrain even where a checkpoint with the same settings exists
    preference: str = ''  # the run's (its reward model's); name it only if it is module:function, imported only when named


@dataclass
class SweepConfig(ExecutorConfig):
    betas: tuple[NonNegativeFloat, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)  # a run of each method per beta its config takes
    methods: tuple[str, ...] = ('ppo', 'dpo')  # the swept methods, by registry name
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of the exact evaluation (each: all 10^4 responses)
    seed: Seed = 0  # random seed of every run and of the evaluation prompts
    fresh: bool = False  # retrain even where a checkpoint with the same settings exists
    preference: str = ''  # the run's (its reward model's); name it only if it is module:function, imported only when named


def method_variant(name, beta, seed, method_configs=None, preset=((), '')):
    """The variant of method `name` at beta and seed (where its config has one), with its settings
    from method_configs ({name: config}) where given, else its defaults, and a preset's over them:
    (settings, label) as the registry names it."""
    settings, label = preset
    base = replace((method_configs or {}).get(name) or METHODS[name].config(), **dict(settings))
    seeded = {'seed': seed} if 'seed' in {field.name for field in fields(base)} else {}
    return Variant.of(replace(base, beta=beta, **seeded), name, f'{label} beta={beta:g}' if label else '')


def variants(config, method_configs=None):
    """The comparison's variants: every method, and each of its presets, at every beta, on the
    comparison's seed."""
    return [method_variant(name, beta, config.seed, method_configs, preset)
            for beta in config.betas
            for name in (config.methods or [name for name, method in METHODS.items() if not method.reference])
            for preset in (((), ''), *((settings, label) for label, settings, _ in
                                       (METHODS[name].presets if config.presets else ())))]


def sweep_variants(config, method_configs=None):
    """The sweep's variants: each swept method at every beta its config takes, on the sweep's seed."""
    return [method_variant(name, beta, config.seed, method_configs)
            for name in config.methods for beta in config.betas if takes_beta(METHODS[name], beta)]


def takes_beta(method, beta):
    """Whether `method`'s objective has this beta (the bounds of its config's `beta` flag)."""
    return value_fits(typing.get_type_hints(method.config, include_extras=True)['beta'], beta)


def measure(run, chosen, config):
    """Every variant's exact row (trained ones from their checkpoints) on config.prompts prompts drawn
    with config.seed, and the exact frontier of the optimum through FRONTIER_BETAS on the same prompts."""
    start = time.perf_counter()
    tables = run.tables(sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed)))
    rows = [variant_row(run, variant, tables) for variant in chosen]
    frontier = optimal_frontier(tables.log_ref, tables.rewards, tables.prompts, FRONTIER_BETAS, tables.preference)
    print(f'Exact evaluation of {len(rows)} policies on {config.prompts} prompts: {time.perf_counter() - start:.1f} s')
    return rows, frontier


def compare(run_dir, plots_dir, config, method_configs=None, progress=True):
    """Train and evaluate every method at every beta; write run_dir/methods.md and methods.json and
    draw plots_dir/methods.png. method_configs: {name: config} settings of the methods (their beta and
    seed are set here). A run folder without an SFT policy or reward model gets them first. Returns
    the rows of the table."""
    run = Run(run_dir, config.preference, config.fresh, progress).build(config.seed)
    chosen = variants(config, method_configs)
    with executor(config) as pool:
        run.train(chosen, pool)
    rows, frontier = measure(run, chosen, config)
    # The learning curves of the methods that sample their own responses.
    curves = [{'label': variant.describe(), 'method': variant.method, 'beta': variant.beta,
               'rows': run.checkpoint(variant)['history']}
              for variant in chosen if METHODS[variant.method].train is not None and METHODS[variant.method].online]
    figure = plot_methods(frontier, rows, curves, Path(plots_dir) / 'methods.png')
    report = write_study(run_dir, 'methods', methods_report(rows, config),
                         {'settings': asdict(config), 'policies': rows}, figure)
    print(methods_table(rows))
    print(f'Table in {report}, figure {figure}')
    return rows


def sweep(run_dir, plots_dir, config, method_configs=None, progress=True):
    """The sweep preset: train the swept methods at the betas, evaluate exactly, draw plots_dir/frontier.png
    and write run_dir/sweep.md and sweep.json. method_configs: {name: config}, the methods' other
    settings (their beta and seed are set here). Returns the rows of the table."""
    run = Run(run_dir, config.preference, config.fresh, progress).build(config.seed)
    chosen = sweep_variants(config, method_configs)
    with executor(config) as pool:
        run.train(chosen, pool)
    rows, frontier = measure(run, chosen, config)
    figure = plot_frontier(frontier, rows, Path(plots_dir) / 'frontier.png')
    report = write_study(run_dir, 'sweep', sweep_report(rows, config, run.preference.name),
                         {'prompts': config.prompts, 'seed': config.seed, 'policies': rows, 'frontier': frontier},
                         figure)
    print(f'Sweep: table in {report}, figure {figure}')
    return rows


# ---------------------------------------------------------------------------------------------
# The tables.

def methods_table(rows):
    """The comparison: one row per policy."""
    cells = []
    for row in rows:
        used = f"{row['samples']:,} samples" if 'samples' in row else \
            f"{row['pairs']:,} pairs" if 'pairs' in row else 'none (exact)'
        # Samples to 99%: an online method that never reached it says so; the others consume no samples.
        to_target = row.get('samples_to_target')
        to_target = f'{to_target:,}' if to_target is not None else 'never' if 'samples' in row else ''
        seconds = row.get('seconds')
        cells.append([row['label'], f"{row['J']:.3f}", f"{row['J_star']:.3f}", _number(row['gap_closed'], '.2%'),
                      f"{row['kl_first']:.3f}", f"{row['kl_later']:.3f}", f"{row['preference_rate']:.2%}",
                      f"{row['fidelity']:.2%}", f"{row['gold_rate']:.2%}", _kl(row['kl_to_optimum']), row['target'],
                      _kl(row['kl_to_target']) if row['target'] != NO_TARGET else 'n/a', used, to_target,
                      '' if seconds is None else f'{seconds:.1f}'])
    header = ['method', 'J', 'J*', 'gap closed', 'KL first', 'KL later', 'preference', 'fidelity', 'gold',
              'KL from pi*', 'own target', 'KL from own target', 'consumed', 'samples to 99%', 'seconds']
    return markdown_table(header, cells, text_columns=(0, header.index('own target')))


def _kl(value):
    return 'inf' if value is None else f'{value:.3f}'


def _number(value, style):
    return 'n/a' if value is None else format(value, style)


def methods_report(rows, config):
    return f"""# Which method, and where it lands

Every method from the same SFT policy and reward model, seed {config.seed}, evaluated exactly over all
10^4 responses of {config.prompts} prompts. J = E[r] - beta * KL(pi || pi_ref) under the reward model;
J* its maximum, reached by pi* = pi_ref exp(r / beta) / Z; gap closed = (J - J_ref) / (J* - J_ref).
KL from pi*: KL(policy || pi*), 0 only at the optimum. Own target: the exact distribution the method
converges to where that is not pi* of the reward model, and the policy's KL from it. Samples to 99%:
rollout samples until the rollout's exact preference rate first reached 99%.

{methods_table(rows)}
"""


def sweep_table(rows):
    """The sweep: one row per policy."""
    cells = [[row['label'], f"{row['J']:.3f}", f"{row['J_star']:.3f}", _number(row['gap_closed'], '.4f'),
              _number(row['gold_gap_closed'], '.4f'), f"{row['preference_rate']:.2%}", f"{row['fidelity']:.2%}",
              f"{row['gold_rate']:.2%}", f"{row['kl_total']:.3f}", f"{row['kl_first']:.3f}", f"{row['kl_later']:.3f}"]
             for row in rows]
    return markdown_table(['policy', 'J', 'J*', 'gap closed', 'gap closed (gold)', 'preference', 'fidelity', 'gold',
                           'KL', 'KL first', 'KL later'], cells)


def optimum_table(rows):
    """The optimum at each beta of the sweep (it depends on beta only)."""
    optimum = {row['beta']: row for row in rows}
    cells = [[f'{beta:g}', f"{row['optimal_preference_rate']:.2%}", f"{row['optimal_fidelity']:.2%}",
              f"{row['optimal_gold_rate']:.2%}", f"{row['optimal_kl_total']:.3f}", f"{row['optimal_kl_later']:.3f}"]
             for beta, row in sorted(optimum.items())]
    return markdown_table(['beta', 'preference', 'fidelity', 'gold', 'KL', 'KL later'], cells)


def sweep_report(rows, config, preference):
    return f"""# Beta sweep

Exact, over all 10^4 responses of {config.prompts} prompts (seed {config.seed}). J = E[r] - beta * KL(pi || pi_ref)
under the reward model, J* its maximum (the closed-form optimum at the same beta), gap closed =
(J - J_ref) / (J* - J_ref) with J_ref the reference's own J. Gap closed (gold): the same with the
labeler's gold reward ({preference}) in place of the reward model, the objective DPO
solves. KL first: the part of the KL spent on the first digit; KL later: on digits 2-4. Compare each
with the optimum's own split below: KL a policy spends beyond it where the optimum spends little is
waste, or reward hacking.

{sweep_table(rows)}

The optimum itself at each beta (what the best possible policy under this reward model does):

{optimum_table(rows)}
"""


# ---------------------------------------------------------------------------------------------
# The figures.

def plot_frontier(frontier, policies, path):
    """Trained policies against the exact optimum of the KL-regularised objective.

    frontier: list of dicts of the optimum per beta ('beta', 'reward', 'kl_total', 'gold_rate',
    'fidelity'); policies: list of dicts ('label', 'method' (a registry name), 'reward', 'kl_total',
    'gold_rate', 'fidelity'). Left: reward-model score against KL to the reference; middle: the same,
    zoomed on the policies; right: gold rate and fidelity against KL, where the proxy and the truth
    part ways. Each policy has its method's marker and a colour of its own, named in the legend below."""
    optimum = sorted((row for row in frontier if row['beta'] > 0), key=lambda row: row['kl_total'])
    kls = [row['kl_total'] for row in optimum]
    fig, (left, zoom, right) = plt.subplots(1, 3, figsize=FIGURE_SIZES['frontier'], layout='constrained')
    for ax in (left, zoom):
        ax.plot(kls, [row['reward'] for row in optimum], color='black', label='optimum pi*_beta (exact)')
    right.plot(kls, [row['gold_rate'] for row in optimum], color=PREFERRED_COLOR, label='gold rate of pi*')
    right.plot(kls, [row['fidelity'] for row in optimum], color='black', linestyle='--', label='fidelity of pi*')
    for i, row in enumerate(policies):
        color, marker = MODEL_COLORS[i % len(MODEL_COLORS)], METHODS[row['method']].marker
        for ax in (left, zoom):
            ax.scatter(row['kl_total'], row['reward'], color=color, marker=marker, zorder=3, s=45,
                       edgecolor='black', linewidth=0.5, label=row['label'] if ax is zoom else None)
        right.scatter(row['kl_total'], row['gold_rate'], color=PREFERRED_COLOR, marker=marker,
                      edgecolor=color, linewidth=1.5, zorder=3, s=45)
        right.scatter(row['kl_total'], row['fidelity'], color='white', marker=marker, edgecolor=color,
                      linewidth=1.5, zorder=3, s=45)
    _zoom_to([(row['kl_total'], row['reward']) for row in policies], zoom)
    right.scatter([], [], color=PREFERRED_COLOR, marker='o', label='gold rate of a policy (filled)')
    right.scatter([], [], color='white', edgecolor='black', marker='o', label='fidelity of a policy (open)')
    for ax in (left, right):
        ax.set_xscale('log')
        ax.set_xlabel('KL(policy || reference), nats per response (log scale)')
    for ax in (left, zoom, right):
        ax.grid(alpha=0.3)
    zoom.set_xlabel('KL(policy || reference), nats per response')
    left.legend(fontsize=8, loc='upper left')
    right.legend(fontsize=8, loc='lower left')
    fig.legend(*zoom.get_legend_handles_labels(), loc='outside lower center', ncols=min(5, len(policies) + 1),
               fontsize=9)
    left.set_ylabel('reward-model score E[r]')
    left.set_title('Reward against KL: the exact frontier')
    zoom.set_title('Zoom on the trained policies')
    right.set_ylabel('rate')
    right.set_ylim(0, 1.02)
    right.set_title('Where the proxy and the truth part ways')
    return figures.save(fig, path)


def _zoom_to(points, ax, margin=0.15):
    """Limit ax to the box around points (x, y), with a margin of the box's size on each side."""
    xs, ys = zip(*points)
    for low, high, set_limits in ((min(xs), max(xs), ax.set_xlim), (min(ys), max(ys), ax.set_ylim)):
        pad = max(high - low, 0.02 * max(abs(high), 1e-3)) * margin
        set_limits(low - pad, high + pad)


def plot_methods(frontier, rows, curves, path, window=5):
    """Every method against the exact optimum, and how fast the online ones learn.

    frontier: the optimum per beta, as for plot_frontier; rows: one dict per policy ('label',
    'method' (a registry name), 'reward', 'kl_total', 'optimal_reward', 'optimal_kl_total', and
    'target_reward'/'target_kl_total' where the method's own target is not pi*); curves: one record
    per online method's run, {'label', 'method', 'beta', 'rows'}, its rows with 'samples',
    'gold/preference_rate', 'objective/rlhf_reward'. Left: reward-model score against KL near the
    points, the exact frontier, each policy (filled) and its own target (open) where that is not pi*;
    middle and right: exact preference rate and KL-regularised reward of the rollouts against samples
    (colour: method, dashes: beta)."""
    fig, (points, preference, objective) = plt.subplots(1, 3, figsize=FIGURE_SIZES['methods'], layout='constrained')
    _landing_panel(points, frontier, rows)
    betas = sorted({curve['beta'] for curve in curves})
    for ax, key, title in ((preference, 'gold/preference_rate', 'Preference rate of the rollouts (exact)'),
                           (objective, 'objective/rlhf_reward', 'score - beta * KL of the rollouts')):
        for curve in curves:
            samples = [row['samples'] for row in curve['rows']]
            ax.plot(samples, centred_average([row[key] for row in curve['rows']], window),
                    color=METHODS[curve['method']].color, linewidth=2,
                    linestyle=DASHES[betas.index(curve['beta']) % len(DASHES)])
        ax.set_xlabel('rollout samples')
        ax.set_title(f'{title}\n(centred moving average over {window} iterations)')
        ax.grid(alpha=0.3)
    preference.set_ylim(0, 1.02)
    fig.legend(*points.get_legend_handles_labels(), loc='outside lower center', ncols=3, fontsize=9)
    return figures.save(fig, path)


def _landing_panel(ax, frontier, rows):
    """Reward-model score against KL near the points: the exact frontier, each policy (filled), its
    own target (open) where that is not pi*, and pi* at the first row's beta (a star)."""
    optimum = sorted((row for row in frontier if row['beta'] > 0), key=lambda row: row['kl_total'])
    ax.plot([row['kl_total'] for row in optimum], [row['reward'] for row in optimum], color='black',
            label='optimum pi*_beta (exact frontier)')
    shown = []
    for row in rows:
        method = METHODS[row['method']]
        ax.scatter(row['kl_total'], row['reward'], color=method.color, marker=method.marker, s=60, zorder=3,
                   edgecolor='black', linewidth=0.5, label=row['label'])
        shown.append((row['kl_total'], row['reward']))
        if 'target_reward' in row:
            ax.scatter(row['target_kl_total'], row['target_reward'], facecolor='white', edgecolor=method.color,
                       marker=method.marker, s=60, linewidth=1.8, zorder=3,
                       label=f"{row['label']}: its own target ({row['target']})")
            shown.append((row['target_kl_total'], row['target_reward']))
    for row in rows[:1]:
        ax.scatter(row['optimal_kl_total'], row['optimal_reward'], marker='*', s=160, color='black', zorder=4,
                   label='pi* at this beta')
        shown.append((row['optimal_kl_total'], row['optimal_reward']))
    _zoom_to(shown, ax)
    ax.set_xlabel('KL(policy || reference), nats per response')
    ax.set_ylabel('reward-model score E[r]')
    ax.set_title('Where each method lands (exact)')
    ax.grid(alpha=0.3)
