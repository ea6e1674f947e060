"""The figures: each is written as a PNG of the size asked for, colours follow the model's position."""
import struct

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from mingpt.model import GPT
from toy_rlhf import plots
from toy_rlhf.policy import policy_config
from toy_rlhf.reward import reward_model_config

torch.set_num_threads(1)  # avoids thread oversubscription on 2 shared cores

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
    assert png_size(path) == tuple(round(side * plots.DPI) for side in inches)
    assert plt.get_fignums() == []


def test_moving_average_is_a_trailing_mean_with_an_expanding_start():
    averaged = plots.moving_average([1, 2, 3, 4, 10], window=3)
    np.testing.assert_allclose(averaged, [1, 1.5, 2, 3, 17 / 3])
    np.testing.assert_allclose(plots.moving_average([4, 2], window=1), [4, 2])
    np.testing.assert_allclose(plots.moving_average([4, 2], window=10), [4, 3])
    with pytest.raises(ValueError):
        plots.moving_average([1], window=0)


def test_model_colors_depend_only_on_position_and_are_distinct():
    colors = plots.model_colors(LABELS)
    renamed = plots.model_colors(['sft', 'beta=0.1', 'beta=2', 'beta=5'])
    assert list(colors.values()) == list(renamed.values())[:3]
    assert colors['reference (SFT)'] == plots.REFERENCE_COLOR
    assert colors['beta=1'] == plots.MODEL_COLORS[0]
    many = list(plots.model_colors([f'model {i}' for i in range(1 + len(plots.MODEL_COLORS))]).values())
    assert len(set(many)) == len(many)


def test_sft_loss_figure(tmp_path):
    history = [{'iter': 10 * i, 'loss': 2.4 - 0.1 * i} for i in range(10)]
    path = plots.plot_sft_loss(history, 1.17, tmp_path / 'nested' / 'sft_loss.png')
    assert_png(path, plots.FIGURE_SIZES['sft_loss'])


def test_reward_model_figure(tmp_path):
    torch.manual_seed(0)
    reward_model = GPT(reward_model_config())
    history = [{'iter': 10 * i, 'chosen': 0.3 * i, 'rejected': -0.3 * i} for i in range(8)]
    path = plots.plot_reward_model(history, reward_model, PROMPT, RESPONSE, tmp_path / 'reward.png')
    assert_png(path, plots.FIGURE_SIZES['reward_model'])


def test_ppo_curves_figure(tmp_path):
    histories = {beta: [{'samples': 64 * i, 'objective/scores': i * scale, 'objective/kl_full': 0.1 * i,
                         'gold/preference_rate': min(1.0, 0.3 + 0.05 * i)} for i in range(12)]
                 for beta, scale in (('beta=1', 0.5), ('beta=0', 1.0))}
    path = plots.plot_ppo_curves(histories, tmp_path / 'ppo.png')
    assert_png(path, plots.FIGURE_SIZES['ppo_curves'])


def test_next_token_probs_figure(tmp_path, models):
    path = plots.plot_next_token_probs(models, PROMPT, RESPONSE, tmp_path / 'next_token.png')
    assert_png(path, plots.next_token_figure_size(len(models)))


def test_attention_figure(tmp_path, models):
    n_layer, n_head = len(models['beta=1'].transformer.h), models['beta=1'].transformer.h[0].attn.n_head
    path = plots.plot_attention(models, PROMPT, RESPONSE, tmp_path / 'attention.png')
    assert_png(path, plots.attention_figure_size(len(models), n_layer * n_head))


def test_first_token_figure(tmp_path, models):
    path = plots.plot_first_token(models, tmp_path / 'first_token.png', n_prompts=200)
    assert_png(path, plots.FIGURE_SIZES['first_token'])


def test_plots_evaluate_models_in_eval_mode(tmp_path, models):
    for model in models.values():
        model.train()
    plots.plot_first_token(models, tmp_path / 'first_token.png', n_prompts=50)
    assert not any(model.training for model in models.values())
