"""The gap to pi*, split: what no exact path reached, what a method's optimiser did not find, and
what the reward model got wrong. Part of the leaderboard (its `ceiling` tables and decomposition.png).

For each (preference, seed) cell, at each beta, all on the leaderboard's prompts:

    ceiling            the best gap closed of the exact optimiser's checkpoints in the cell's folder
                       (toy_rlhf/methods/exact.py: exact gradients of the exact objective), the path
                       that reached it named by its chain of warm starts
    optimiser gap      ceiling - a method's gap closed: what the method's optimiser did not find
    beyond the ceiling 1 - ceiling: what no exact path reached; the network, or a path not yet tried
    reward-model gap   1 - pi*'s gap closed under the gold reward: what pi* of the reward model loses
                       against pi* of gold, which no method that aims at pi* can win back

A ceiling is a lower bound on what the network can represent, no more: a longer or better path may
reach further. The leaderboard does not train the paths (thousands of exact steps per cell); make
one in a cell's folder with the exact optimiser, fresh prompts every step, for example

    toy-rlhf exact --run-dir FOLDER/seed0/last-digit --prompt-pool 0 --divergence forward --iters 250
    toy-rlhf exact --run-dir FOLDER/seed0/last-digit --prompt-pool 0 --warm-start CHECKPOINT --iters 500 --seed 1

and so on (each chunk a fresh Adam), and the next leaderboard call measures every checkpoint of it.
"""
import itertools
from dataclasses import fields
from pathlib import Path

import matplotlib.pyplot as plt

from toy_rlhf import figures
from toy_rlhf.checkpoint import CheckpointError, load_checkpoint
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import optimal_log_probs
from toy_rlhf.run import Variant
from toy_rlhf.studies.against_optimum import gap_closed
from toy_rlhf.studies.output import markdown_table

EXACT = 'exact'  # the registry's exact optimiser: the only method whose paths make a ceiling


def exact_variants(run, betas):
    """The exact optimiser's checkpoints in the run's folder made at one of `betas` from its SFT
    policy and reward model (by fingerprint, as Run.train reuses a checkpoint), as Variants."""
    variants = []
    for path in sorted(run.folder.glob(f'{EXACT}_beta*.pt')):
        config = _exact_config(path)
        if config is not None and config.beta in betas:
            variant = Variant.of(config, EXACT)
            if variant.name == path.stem and run.trained(variant) is not None:
                variants.append(variant)
    return variants


def _exact_config(path):
    """The ExactConfig a checkpoint was trained with, or None where it is not the exact optimiser's."""
    try:
        settings = load_checkpoint(path, 'policy')['train_config']
    except CheckpointError:
        return None
    if settings.get('method') != EXACT:
        return None
    config = METHODS[EXACT].config
    return config(**{field.name: settings[field.name] for field in fields(config) if field.name in settings})


def path_name(run, variant):
    """The exact path that made a variant's checkpoint, from SFT: its steps by divergence, following
    the warm starts by file name through the run's folder ('forward KL 250, then reverse KL 1,500
    steps'), or 'from another checkpoint' where the chain leaves the folder."""
    chain, config = [], variant.config()
    while config is not None:
        chain.append((config.divergence, config.iters))
        if not config.warm_start:
            break
        config = _exact_config(run.folder / Path(config.warm_start).name)
        if config is None:
            chain.append(('from another checkpoint', 0))
    parts = [(divergence, sum(iters for _, iters in group))
             for divergence, group in itertools.groupby(reversed(chain), key=lambda step: step[0])]
    return ', then '.join(f'{divergence} KL {iters:,}' if iters else divergence for divergence, iters in parts) + ' steps'


def reward_model_gap(tables, gold_margin, beta):
    """1 - the gap closed under the gold reward by pi* of the reward model at beta (None where gold has
    no gap to close)."""
    closed = gap_closed(optimal_log_probs(tables.log_ref, tables.rewards, beta), tables.log_ref,
                        tables.gold(gold_margin), beta)
    return None if closed is None else 1 - closed


def cell_targets(run, betas, measure, tables, seed):
    """One dict per beta of a (preference, seed) cell: 'ceiling', the row (measure(variants) -> rows,
    as the leaderboard measures its methods) of the exact checkpoint that closes the most gap, with its
    'path', or None where the cell has none; and 'reward_model_gap' from its exact tables."""
    variants = {variant.name: variant for variant in exact_variants(run, betas)}
    rows = [row for row in measure(list(variants.values())) if row['gap_closed'] is not None]
    cells = []
    for beta in betas:
        best = max((row for row in rows if row['beta'] == beta), key=lambda row: row['gap_closed'], default=None)
        ceiling = best and {**best, 'path': path_name(run, variants[best['checkpoint']])}
        cells.append({'preference': run.preference.name, 'seed': seed, 'beta': beta, 'ceiling': ceiling,
                      'reward_model_gap': reward_model_gap(tables, run.gold_margin, beta)})
    return cells


# ---------------------------------------------------------------------------------------------
# The summary: per (preference, beta) the ceiling and reward-model gap over seeds, per method the
# optimiser gap. `cells` are one dict per (preference, seed, beta): 'ceiling' (a measured row of the
# best exact checkpoint, with its 'path'; None where the cell has none) and 'reward_model_gap'.

def split_gap(rows, cells, spread):
    """{'targets': [{'preference', 'beta', 'ceiling', 'reward_model_gap', 'paths'}], 'betas': {method
    label: beta}, 'optimiser_gap': {method label: {preference: spread over seeds}}}; spread(values) -> median and range
    (leaderboard.spread). A method's optimiser gap is taken seed by seed, where the seed has a ceiling."""
    by_cell = {(cell['preference'], cell['seed'], cell['beta']): cell for cell in cells}
    targets = []
    for preference, beta in dict.fromkeys((cell['preference'], cell['beta']) for cell in cells):
        mine = [cell for cell in cells if (cell['preference'], cell['beta']) == (preference, beta)]
        targets.append({'preference': preference, 'beta': beta,
                        'ceiling': spread([cell['ceiling']['gap_closed'] for cell in mine if cell['ceiling']]),
                        'reward_model_gap': spread([cell['reward_model_gap'] for cell in mine]),
                        'paths': {cell['seed']: cell['ceiling']['path'] for cell in mine if cell['ceiling']}})
    optimiser_gap = {}
    for row in rows:
        cell = by_cell.get((row['preference'], row['seed'], row['beta']))
        if cell and cell['ceiling'] and row['gap_closed'] is not None:
            gaps = optimiser_gap.setdefault(row['label'], {}).setdefault(row['preference'], [])
            gaps.append(cell['ceiling']['gap_closed'] - row['gap_closed'])
    return {'targets': targets, 'betas': {row['label']: row['beta'] for row in rows},
            'optimiser_gap': {label: {p: spread(gaps) for p, gaps in by_p.items()} for label, by_p in optimiser_gap.items()}}


def ceiling_table(split, text):
    """Per (preference, beta): the ceiling, beyond it, and the reward-model gap, as text(spread) gives
    them, and the path that reached each seed's ceiling."""
    cells = []
    for target in split['targets']:
        ceiling = target['ceiling']
        beyond = None if ceiling is None else {key: 1 - value for key, value in ceiling.items()}
        if beyond:
            beyond['low'], beyond['high'] = beyond['high'], beyond['low']
        paths = '; '.join(f'seed {seed}: {path}' for seed, path in target['paths'].items()) or 'no exact path measured'
        cells.append([target['preference'], f"{target['beta']:g}", text(ceiling), text(beyond),
                      text(target['reward_model_gap']), paths])
    return markdown_table(['preference', 'beta', 'ceiling', 'beyond the ceiling', 'reward-model gap (gold)',
                           'the path to the ceiling'], cells, text_columns=(0, 5))


def optimiser_gap_table(split, methods, preferences, text):
    """Methods (rows) by preferences: ceiling - the method's gap closed, median [range] over the seeds
    with a ceiling; n/a where no seed has one."""
    gaps = split['optimiser_gap']
    cells = [[method, *(text(gaps.get(method, {}).get(p)) for p in preferences)] for method in methods]
    return markdown_table(['method', *preferences], cells)


def plot_decomposition(summary, split, path):
    """Per preference, each method's median gap closed (over every seed) as a stacked bar: reached,
    then up to the median ceiling at the method's beta (the optimiser gap; the table takes it seed by
    seed, where a seed has a ceiling), then beyond it to pi*. The panel's title gives the ceiling's
    seeds and the reward-model gap (at the first beta)."""
    preferences, methods = summary['preferences'], summary['methods']
    columns = min(2, len(preferences))
    rows = -(-len(preferences) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7.5 * columns, 0.45 * len(methods) * rows + 1.5 * rows),
                             layout='constrained', squeeze=False, sharex=True)
    targets = {(target['preference'], target['beta']): target for target in split['targets']}
    for ax, preference in zip(axes.flat, preferences):
        for i, method in enumerate(methods):
            ceiling = targets[preference, split['betas'][method]]['ceiling']
            reached = (summary['cells'][method][preference]['gap_closed'] or {'median': 0.0})['median']
            top = max(reached, 0.0)
            ax.barh(i, reached, color='#1f77b4', label='reached (median over seeds)' if i == 0 else None)
            if ceiling is None:
                ax.barh(i, 1 - top, left=top, color='#dddddd', hatch='//', edgecolor='white',
                        label='not split: no exact path measured' if i == 0 else None)
                continue
            ax.barh(i, max(ceiling['median'] - top, 0.0), left=top, color='#ff7f0e',
                    label='optimiser gap: up to the ceiling' if i == 0 else None)
            ax.barh(i, 1 - max(top, ceiling['median']), left=max(top, ceiling['median']), color='#bbbbbb',
                    label='beyond the ceiling: no exact path reached it' if i == 0 else None)
        first = next(target for target in split['targets'] if target['preference'] == preference)
        title = preference
        if first['ceiling']:
            seeds = list(first['paths'])
            title += (f"\nceiling {first['ceiling']['median']:.1%} ({'seed' if len(seeds) == 1 else 'median of seeds'} "
                      f"{', '.join(map(str, seeds))})")
        if first['reward_model_gap']:
            title += f"; reward-model gap {first['reward_model_gap']['median']:.1%} under gold"
        ax.set_title(title, fontsize=10)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color='black', linewidth=0.6)
        ax.axvline(1, color='black', linewidth=0.6, linestyle=':')
        lowest = [summary['cells'][m][preference]['gap_closed']['median'] for m in methods
                  if summary['cells'][m][preference]['gap_closed']]
        ax.set_xlim(min(-0.1, *lowest), 1.02)
    for ax in list(axes.flat)[len(preferences):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel('share of the gap to J* under the reward model (1: pi*)')
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc='outside lower center', ncols=len(legend), fontsize=8)
    fig.suptitle('The gap to pi*, split: reached, not found by the optimiser, not reached by any exact path')
    return figures.save(fig, path)
