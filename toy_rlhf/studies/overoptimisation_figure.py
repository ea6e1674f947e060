"""The over-optimisation study's figure (toy_rlhf.studies.overoptimisation): gold and proxy gain
against d = sqrt(KL) for every proxy, from the curves, fits and peaks the study measured; nothing here
runs a model."""
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from toy_rlhf import figures
from toy_rlhf.figures import FIGURE_SIZES

RUN_MARKERS = ['o', 's', '^', 'D', 'v']  # the marker of each of the method's runs on a proxy, by its position


def plot_overoptimisation(proxies, method_label, runs, path):
    """Gold (solid) and proxy (dashed) gain against d = sqrt(KL) for each proxy, best-of-n and RL
    (pi*_beta as lines, the method's snapshots as markers), gold counted on valid responses below, Gao
    et al.'s fits dotted with a marker at each gold peak; best-of-n's exact KL against log n - (n-1)/n
    and the residuals of the fits to valid gold on the right. proxies: overoptimisation()'s results;
    method_label: the method's name (PPO); runs: (curve name, legend label) of each of its runs on
    every proxy."""
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(proxies)))
    fig, axes = plt.subplots(2, 3, figsize=FIGURE_SIZES['overoptimisation'], layout='constrained')
    for row, gold in enumerate(('gold', 'gold_valid')):
        for column, (source, title) in enumerate((('best_of_n', 'best-of-n, n = 1 .. 10^4'),
                                                  ('optimum', 'RL: pi*_beta of the proxy (lines), '
                                                              f'{method_label} (markers)'))):
            _gain_panel(axes[row, column], proxies, colors, source, gold, runs if column == 1 else ())
            axes[row, column].set_title(f'{title}: {"gold" if gold == "gold" else "valid gold"}')
    style = [Line2D([], [], color='black', linewidth=2, label='gold (solid)'),
             Line2D([], [], color='black', linestyle='--', label='proxy / margin (dashed)'),
             Line2D([], [], color='black', linestyle=':', label="Gao et al.'s form, fitted to gold"),
             Line2D([], [], marker='*', markersize=12, linestyle='none', color='grey', markeredgecolor='black',
                    label='gold peak')]
    style += [Line2D([], [], marker=marker, linestyle='none', color='grey', markeredgecolor='black',
                     label=f'{label} snapshots (open: proxy)')
              for (_, label), marker in zip(runs, RUN_MARKERS)]
    axes[0, 0].legend(loc='lower right', fontsize=8, title='proxy reward model')
    axes[0, 1].legend(handles=style, loc='lower right', fontsize=8)
    _best_of_n_kl_panel(axes[0, 2], proxies, colors)
    _residual_panel(axes[1, 2], proxies, colors)
    return figures.save(fig, path)


def _gain_panel(ax, proxies, colors, source, gold, runs):
    """Each proxy's `gold` and proxy gain along the curve `source`, its fit and gold peak, and the
    snapshots of each of the method's runs (curve name, label) on it."""
    for proxy, color in zip(proxies, colors):
        curve, fit, top = proxy['curves'][source], proxy['fits'][source][gold], proxy['peaks'][source][gold]
        ax.plot(curve['d'], curve[gold], color=color, linewidth=2, label=_proxy_label(proxy))
        ax.plot(curve['d'], curve['proxy'], color=color, linestyle='--', linewidth=1.2)
        ax.plot(fit['line']['d'], fit['line']['gain'], color=color, linestyle=':', linewidth=1.5)
        ax.plot(top['d'], top['gain'], marker='*', markersize=14, color=color, markeredgecolor='black')
        for (name, _), marker in zip(runs, RUN_MARKERS):
            snapshots = proxy['curves'][name]
            ax.plot(snapshots['d'], snapshots[gold], marker=marker, linestyle='none', color=color,
                    markeredgecolor='black', markersize=6)
            ax.plot(snapshots['d'], snapshots['proxy'], marker=marker, linestyle='none',
                    markerfacecolor='none', markeredgecolor=color, markersize=6)
    ax.axhline(0, color='grey', linewidth=0.8)
    _limit_to_gold(ax, [value for proxy in proxies for curve in proxy['curves'].values() for value in curve[gold]])
    ax.set_xlabel('d = sqrt(KL(pi || SFT))')
    ax.set_ylabel(('gold' if gold == 'gold' else 'valid gold (every digit in the language)')
                  + ' gain over SFT, per unit of margin')
    ax.grid(alpha=0.3)


def _best_of_n_kl_panel(ax, proxies, colors):
    for proxy, color in zip(proxies, colors):
        curve = proxy['curves']['best_of_n']
        ax.plot(curve['n'], curve['kl'], color=color, linewidth=2, label=f"exact, {_proxy_label(proxy)}")
    ax.plot(curve['n'], curve['textbook_kl'], color='black', linestyle='--', label='log n - (n - 1)/n')
    ax.set_xscale('log')
    ax.set_xlabel('n')
    ax.set_ylabel('KL(best-of-n || SFT), nats')
    ax.set_title("Best-of-n's KL: exact against the textbook formula")
    ax.legend(loc='upper left', fontsize=8)
    ax.grid(alpha=0.3)


def _residual_panel(ax, proxies, colors):
    for proxy, color in zip(proxies, colors):
        for source, line in (('best_of_n', '-'), ('optimum', '--')):
            ax.plot(proxy['curves'][source]['d'], proxy['fits'][source]['gold_valid']['residual'], color=color,
                    linestyle=line)
    ax.axhline(0, color='grey', linewidth=0.8)
    ax.legend(handles=[Line2D([], [], color='black', label='best-of-n'),
                       Line2D([], [], color='black', linestyle='--', label='pi*_beta')], fontsize=8)
    ax.set_xlabel('d = sqrt(KL(pi || SFT))')
    ax.set_ylabel('valid gold minus fitted form')
    ax.set_title("Residual of Gao et al.'s forms fitted to valid gold")
    ax.grid(alpha=0.3)


def _proxy_label(proxy):
    return f"{proxy['pairs']:,} pairs, margin {proxy['margin']:g}"


def _limit_to_gold(ax, golds):
    """y-limits from the gold curves, so that a proxy whose own estimate runs far above them (an
    overfitted one can claim several times the possible gain) does not flatten them; says so if cut."""
    bottom, top = min(min(golds), 0.0), max(max(golds), 0.0)
    span = top - bottom or 1.0
    ax.set_ylim(bottom - 0.1 * span, top + 0.3 * span)
    if any(np.max(line.get_ydata()) > top + 0.3 * span for line in ax.get_lines() if len(line.get_ydata())):
        ax.text(0.99, 0.99, 'proxy curves cut at the top', transform=ax.transAxes, ha='right', va='top', fontsize=8)
