"""report.md says what the numbers say: every comparison in a caption follows the metrics it is given,
whichever beta behaved better, for any number of betas. Hand-made metrics, no training."""
import pytest

from toy_rlhf.studies.main_report import figure_captions, report_text

FIGURES = ('sft_loss', 'reward_model', 'ppo_curves', 'next_token_probs', 'attention', 'first_token')


def policy(preference, fidelity, kl_to_reference, kl_to_aligned, by_position=None):
    return {'preference_rate': preference, 'fidelity': fidelity, 'gold_rate': preference * fidelity,
            'kl_to_reference': kl_to_reference, 'kl_to_aligned': kl_to_aligned,
            'kl_to_reference_by_position': by_position or [kl_to_reference, 0.0, 0.0, 0.0]}


def run_metrics(policies, samples):
    return {'sft': {'language_kl': 0.01, 'entropy_floor': 1.2},
            'reward': {'pairwise_accuracy': 0.95, 'rank_rate': 0.99},
            'policies': {'reference (SFT)': policy(0.33, 0.91, 0.0, 3.0), **policies},
            'ppo_samples_to_99_percent_preference': samples}


def sentence_about(caption, label):
    return next(sentence for sentence in caption.split('. ') if sentence.startswith(label))


def test_when_beta_0_behaves_better_the_captions_say_so():
    # beta=0 listed second and better on every count: more valid later digits, closer to the aligned
    # language; beta=1 broke later digits.
    metrics = run_metrics({'beta=1': policy(0.97, 0.80, 2.5, 1.9), 'beta=0': policy(0.995, 0.93, 1.1, 0.4)},
                          {'beta=1': None, 'beta=0': 12_288})
    caption = figure_captions(metrics, 'first-digit')['next_token_probs']
    assert 'beta=1 makes fewer of the later digits valid than the reference (80.0% against 91.0%)' in caption
    assert 'beta=0 makes more of the later digits valid than the reference (93.0% against 91.0%)' in caption
    assert 'beta=0 is the closest to the aligned language (KL 0.40 nats) and beta=1 the farthest (1.90)' in caption
    curves = figure_captions(metrics, 'first-digit')['ppo_curves']
    assert 'beta=1 ends at 97.0% preference and a KL of 2.50 nats; it never reached 99% preference' in curves
    assert 'beta=0 ends at 99.5% preference and a KL of 1.10 nats; it first reached 99% preference after 12,288' in curves


def test_the_kl_caption_names_the_position_each_policy_spends_most_on():
    metrics = run_metrics({'beta=1': policy(0.9, 0.9, 1.0, 1.0, [0.1, 0.2, 0.3, 0.4]),
                           'beta=0': policy(0.9, 0.9, 2.0, 1.0, [1.5, 0.5, 0.0, 0.0])}, {'beta=1': None, 'beta=0': None})
    caption = figure_captions(metrics, 'first-digit')['kl_by_position']
    assert 'beta=1 spends the most on y4 (y1 10.0%, y2 20.0%, y3 30.0%, y4 40.0% of 1.00 nats)' in caption
    assert 'beta=0 spends the most on y1 (y1 75.0%, y2 25.0%, y3 0.0%, y4 0.0% of 2.00 nats)' in caption


def test_the_opposite_story_gives_the_opposite_captions():
    metrics = run_metrics({'beta=1': policy(0.99, 0.91, 0.6, 0.2), 'beta=0': policy(1.0, 0.18, 9.0, 7.5)},
                          {'beta=1': 20_000, 'beta=0': 3_000})
    caption = figure_captions(metrics, 'first-digit')['next_token_probs']
    assert 'beta=1 keeps the later digits as valid as the reference (91.0% against 91.0%)' in caption
    assert 'beta=0 makes fewer of the later digits valid than the reference (18.0% against 91.0%)' in caption
    assert 'beta=1 is the closest to the aligned language' in caption and 'beta=0 the farthest' in caption


def test_a_policy_less_valid_than_the_reference_is_not_said_to_keep_its_digits():
    # The quick schedule's case: 88.8% valid later digits against the reference's 91.0%.
    metrics = run_metrics({'beta=1': policy(0.60, 0.888, 0.3, 2.0)}, {'beta=1': None})
    caption = figure_captions(metrics, 'first-digit')['next_token_probs']
    assert 'keeps' not in caption
    assert 'beta=1 makes fewer of the later digits valid than the reference (88.8% against 91.0%)' in caption
    assert 'beta=1 is 2.00 nats from the aligned language' in caption


@pytest.mark.parametrize('betas', [(1, 0.3, 0.1, 0), (0, 0.03, 0.3, 1, 3, 10)])
def test_every_beta_gets_its_caption(betas):
    policies = {f'beta={beta:g}': policy(0.9 + i / 100, 0.9 - i / 100, i / 2, i / 3) for i, beta in enumerate(betas)}
    metrics = run_metrics(policies, {label: 1000 * i for i, label in enumerate(policies)})
    captions = figure_captions(metrics, 'first-digit')
    for label in policies:
        for figure in ('ppo_curves', 'next_token_probs', 'first_token'):
            assert label in captions[figure], (figure, label)
        assert sentence_about(captions['next_token_probs'], label)


def test_the_report_records_threads_processor_and_versions(tmp_path):
    metrics = run_metrics({'beta=1': policy(0.99, 0.91, 0.6, 0.2)}, {'beta=1': 20_000})
    settings = {'seed': 0, 'betas': [1.0], 'quick': True, 'preference': 'first-digit', 'stages': {},
                'versions': {'torch': '9.9.9'},
                'machine': {'threads': 3, 'processor': 'Some CPU 3000'}}
    figures = {name: tmp_path / 'plots' / f'{name}.png' for name in FIGURES}
    text = report_text(settings, metrics, {'total': {'seconds': 1.0}}, figures, tmp_path)
    assert '3 torch thread(s) on Some CPU 3000' in text and 'torch 9.9.9' in text
    assert '](plots/first_token.png)' in text


def test_the_captions_of_another_preference_speak_of_its_best_level_not_the_preferred_digit():
    metrics = run_metrics({'beta=1': policy(0.14, 0.99, 0.5, 2.9)}, {'beta=1': None})
    captions = figure_captions(metrics, 'last-digit')
    assert 'a language response of the best gold level outscores one of a lower level 99.0%' in captions['reward_model']
    assert 'The reference reaches the best gold level 33.0% of the time' in captions['next_token_probs']
    assert 'preferred' not in captions['reward_model'] + captions['next_token_probs']
