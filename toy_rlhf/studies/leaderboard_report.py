"""The leaderboard's report and figure (toy_rlhf/studies/leaderboard.py measures; this writes): a
table per metric of methods by preferences, each cell the median over seeds [lowest, highest], the
seeds' verdict on the order, the gap split (toy_rlhf/studies/decomposition.py), and the heat map."""
import itertools

import matplotlib.pyplot as plt
import numpy as np

from toy_rlhf import figures
from toy_rlhf.studies.decomposition import ceiling_table, optimiser_gap_table
from toy_rlhf.studies.output import markdown_table


def _spread_text(spread_, style):
    if spread_ is None:
        return 'n/a'
    low, high = format(spread_['low'], style), format(spread_['high'], style)
    return format(spread_['median'], style) + ('' if low == high else f' [{low}, {high}]')


def metric_table(summary, metric, style):
    """Methods (rows) by preferences (columns): the metric's median [range over seeds] in each cell."""
    cells = [[method, *(_spread_text(summary['cells'][method][p][metric], style) for p in summary['preferences'])]
             for method in summary['methods']]
    return markdown_table(['method', *summary['preferences']], cells)


def gap_table(summary):
    """Gap closed under the reward model, with each method's mean rank and each preference's."""
    preferences = summary['preferences']
    cells = [[method, *(_spread_text(summary['cells'][method][p]['gap_closed'], '.3f') for p in preferences),
              f"{summary['method_rank'][method]:.2f}"] for method in summary['methods']]
    cells.append(['mean rank of the preference (1: easiest)',
                  *(f"{summary['preference_rank'][p]:.2f}" for p in preferences), ''])
    return markdown_table(['method', *preferences, 'mean rank'], cells)


def leaderboard_report(summary, split, config):
    order = '\n'.join(seed_verdict(summary, preference) for preference in summary['preferences'])
    schedule = "each method's quick schedule, short SFT and reward schedules" if config.quick else 'the default schedules'
    return f"""# Leaderboard

Every method on every preference, seeds {' '.join(map(str, config.seeds))}, betas {' '.join(f'{b:g}' for b in config.betas)},
{schedule}; each policy measured exactly over all 10^4 responses of the same {config.prompts} prompts (seed
{config.seed}). Each cell: the median over seeds [lowest, highest]. Gap closed = (J - J_ref) / (J* - J_ref),
1 at the optimum of the KL-regularised objective. Ranks by median gap closed under the reward model.

## Gap closed under the reward model

{gap_table(summary)}

## Gap closed under the gold reward

{metric_table(summary, 'gold_gap_closed', '.3f')}

## KL from the method's own target (nats)

{metric_table(summary, 'kl_to_target', '.3f')}

## Consumed (rollout samples, or labelled pairs for the offline methods)

{metric_table(summary, 'consumed', ',.0f')}

## Training seconds (wall)

{metric_table(summary, 'seconds', '.1f')}

## Do the seeds agree?

{order}

## The gap, split

The ceiling is the best gap closed of the exact optimiser's checkpoints in each cell's folder (none
are trained here; toy_rlhf/studies/decomposition.py says how to make them): a lower bound on what the
network can reach. A method's optimiser gap is the ceiling less its gap closed, seed by seed; the
reward-model gap is what pi* of the reward model loses against pi* of gold, under gold.

{ceiling_table(split, lambda spread_: _spread_text(spread_, '.3f'))}

#### Optimiser gap (ceiling - gap closed)

{optimiser_gap_table(split, summary['methods'], summary['preferences'], lambda spread_: _spread_text(spread_, '.3f'))}

![decomposition](decomposition.png)
"""


def seed_verdict(summary, preference):
    """One line: whether the seeds agree on the order of the methods for a preference, and which
    pairs their ranges cannot separate."""
    order = 'the same order on every seed' if summary['seed_order'][preference] else 'the order changes with the seed'
    pairs = ', '.join(f'{a} ~ {b}' for a, b in summary['inseparable'][preference])
    return f"- {preference}: {order}; " + (f'cannot separate: {pairs}' if pairs else 'every pair separated')


def plot_leaderboard(summary, path):
    """Methods x preferences heat map of the median gap closed under the reward model, the range over
    seeds written in each cell."""
    methods, preferences = summary['methods'], summary['preferences']
    medians = np.array([[(summary['cells'][m][p]['gap_closed'] or {'median': np.nan})['median']
                         for p in preferences] for m in methods])
    fig, ax = plt.subplots(figsize=(2.2 * len(preferences) + 3, 0.7 * len(methods) + 2), layout='constrained')
    # From 0 (the reference) to 1 (the optimum); a cell below 0 (worse than the reference) is red, so
    # that one far-off policy does not stretch the scale of all the others.
    colours = plt.get_cmap('viridis').with_extremes(under='#d62728')
    image = ax.imshow(medians, cmap=colours, vmin=0.0, vmax=1.0, aspect='auto')
    for (i, method), (j, preference) in itertools.product(enumerate(methods), enumerate(preferences)):
        spread_ = summary['cells'][method][preference]['gap_closed']
        text = 'n/a' if spread_ is None else \
            f"{spread_['median']:.3f}\n[{spread_['low']:.3f}, {spread_['high']:.3f}]"
        ax.text(j, i, text, ha='center', va='center', fontsize=8,
                color='black' if spread_ is not None and spread_['median'] > 0.6 else 'white')
    ax.set_xticks(range(len(preferences)), preferences)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_title('Gap closed to J* under the reward model: median [range] over seeds')
    fig.colorbar(image, ax=ax, label='median gap closed', extend='min')
    return figures.save(fig, path)
