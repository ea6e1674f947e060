"""The figures: each is written as a PNG of the size asked for, colours follow the model's position.
The shared look (toy_rlhf.figures) and the main study's figures, drawn from what the study computes."""
import re
import struct

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from mingpt.model import GPT
from toy_rlhf import figures
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.studies import main, main_figures as plots
from toy_rlhf.metrics import samples_to_preference
from toy_rlhf.policy import policy_config
from toy_rlhf.reward import reward_model_config


PROMPT = torch.tensor([5, 7, 1, 5])
RESPONSE = torch.tensor([6, 2, 7, 3])
LABELS = ['reference (SFT)', 'beta=1', 'beta=0']


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    return {label: GPT(policy_config('gpt-nano')) for label in LABELS}


def png_size(path):
    """(width, height) in pixels from the PNG header (IHDR is the first chunk)."""
    with open(path, 'rb') as file:
        header = file.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n' and header[12:16] == b'IHDR'
    return struct.unpack('>II', header[16:24])


def assert_png(path, inches):
    """path is a non-empty PNG of exactly inches * DPI pixels, and no figure was left open."""
    assert path.stat().st_size > 0
    assert png_size(path) == tuple(round(side * figures.DPI) for side in inches)
    assert plt.get_fignums() == []


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, in order (closed, but still readable)."""
    saved = []
    real_save = figures.save

    def save(fig, path):
        saved.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(figures, 'save', save)
    return saved


def test_the_centred_average_is_centred_and_shrinks_symmetrically_at_the_ends():
    step = [0] * 10 + [1] * 10
    averaged = figures.centred_average(step, window=5)
    # Centred on the step: it crosses 1/2 between the last 0 and the first 1, symmetrically, and is
    # flat two points away on either side (a trailing mean would reach 1/2 two points late).
    np.testing.assert_allclose(averaged[7:13], [0, 0.2, 0.4, 0.6, 0.8, 1])
    np.testing.assert_allclose(averaged, 1 - averaged[::-1])
    np.testing.assert_allclose(figures.centred_average([3.0] * 7, window=5), [3.0] * 7)
    # Near the ends the window shrinks on both sides: the ends are their own values, the next points
    # average one neighbour on each side, and no point is padded.
    np.testing.assert_allclose(figures.centred_average([1, 2, 3, 4, 10], window=5), [1, 2, 4, 17 / 3, 10])
    np.testing.assert_allclose(figures.centred_average([4, 2], window=1), [4, 2])
    for window in (0, 4):
        with pytest.raises(ValueError):
            figures.centred_average([1], window=window)


def test_a_figure_save_interrupted_midway_leaves_the_previous_figure_and_no_temporary_file(tmp_path, monkeypatch):
    history = [{'iter': 10 * i, 'loss': 2.4 - 0.1 * i} for i in range(10)]
    existing = plots.plot_sft_loss(history, 1.17, tmp_path / 'sft_loss.png')
    before = existing.read_bytes()

    def savefig_interrupted_midway(self, file, **kwargs):
        file.write(b'\x89PNG half a figure')
        raise KeyboardInterrupt

    monkeypatch.setattr(plt.Figure, 'savefig', savefig_interrupted_midway)
    for path in (existing, tmp_path / 'new.png'):
        with pytest.raises(KeyboardInterrupt):
            plots.plot_sft_loss(history[:5], 1.17, path)
        assert plt.get_fignums() == []  # closed even so
    assert existing.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['sft_loss.png']  # no new.png, no temporary file


def test_model_colors_depend_only_on_position_and_are_distinct():
    colors = figures.model_colors(LABELS)
    renamed = figures.model_colors(['sft', 'beta=0.1', 'beta=2', 'beta=5'])
    assert list(colors.values()) == list(renamed.values())[:3]
    assert colors['reference (SFT)'] == figures.REFERENCE_COLOR
    assert colors['beta=1'] == figures.MODEL_COLORS[0]
    many = list(figures.model_colors([f'model {i}' for i in range(1 + len(figures.MODEL_COLORS))]).values())
    assert len(set(many)) == len(many)


def test_sft_loss_figure(tmp_path):
    history = [{'iter': 10 * i, 'loss': 2.4 - 0.1 * i} for i in range(10)]
    path = plots.plot_sft_loss(history, 1.17, tmp_path / 'nested' / 'sft_loss.png')
    assert_png(path, figures.FIGURE_SIZES['sft_loss'])


def test_reward_model_figure(tmp_path, drawn):
    torch.manual_seed(0)
    reward_model = GPT(reward_model_config())
    history = [{'iter': 10 * i, 'chosen': 0.3 * i, 'rejected': -0.3 * i} for i in range(8)]
    scores = main.first_digit_scores(reward_model, PROMPT, RESPONSE, PREFERENCES['first-digit'])
    path = plots.plot_reward_model(history, scores, tmp_path / 'reward.png')
    assert_png(path, figures.FIGURE_SIZES['reward_model'])
    assert all(ax.get_ylabel() for ax in drawn[0].axes)


def test_ppo_curves_figure_marks_where_each_policy_first_reached_99_percent(tmp_path, drawn):
    rates = {'beta=1': [0.3, 0.6, 0.9, 0.995, 0.98, 0.999], 'beta=0': [0.3, 0.5, 0.7, 0.9, 0.95, 0.97],
             'beta=0.1': [0.4, 0.99, 1.0, 1.0, 1.0, 1.0]}
    histories = {label: [{'samples': 384 * (i + 1), 'objective/scores': rate, 'objective/kl_full': 0.1 * i,
                          'gold/preference_rate': rate} for i, rate in enumerate(values)]
                 for label, values in rates.items()}
    crossings = {label: samples_to_preference(rows) for label, rows in histories.items()}
    path = plots.plot_ppo_curves(histories, crossings, tmp_path / 'ppo.png')
    assert_png(path, figures.FIGURE_SIZES['ppo_curves'])
    score, _, preference = drawn[0].axes
    # The markers sit on the 99% line where samples_to_preference puts the crossing (the report's
    # number): the first row at or above 99%, even when a later row dips below (beta=1), none for a
    # policy that never got there (beta=0). The legend quotes the same numbers.
    markers = {line.get_color(): (line.get_xdata()[0], line.get_ydata()[0])
               for line in preference.get_lines() if line.get_marker() == 'v'}
    colors = figures.model_colors(['reference (SFT)', *histories])
    assert {samples_to_preference(histories[label]) for label in ('beta=1', 'beta=0.1')} == {1536, 768}
    assert markers == {colors['beta=1']: (1536, 0.99), colors['beta=0.1']: (768, 0.99)}
    assert any(tuple(line.get_ydata()) == (0.99, 0.99) and line.get_linestyle() == '--'
               for line in preference.get_lines())
    legend = [text.get_text() for text in score.get_legend().get_texts()]
    assert legend == ['beta=1: 99% after 1,536 samples', 'beta=0: never at 99%', 'beta=0.1: 99% after 768 samples']
    # One dash per policy, each drawn narrower than and on top of the ones before it, so that where
    # the curves coincide every one still shows.
    averaged = [line for line in preference.get_lines() if line.get_label() in histories]
    assert [line.get_label() for line in averaged] == list(histories)
    assert len({line.get_linestyle() for line in averaged}) == 3
    assert averaged[0].get_linewidth() > averaged[1].get_linewidth() > averaged[2].get_linewidth()
    assert averaged[0].get_zorder() < averaged[1].get_zorder() < averaged[2].get_zorder()


def test_next_token_probs_figure_keeps_the_star_inside_its_panel(tmp_path, models, drawn):
    probabilities = main.next_token_probabilities(models, PROMPT, RESPONSE, PREFERENCES['first-digit'])
    path = plots.plot_next_token_probs(probabilities, tmp_path / 'next_token.png')
    assert_png(path, plots.next_token_figure_size(len(models)))
    first_step = drawn[0].axes[0]
    star = next(line for line in first_step.get_lines() if line.get_marker() == '*')
    assert star.get_ydata()[0] < first_step.get_ylim()[1]  # drawn inside the axes, below the title
    assert 'teacher forced' in drawn[0].get_suptitle()


def test_attention_figure_names_each_key_by_its_role(tmp_path, models, drawn):
    n_layer, n_head = len(models['beta=1'].transformer.h), models['beta=1'].transformer.h[0].attn.n_head
    path = plots.plot_attention(main.attention_from_sep(models, PROMPT, RESPONSE), tmp_path / 'attention.png')
    assert_png(path, plots.attention_figure_size(len(models), n_layer * n_head))
    keys = [label.get_text() for label in drawn[0].axes[0].get_xticklabels()]
    assert keys == ['x1 = 5', 'x2 = 7', 'x3 = 1', 'x4 = 5', 'SEP']


def test_first_token_figure_gives_means_in_percent(tmp_path, models, drawn):
    rates = main.preferred_first_digit_probabilities(models, PREFERENCES['first-digit'], seed=0, n_prompts=200)
    path = plots.plot_first_token(rates, tmp_path / 'first_token.png')
    assert_png(path, figures.FIGURE_SIZES['first_token'])
    legend = [text.get_text() for text in drawn[0].axes[0].get_legend().get_texts()]
    assert all(re.search(r'\(mean \d+\.\d%\)$', text) for text in legend), legend


def test_the_figures_data_is_computed_with_models_in_eval_mode(models):
    for model in models.values():
        model.train()
    main.preferred_first_digit_probabilities(models, PREFERENCES['first-digit'], seed=0, n_prompts=50)
    assert not any(model.training for model in models.values())
