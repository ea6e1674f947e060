"""The seven figures of the main study (toy_rlhf.studies.main): SFT loss, the reward model, PPO
curves, and what each model does on one fixed sentence and over many prompts.

Each function draws what the study computed and passes in (arrays and records: no figure runs a
model). Models come as an ordered dict label -> data whose first entry is the reference (SFT) policy
and the rest PPO policies ('beta=1', 'beta=0', ...); a model keeps its colour in every figure
(toy_rlhf.figures.model_colors). Every function writes a PNG at DPI to `path` (parent folders
created), closes its figure and returns the path.
"""
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from toy_rlhf import figures
from toy_rlhf.figures import (DASHES, FIGURE_SIZES, OTHER_COLOR, PREFERRED_COLOR, REFERENCE_COLOR,
                              centred_average, model_colors)
from toy_rlhf.language import DIGITS, PROMPT_LENGTH, VOCAB_SIZE
from toy_rlhf.metrics import PREFERENCE_TARGET

STAR_HEIGHT = 1.1  # where next_token_probs marks the aligned target, above probability 1
TOKEN_NAMES = [str(digit) for digit in range(DIGITS)] + ['SEP']
PREFERENCE_RATE_TOP = 0.9995  # top of ppo_curves' preference panel: rates above 99.95% run along it
PREFERENCE_RATE_TICKS = np.array([0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999])


def next_token_figure_size(n_models):
    """(width, height) inches of plot_next_token_probs: one row of four panels per model."""
    return (15, 1.6 + 2.5 * n_models)


def attention_figure_size(n_models, n_rows):
    """(width, height) inches of plot_attention: one panel per model of n_rows = layers * heads rows."""
    return (1.5 + 3.6 * n_models, 1.8 + 0.4 * n_rows)


def _words(tokens):
    """Tokens (sequence of ints) -> '5 7 1 5 SEP 6'."""
    return ' '.join(TOKEN_NAMES[int(token)] for token in tokens)


def plot_sft_loss(history, entropy_floor, path):
    """SFT loss vs iteration with the exact entropy floor. history: list of {'iter', 'loss'}."""
    fig, ax = plt.subplots(figsize=FIGURE_SIZES['sft_loss'], layout='constrained')
    ax.plot([row['iter'] for row in history], [row['loss'] for row in history],
            color=REFERENCE_COLOR, label='SFT loss (training batch)')
    ax.axhline(entropy_floor, color='black', linestyle='--',
               label=f'entropy floor {entropy_floor:.3f} nats (the lowest loss possible)')
    ax.set_xlabel('iteration')
    ax.set_ylabel('cross-entropy (nats per output token)')
    ax.set_title('SFT loss: its expectation cannot go below the entropy of the language')
    ax.legend()
    ax.grid(alpha=0.3)
    return figures.save(fig, path)


def plot_reward_model(history, scores, path, window=5):
    """Reward model training and its rewards on one sentence.

    history: list of {'iter', 'chosen', 'rejected'} (mean rewards of a batch); scores: the study's
    first_digit_scores ({'prompt', 'response', 'rewards', 'best', 'preferred'}). Left: chosen and
    rejected mean reward vs iteration (moving average over `window` logged rows, raw values faint
    behind). Right: the reward with each of the ten first digits in place of the response's first
    one, highlighted where the variant reaches the preference's best gold level for the prompt (for
    a preference on the first digit: the preferred digit (x4 + 1) % 10, annotated).
    """
    fig, (curves, bars) = plt.subplots(1, 2, figsize=FIGURE_SIZES['reward_model'], layout='constrained')

    iters = [row['iter'] for row in history]
    for key, color in (('chosen', PREFERRED_COLOR), ('rejected', OTHER_COLOR)):
        values = [row[key] for row in history]
        curves.plot(iters, values, color=color, alpha=0.3, linewidth=1)
        curves.plot(iters, centred_average(values, window), color=color, linewidth=2,
                    label=f'{key} responses')
    curves.set_xlabel('iteration')
    curves.set_ylabel('mean reward of the batch')
    curves.set_title(f'Training (centred moving average over {window} logged iterations)')
    curves.legend()
    curves.grid(alpha=0.3)

    prompt, rewards, preferred = scores['prompt'], scores['rewards'], scores['preferred']
    bars.bar(range(DIGITS), rewards, edgecolor='black',
             color=[PREFERRED_COLOR if scores['best'][digit] else OTHER_COLOR for digit in range(DIGITS)])
    bars.axhline(0, color='black', linewidth=0.8)
    if preferred is not None:
        bars.annotate(f'preferred\n({prompt[-1]} + 1) mod 10 = {preferred}',
                      (preferred, max(rewards[preferred].item(), 0)), xytext=(0, 4),
                      textcoords='offset points', ha='center', va='bottom', fontsize=9)
    bars.margins(y=0.25)
    bars.set_xticks(range(DIGITS))
    bars.set_xlabel('first output digit')
    bars.set_ylabel('reward-model score r(x, y)')
    bars.set_title(f"prompt {_words(prompt)}, response _ {_words(scores['response'][1:])}")
    bars.grid(axis='y', alpha=0.3)
    fig.suptitle('Reward model: training curves and the reward of each possible first digit')
    return figures.save(fig, path)


def plot_ppo_curves(histories, crossings, path, window=5, rate_label='P(first digit is the preferred one)'):
    """PPO training curves of each beta vs rollout samples: reward-model score, KL to the reference,
    preference rate (centred moving average over `window` iterations, raw values faint behind), with
    the 99% preference line and where each policy's rollouts first crossed it (the report's "samples
    to 99%").

    histories: ordered dict label -> list of rows with keys 'samples', 'objective/scores',
    'objective/kl_full', 'gold/preference_rate'; crossings: label -> the samples at which the policy
    first reached the target (toy_rlhf.metrics.samples_to_preference), None if never. Colours are those the policies have in the other
    figures (the reference's slot is skipped), and each policy has its own dash."""
    colors = model_colors(['reference (SFT)', *histories])
    styles = {label: DASHES[i % len(DASHES)] for i, label in enumerate(histories)}
    panels = [('objective/scores', 'reward-model score (mean over the batch)', 'Reward-model score'),
              ('objective/kl_full', 'KL(policy || reference), nats per response', 'KL to the reference'),
              ('gold/preference_rate', f'{rate_label}, logit scale',
               f'Preference rate (exact); ▼ first at {PREFERENCE_TARGET:.0%}')]
    fig, axes = plt.subplots(1, len(panels), figsize=FIGURE_SIZES['ppo_curves'], layout='constrained')
    _curve_panels(axes, histories, colors, panels, window, styles)
    preference = axes[2]
    # On a logit scale 90%, 99% and 99.9% are equally far apart, so the approach to the target shows
    # (a rate that rounds to 1 is drawn off the top rather than dropped).
    preference.set_yscale('logit', nonpositive='clip')
    preference.set_ylim(top=PREFERENCE_RATE_TOP)
    preference.set_yticks(PREFERENCE_RATE_TICKS, [f'{tick:.3g}%' for tick in 100 * PREFERENCE_RATE_TICKS])
    preference.yaxis.set_minor_formatter(NullFormatter())
    limits = preference.get_ylim()  # the ticks may have widened them
    preference.axhline(PREFERENCE_TARGET, color='black', linestyle='--', linewidth=1)
    reached = {}  # label -> the legend's words for where the policy first reached the target
    for label in histories:
        crossing = crossings[label]
        if crossing is None:
            reached[label] = f'never at {PREFERENCE_TARGET:.0%}'
            continue
        # A marker on the line, and a line down to the axis to read its x where markers crowd.
        preference.plot(crossing, PREFERENCE_TARGET, marker='v', markersize=10, color=colors[label],
                        markeredgecolor='black', linestyle='none', zorder=10)
        preference.vlines(crossing, limits[0], PREFERENCE_TARGET, color=colors[label], linewidth=1,
                          linestyle=styles[label])
        reached[label] = f'{PREFERENCE_TARGET:.0%} after {crossing:,} samples'
    preference.set_ylim(limits)
    # One legend, where the score panel is empty once it has levelled off: each policy's line and the
    # number the report quotes for it.
    handles = axes[0].get_legend_handles_labels()[0][:len(histories)]
    axes[0].legend(handles, [f'{label}: {reached[label]}' for label in histories], title='PPO policy',
                   loc='lower right')
    fig.suptitle(f'PPO training (centred moving average over {window} iterations, raw values faint)')
    return figures.save(fig, path)


def _curve_panels(axes, histories, colors, panels, window, styles):
    """One panel per (key, ylabel, title): each history's values against rollout samples, a centred
    moving average over raw values drawn faint. Each history is drawn narrower than and on top of
    the ones before it, so where two curves coincide the later one's dashes show inside the earlier
    one's line and neither hides the other."""
    widths = np.linspace(4, 1.5, len(histories))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for order, (label, rows) in enumerate(histories.items()):
            samples = [row['samples'] for row in rows]
            values = [row[key] for row in rows]
            ax.plot(samples, values, color=colors[label], alpha=0.2, linewidth=1, linestyle=styles[label])
            ax.plot(samples, centred_average(values, window), color=colors[label], linewidth=widths[order],
                    linestyle=styles[label], label=label, zorder=3 + order)
        ax.set_xlabel('rollout samples')
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)


def plot_next_token_probs(probabilities, path):
    """Each model's next-token probabilities at the 4 output steps of one sentence, teacher forced,
    against the exact language (black outlines) and, with stars, the tokens of the aligned language
    (the language conditioned on the preference's best reachable level) at the steps where it
    differs from the language: for first-digit, the preferred first digit.

    probabilities: the study's next_token_probabilities ({'sentence', 'models' (label -> (4, V), one
    row of panels each), 'language', 'starred'})."""
    sentence, models = probabilities['sentence'], probabilities['models']
    language, starred = probabilities['language'], probabilities['starred']
    colors = model_colors(models)
    steps = len(language)
    prefixes = [f'after {_words(sentence[:PROMPT_LENGTH + 1])}'] + \
               [f'after ... {_words(sentence[PROMPT_LENGTH + 1:PROMPT_LENGTH + 1 + step])}'
                for step in range(1, steps)]

    fig, axes = plt.subplots(len(models), steps, figsize=next_token_figure_size(len(models)),
                             sharey=True, squeeze=False, layout='constrained')
    for row, label in enumerate(models):
        for step in range(steps):
            ax = axes[row, step]
            ax.bar(range(VOCAB_SIZE), models[label][step], color=colors[label])
            ax.bar(range(VOCAB_SIZE), language[step], fill=False, edgecolor='black', linewidth=1.3)
            for token in starred[step]:  # inside the panel, above the bars' highest value, clear of the title
                ax.plot(token, STAR_HEIGHT, marker='*', markersize=15, color=PREFERRED_COLOR,
                        markeredgecolor='black', zorder=5)
            ax.set_xticks(range(VOCAB_SIZE), TOKEN_NAMES, fontsize=8)
            ax.set_ylim(0, STAR_HEIGHT + 0.08)
            ax.set_yticks(np.linspace(0, 1, 6))
            ax.grid(axis='y', alpha=0.3)
            if row == 0:
                ax.set_title(prefixes[step])
            if row == len(models) - 1:
                ax.set_xlabel('next token')
        axes[row, 0].set_ylabel(f'{label}\nprobability', color=colors[label], fontweight='bold')
    handles = [Patch(facecolor=OTHER_COLOR, label="model's probability (bar colour = model)"),
               Patch(fill=False, edgecolor='black', label='language, exact'),
               Line2D([], [], marker='*', markersize=15, color=PREFERRED_COLOR, markeredgecolor='black',
                      linestyle='none', label='aligned target: its tokens where it differs from the language')]
    fig.legend(handles=handles, loc='outside lower center', ncol=3)
    fig.suptitle(f'Next-token probabilities for {_words(sentence)}, teacher forced: each step is '
                 "conditioned on this sentence's own earlier tokens, not on the model's samples")
    return figures.save(fig, path)


def key_names(tokens):
    """Axis labels of the keys of plot_attention: the prompt's digits by role and value, then SEP
    (e.g. 'x1 = 5', ..., 'x4 = 5', 'SEP'); the README's point is about x4."""
    return [f'x{i + 1} = {TOKEN_NAMES[int(token)]}' if i < PROMPT_LENGTH else TOKEN_NAMES[int(token)]
            for i, token in enumerate(tokens)]


def plot_attention(attention, path):
    """Where each head looks when predicting the first output digit: the attention weights of the
    query at SEP (position 4) over keys 0..4, every layer and head, one panel per model.

    attention: the study's attention_from_sep ({'tokens': the input, 'models': label -> (n_layer,
    n_head, 5) weights})."""
    tokens, weights = attention['tokens'], attention['models']
    colors = model_colors(weights)
    n_rows = max(w.shape[0] * w.shape[1] for w in weights.values())
    fig, axes = plt.subplots(1, len(weights), figsize=attention_figure_size(len(weights), n_rows),
                             squeeze=False, layout='constrained')
    for ax, (label, w) in zip(axes[0], weights.items()):
        n_layer, n_head, n_keys = w.shape
        grid = w.reshape(n_layer * n_head, n_keys)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap='Blues', aspect='auto')
        for (r, c), value in np.ndenumerate(grid):
            ax.text(c, r, f'{value:.2f}', ha='center', va='center', fontsize=8,
                    color='white' if value > 0.6 else 'black')
        for layer in range(1, n_layer):
            ax.axhline(layer * n_head - 0.5, color='black', linewidth=1.5)
        ax.set_xticks(range(n_keys), key_names(tokens[:n_keys]))
        ax.set_yticks(range(n_layer * n_head),
                      [f'L{layer + 1} H{head + 1}' for layer in range(n_layer) for head in range(n_head)])
        ax.set_xlabel('key (token attended to)')
        ax.set_title(label, color=colors[label], fontweight='bold')
    axes[0, 0].set_ylabel('layer, head')
    fig.colorbar(image, ax=axes[0].tolist(), label='attention weight', shrink=0.9)
    fig.suptitle(f'Attention from SEP (predicting the first output digit), input {_words(tokens)}')
    return figures.save(fig, path)


def plot_first_token(rates, path):
    """The probability each model puts on the preferred first digit (x4 + 1) % 10 after prompt + SEP,
    over many prompts, sorted from highest to lowest (one curve per model, the exact language in
    black). rates: the study's preferred_first_digit_probabilities ({'language': curve, 'models':
    label -> curve}, each curve {'probabilities' sorted highest first, 'mean'})."""
    language, models = rates['language'], rates['models']
    n_prompts = len(language['probabilities'])
    share = np.linspace(0, 1, n_prompts)
    colors = model_colors(models)

    fig, ax = plt.subplots(figsize=FIGURE_SIZES['first_token'], layout='constrained')
    ax.plot(share, language['probabilities'], color='black', linestyle='--',
            label=f"language, exact (mean {language['mean']:.1%})")
    for i, (label, curve) in enumerate(models.items()):
        # The reference is drawn wider so that it still shows under a policy that stayed on top of it.
        ax.plot(share, curve['probabilities'], color=colors[label],
                linewidth=4 if i == 0 else 2, label=f"{label} (mean {curve['mean']:.1%})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('share of prompts (sorted by probability, highest first)')
    ax.set_ylabel('probability of the preferred first digit')
    ax.set_title(f'Probability of the preferred first digit (x4 + 1) mod 10, {n_prompts} prompts')
    ax.legend(loc='upper left', bbox_to_anchor=(1.02, 1))  # beside the axes: curves fill the panel
    ax.grid(alpha=0.3)
    return figures.save(fig, path)


def plot_kl_by_position(policies, path):
    """KL(policy || reference) split by the chain rule into the four response positions, one group of
    bars per policy: where each policy spent its KL. policies: {label: metrics with
    'kl_to_reference_by_position'} (the reference first, drawn too: its bars are 0)."""
    colors = model_colors(policies)
    fig, ax = plt.subplots(figsize=FIGURE_SIZES['kl_by_position'], layout='constrained')
    width = 0.8 / len(policies)
    for i, (label, metrics) in enumerate(policies.items()):
        ax.bar(np.arange(1, 5) + (i - (len(policies) - 1) / 2) * width, metrics['kl_to_reference_by_position'],
               width, color=colors[label], label=label)
    ax.set_xticks(range(1, 5), [f'y{position}' for position in range(1, 5)])
    ax.set_xlabel('response position')
    ax.set_ylabel('KL(policy || reference) at the position, nats')
    ax.set_title('Where each policy spends its KL: the chain rule, one response position at a time')
    ax.legend()
    ax.grid(axis='y', alpha=0.3)
    return figures.save(fig, path)
