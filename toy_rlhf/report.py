"""report.md: the settings, the time per stage, the metrics table and the figures of a run.

Every sentence that states a result is built from the measured numbers, so the report says what
this run did, not what RLHF is expected to do.
"""
import os
from pathlib import Path

from toy_rlhf.files import write_text

COLUMNS = [('preference_rate', 'preference', '{:.2%}'), ('fidelity', 'fidelity', '{:.2%}'),
           ('gold_rate', 'gold', '{:.2%}'), ('kl_to_reference', 'KL to reference (nats)', '{:.3f}'),
           ('kl_to_aligned', 'KL to aligned (nats)', '{:.3f}')]


def metrics_table(metrics):
    """The Markdown table of every policy's exact metrics (one row per policy)."""
    lines = ['| policy | ' + ' | '.join(title for _, title, _ in COLUMNS) + ' |',
             '|---|' + '---:|' * len(COLUMNS)]
    for label, values in metrics['policies'].items():
        cells = [style.format(values[key]) for key, _, style in COLUMNS]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def figure_captions(metrics):
    """Two sentences per figure, with this run's numbers."""
    policies = metrics['policies']
    labels = list(policies)
    reference, aligned = policies[labels[0]], policies[labels[1]]
    other = policies[labels[2]] if len(labels) > 2 else None
    comparison = (f' {labels[2]} reaches {other["preference_rate"]:.1%} preference at a KL of '
                  f'{other["kl_to_reference"]:.2f} nats.') if other else ''
    later = (f' Under {labels[2]} the later digits obey the rule {other["fidelity"]:.1%} of the time, '
             f'and its KL to the aligned language is {other["kl_to_aligned"]:.2f} nats against '
             f'{aligned["kl_to_aligned"]:.2f} for {labels[1]}: that is the variety of the later digits '
             'it gave up.') if other else ''
    return {
        'sft_loss': f'SFT cross-entropy against training steps. The loss cannot go below the entropy '
                    f'of the language ({metrics["sft"]["entropy_floor"]:.4f} nats, dashed); the model '
                    f'ends {metrics["sft"]["language_kl"]:.4f} nats per token from the true distribution.',
        'reward_model': f'Left: mean reward of chosen and rejected responses during training. Right: '
                        f'the reward of each possible first digit for one sentence; over fresh prompts '
                        f'the preferred digit scores highest {metrics["reward"]["rank_rate"]:.1%} of the time.',
        'ppo_curves': f'Reward-model score, KL to the reference and preference rate during PPO, per beta. '
                      f'{labels[1]} reaches {aligned["preference_rate"]:.1%} preference at a KL of '
                      f'{aligned["kl_to_reference"]:.2f} nats.{comparison}',
        'next_token_probs': 'Next-token probabilities of each model on one fixed sentence (bars) with the '
                            'exact language distribution (outlines) and, on the first step, the aligned '
                            f'target. The reference spreads its first digit over the increments '
                            f'({reference["preference_rate"]:.1%} on the preferred one); {labels[1]} moves '
                            f'the first digit and keeps the later ones ({aligned["fidelity"]:.1%} valid).{later}',
        'attention': 'Attention weights of every layer and head at the position that predicts the first '
                     'output digit. Compare where each model looks when it chooses the first digit.',
        'first_token': 'The probability each model puts on the preferred first digit, prompts sorted. '
                       f'Mean: reference {reference["preference_rate"]:.1%}, {labels[1]} '
                       f'{aligned["preference_rate"]:.1%}' + (f', {labels[2]} {other["preference_rate"]:.1%}.'
                                                              if other else '.'),
    }


def write_report(path, settings, metrics, timings, figures):
    """Write report.md (figures linked relative to the report's folder)."""
    path = Path(path)
    stage_rows = '\n'.join(
        f"| {name} | {timing['seconds']:.1f}{' (reused)' if timing.get('reused') else ''} |"
        for name, timing in timings.items())
    captions = figure_captions(metrics)
    figure_sections = '\n\n'.join(
        f'### {name}\n\n![{name}]({Path(os.path.relpath(figure, path.parent)).as_posix()})\n\n{captions[name]}'
        for name, figure in figures.items())
    stage_settings = '\n'.join(f'- `{name}`: ' + ', '.join(f'{key}={value}' for key, value in config.items())
                               for name, config in settings['stages'].items())
    text = f"""# toy-rlhf run report

## Settings
seed {settings['seed']}, betas {', '.join(f'{beta:g}' for beta in settings['betas'])}, \
{'quick schedule' if settings['quick'] else 'default schedule'}; \
{', '.join(f'{name} {version}' for name, version in settings['versions'].items())}.

{stage_settings}

## Time per stage (seconds, this run)
| stage | seconds |
|---|---:|
{stage_rows}

## Metrics
SFT: KL(true language || model) = {metrics['sft']['language_kl']:.4f} nats per output token.
Reward model: held-out pairwise accuracy {metrics['reward']['pairwise_accuracy']:.2%}, \
rank rate {metrics['reward']['rank_rate']:.2%}.

{metrics_table(metrics)}

PPO rollout samples until the preference rate first reached 99%: \
{', '.join(f'{label} {"never" if samples is None else f"{samples:,}"}' for label, samples in metrics['ppo_samples_to_99_percent_preference'].items())}.

Preference: probability of the preferred first digit. Fidelity: share of digits 2-4 that obey the rule.
Gold: preferred first digit and all later digits valid. KL to reference: KL(policy || SFT) of whole
responses. KL to aligned: KL(aligned language || policy), the aligned language being the true one
with the first digit forced to the preferred one.

## Figures

{figure_sections}
"""
    write_text(path, text)
