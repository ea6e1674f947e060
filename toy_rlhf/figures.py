"""What every figure shares: colours, line styles, sizes, the centred moving average, and how a figure
is saved. Each study draws its own figures, next to it in toy_rlhf/studies/; this module makes them
agree.

A model keeps its colour in every figure: model_colors gives colours by position (the reference
first), so the same order of models gives the same colours everywhere. Every figure is written as a
PNG at DPI (parent folders created) and closed.
"""
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # after choosing the backend
import numpy as np

from toy_rlhf.files import atomic_write

DPI = 100
REFERENCE_COLOR = '#6b7f99'  # grey-blue: the reference (SFT) policy, always first
# The models after the reference, in order: green (the first, aligned beta), red, then more.
MODEL_COLORS = ['#2ca02c', '#d62728', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf',
                '#bcbd22', '#1f77b4']
PREFERRED_COLOR = '#e6b800'  # gold: the preferred first digit and the responses that have it
OTHER_COLOR = '#a7b0ba'  # light grey: everything else
DASHES = ['-', '--', ':', '-.']  # line styles, by position, where curves of several policies overlap
# Figure sizes in inches (width, height); the main study's two per-model grids grow with the models
# they show (toy_rlhf.studies.main_figures).
FIGURE_SIZES = {'sft_loss': (8, 4.5), 'reward_model': (13, 4.8), 'ppo_curves': (16, 4.8),
                'first_token': (11, 5.5), 'frontier': (18, 6.5), 'credit_assignment': (18, 6),
                'methods': (18, 7.5), 'overoptimisation': (20, 11), 'kl_by_position': (8, 4.5)}


def model_colors(labels):
    """Colour of each model by position: labels (reference first) -> dict label -> colour.

    The reference is always REFERENCE_COLOR, the i-th model after it MODEL_COLORS[i] (cycling after
    the last), whatever the labels say, so every figure made from the same order agrees."""
    return {label: REFERENCE_COLOR if i == 0 else MODEL_COLORS[(i - 1) % len(MODEL_COLORS)]
            for i, label in enumerate(labels)}


def centred_average(values, window):
    """Centred mean over `window` points (odd): out[i] = mean(values[i - h : i + h + 1]), where
    h = window // 2 shrinks near the ends to min(h, i, len - 1 - i), so every point stays the centre
    of its own window (the first and last are their raw values). Same length as values, so it plots
    against the same x. A trailing mean lags by half its window, which reads as a slower learner than
    it is (PPO: ~770 samples at the default schedule); a window cut on one side only lags at the ends."""
    values = np.asarray(values, dtype=float)
    if window < 1 or window % 2 == 0:
        raise ValueError(f'a centred window is an odd number of points >= 1, got {window}')
    index = np.arange(len(values))
    half = np.minimum(window // 2, np.minimum(index, len(values) - 1 - index))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[index + half + 1] - sums[index - half]) / (2 * half + 1)


def save(fig, path):
    """Write fig to path as a PNG at DPI, atomically (an interrupted save leaves the previous figure,
    or none), close it, return the path. Studies call it as figures.save, so that a test can watch
    every figure saved by replacing this one name."""
    try:
        atomic_write(path, lambda file: fig.savefig(file, format='png', dpi=DPI))
    finally:
        plt.close(fig)
    return Path(path)
