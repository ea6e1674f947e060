"""report.md of the main study (toy_rlhf.studies.main): the settings, the time per stage, the metrics
table and the figures of a run.

Every sentence that states a result is built from the measured numbers, so the report says what
this run did, not what RLHF is expected to do.
"""
from toy_rlhf.preferences import resolve_preference
from toy_rlhf.studies.output import figure_link, markdown_table

COLUMNS = [('preference_rate', 'preference', '{:.2%}'), ('fidelity', 'fidelity', '{:.2%}'),
           ('gold_rate', 'gold', '{:.2%}'), ('kl_to_reference', 'KL to reference (nats)', '{:.3f}'),
           ('kl_to_aligned', 'KL to aligned (nats)', '{:.3f}')]


def metrics_table(metrics):
    """The Markdown table of every policy's exact metrics (one row per policy)."""
    rows = [[label, *(style.format(values[key]) for key, _, style in COLUMNS)]
            for label, values in metrics['policies'].items()]
    return markdown_table(['policy', *(title for _, title, _ in COLUMNS)], rows)


def stage_table(timings):
    """The Markdown table of the seconds each stage took in this run (a reused stage says so)."""
    rows = [[name, f"{timing['seconds']:.1f}{' (reused)' if timing.get('reused') else ''}"]
            for name, timing in timings.items()]
    return markdown_table(['stage', 'seconds'], rows)


def _percent(rate):
    return f'{rate:.1%}'


def _compared(value, other, more, less, same='the same as'):
    """'more' / 'less' / 'same': how value compares with other, as they print (to 0.1%)."""
    value, other = round(value, 3), round(other, 3)
    return more if value > other else less if value < other else same


def _later_digits(label, policy, reference):
    """What a policy did to the later digits, from its fidelity against the reference's."""
    verb = _compared(policy['fidelity'], reference['fidelity'], 'makes more of the later digits valid than',
                     'makes fewer of the later digits valid than', 'keeps the later digits as valid as')
    return (f'{label} {verb} the reference ({_percent(policy["fidelity"])} against '
            f'{_percent(reference["fidelity"])})')


def _closest_to_aligned(policies):
    """Which policy is closest to the aligned language, and which farthest, by KL to it."""
    ranked = sorted(policies, key=lambda label: policies[label]['kl_to_aligned'])
    closest, farthest = ranked[0], ranked[-1]
    if len(ranked) == 1:
        return f'{closest} is {policies[closest]["kl_to_aligned"]:.2f} nats from the aligned language.'
    return (f'{closest} is the closest to the aligned language (KL {policies[closest]["kl_to_aligned"]:.2f} '
            f'nats) and {farthest} the farthest ({policies[farthest]["kl_to_aligned"]:.2f}).')


def _kl_where(label, policy):
    """Where a policy spends its KL: each position's share, and which position takes the most."""
    by_position = policy['kl_to_reference_by_position']
    total = sum(by_position) or 1.0
    shares = ', '.join(f'y{i + 1} {_percent(kl / total)}' for i, kl in enumerate(by_position))
    most = max(range(len(by_position)), key=lambda i: by_position[i])
    return f'{label} spends the most on y{most + 1} ({shares} of {sum(by_position):.2f} nats).'


def _samples(samples):
    return 'never reached 99% preference' if samples is None else f'first reached 99% preference after {samples:,} samples'


def figure_captions(metrics, preference_name):
    """Two or three sentences per figure, each comparison computed from this run's numbers: the
    reference is the first policy, every other policy (one per beta) is described. The sentences
    about the preference follow the run's (first-digit's words for a preference on the first digit)."""
    on_first_digit = resolve_preference(preference_name).asks_for_a_first_digit
    reference_label, *labels = metrics['policies']
    reference = metrics['policies'][reference_label]
    tuned = {label: metrics['policies'][label] for label in labels}
    samples = metrics['ppo_samples_to_99_percent_preference']
    return {
        'sft_loss': f'SFT cross-entropy against training steps. The loss cannot go below the entropy '
                    f'of the language ({metrics["sft"]["entropy_floor"]:.4f} nats, dashed); the model '
                    f'ends {metrics["sft"]["language_kl"]:.4f} nats per token from the true distribution.',
        'reward_model': 'Left: mean reward of chosen and rejected responses during training. Right: '
                        'the reward of each possible first digit for one sentence; over fresh prompts '
                        + (f'the preferred digit scores highest {_percent(metrics["reward"]["rank_rate"])} of the time.'
                           if on_first_digit else
                           f'a language response of the best gold level outscores one of a lower level '
                           f'{_percent(metrics["reward"]["rank_rate"])} of the time.'),
        'ppo_curves': 'Reward-model score, KL to the reference and preference rate during PPO, per beta. '
                      + ' '.join(f'{label} ends at {_percent(policy["preference_rate"])} preference and a KL of '
                                 f'{policy["kl_to_reference"]:.2f} nats; it {_samples(samples.get(label))}.'
                                 for label, policy in tuned.items()),
        'next_token_probs': 'Next-token probabilities of each model on one fixed sentence (bars) with the '
                            'exact language distribution (outlines) and, where it differs from the language, '
                            'the tokens of the aligned target (stars). Teacher forced: at each step the model is '
                            'given this sentence\'s own earlier tokens, not the ones it would have sampled itself. '
                            + (f'The reference spreads its first digit over the increments '
                               f'({_percent(reference["preference_rate"])} on the preferred one). ' if on_first_digit
                               else 'The reference reaches the best gold level '
                                    f'{_percent(reference["preference_rate"])} of the time. ')
                            + ' '.join(f'{_later_digits(label, policy, reference)}.' for label, policy in tuned.items())
                            + ' ' + _closest_to_aligned(tuned),
        'kl_by_position': 'KL(policy || reference) of each policy split by the chain rule into the four response '
                          'positions. ' + ' '.join(_kl_where(label, policy) for label, policy in tuned.items()),
        'attention': 'Attention weights of every layer and head at the position that predicts the first '
                     'output digit. Compare where each model looks when it chooses the first digit.',
        'first_token': 'The probability each model puts on the preferred first digit, prompts sorted. Mean: '
                       + ', '.join(f'{label} {_percent(policy["preference_rate"])}'
                                   for label, policy in metrics['policies'].items()) + '.',
    }


PREFERRED_DIGIT_DEFINITIONS = '''Preference: probability of the preferred first digit. Fidelity: share of digits 2-4 \
that obey the rule.
Gold: preferred first digit and all later digits valid. KL to reference: KL(policy || SFT) of whole
responses. KL to aligned: KL(aligned language || policy), the aligned language being the true one
with the first digit forced to the preferred one.'''


def _definitions(preference_name):
    """What the table's columns mean for the run's preference."""
    preference = resolve_preference(preference_name)
    if preference.asks_for_a_first_digit:
        return PREFERRED_DIGIT_DEFINITIONS
    return (f'Preference ({preference.name}: {preference.description}): probability of a response at least as '
            'good as the best gold level a valid response reaches for the prompt. Fidelity: share of digits 2-4 '
            'that obey the rule. Gold: the best level and all four digits valid. KL to reference: KL(policy || '
            'SFT) of whole responses. KL to aligned: KL(aligned language || policy), the aligned language being '
            'the true one conditioned on the best gold level reachable for the prompt.')


def report_text(settings, metrics, timings, figures, run_dir):
    """The text of report.md, its figures ({name: path}) linked relative to run_dir, where it lies."""
    captions = figure_captions(metrics, settings['preference'])
    figure_sections = '\n\n'.join(f'### {name}\n\n{figure_link(figure, run_dir)}\n\n{captions[name]}'
                                   for name, figure in figures.items())
    stage_settings = '\n'.join(f'- `{name}`: ' + ', '.join(f'{key}={value}' for key, value in config.items())
                               for name, config in settings['stages'].items())
    return f"""# toy-rlhf run report

## Settings
seed {settings['seed']}, betas {', '.join(f'{beta:g}' for beta in settings['betas'])}, \
{'quick schedule' if settings['quick'] else 'default schedule'}; {settings['machine']['threads']} torch \
thread(s) on {settings['machine']['processor']}; \
{', '.join(f'{name} {version}' for name, version in settings['versions'].items())}. The numbers depend \
on the thread count, the processor and the versions.

{stage_settings}

## Time per stage (seconds, this run)
{stage_table(timings)}

## Metrics
SFT: KL(true language || model) = {metrics['sft']['language_kl']:.4f} nats per output token.
Reward model: held-out pairwise accuracy {metrics['reward']['pairwise_accuracy']:.2%}, \
rank rate {metrics['reward']['rank_rate']:.2%}.

{metrics_table(metrics)}

PPO rollout samples until the preference rate first reached 99%: \
{', '.join(f'{label} {"never" if samples is None else f"{samples:,}"}' for label, samples in metrics['ppo_samples_to_99_percent_preference'].items())}.

{_definitions(settings['preference'])}

## Figures

{figure_sections}
"""
