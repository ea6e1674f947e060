"""The gap split (toy_rlhf/studies/decomposition.py): the leaderboard's ceiling is the best exact
checkpoint made from the cell's own inputs, named by its path; each method's optimiser gap is that
ceiling less its gap closed; the reward-model gap is what pi* loses under gold."""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from toy_rlhf.language import sample_prompts
from toy_rlhf.optimal import objective, optimal_log_probs, optimal_value
from toy_rlhf.run import Run, Variant
from toy_rlhf.studies import decomposition
from toy_rlhf.studies.against_optimum import checkpoint_row
from toy_rlhf.studies.leaderboard import LeaderboardConfig, leaderboard, spread

# Tiny stages, as in test_leaderboard.py: what is tested is the bookkeeping, not what is learned.
TINY = {'sft': (('iters', 3), ('batch_size', 8), ('warmup_iters', 1)),
        'reward': (('iters', 2), ('pairs', 32), ('held_out_pairs', 32)),
        'ppo': (('iters', 2), ('prompts_per_iter', 4)), 'dpo': (('iters', 2), ('pairs', 32))}
GRID = LeaderboardConfig(preferences=('first-digit',), methods=('ppo', 'dpo'), seeds=(1,), prompts=2)
EXACT = (('prompt_pool', 2), ('prompts_per_iter', 1), ('learning_rate', 0.05))


def summary_of(folder):
    return json.loads((folder / 'leaderboard.json').read_text())


@pytest.fixture(scope='module')
def grid(tmp_path_factory):
    """A leaderboard folder whose one cell holds an exact path: 2 forward-KL steps, then 3 reverse."""
    folder = tmp_path_factory.mktemp('grid')
    leaderboard(folder, GRID, progress=False, schedule=TINY)
    before = summary_of(folder), (folder / 'leaderboard.md').read_text()
    run = Run(folder / 'seed1' / 'first-digit', progress=False)
    forward = Variant('exact', seed=1, settings=(*EXACT, ('iters', 2), ('divergence', 'forward')))
    run.train([forward])
    reverse = Variant('exact', seed=2, settings=(*EXACT, ('iters', 3), ('warm_start', str(run.path(forward)))))
    run.train([reverse])
    leaderboard(folder, GRID, progress=False, schedule=TINY)
    return folder, run, (forward, reverse), before


def test_the_ceiling_is_the_best_exact_checkpoint_of_the_cell_named_by_its_path(grid):
    folder, run, variants, _ = grid
    closed = {variant.name: checkpoint_row(run.path(variant), run.sft_path, run.reward_path, GRID.prompts,
                                           GRID.seed)['gap_closed'] for variant in variants}
    (target,) = summary_of(folder)['targets']
    assert target['ceiling']['median'] == pytest.approx(max(closed.values()), abs=1e-9)
    best = max(closed, key=closed.get)
    assert target['paths'] == {'1': 'forward KL 2 steps' if best == variants[0].name else
                               'forward KL 2, then reverse KL 3 steps'}
    for row in summary_of(folder)['rows']:  # the methods' rows: no exact checkpoint among them
        gap = summary_of(folder)['optimiser_gap'][row['label']]['first-digit']['median']
        assert gap == pytest.approx(max(closed.values()) - row['gap_closed'], abs=1e-9)
    assert {row['label'] for row in summary_of(folder)['rows']} == {'PPO beta=1', 'DPO beta=1'}
    assert (folder / 'decomposition.png').stat().st_size > 0
    assert '## The gap, split' in (folder / 'leaderboard.md').read_text()


def test_the_reward_model_gap_is_what_pi_star_loses_under_gold(grid):
    _, run, _, _ = grid
    tables = run.tables(sample_prompts(2, torch.Generator().manual_seed(0)))
    gold = tables.gold(run.gold_margin)
    optimum = optimal_log_probs(tables.log_ref, tables.rewards, 1.0)
    J, J_ref = objective(optimum, tables.log_ref, gold, 1.0).mean(), objective(tables.log_ref, tables.log_ref, gold, 1.0).mean()
    J_star = optimal_value(tables.log_ref, gold, 1.0).mean()
    expected = 1 - ((J - J_ref) / (J_star - J_ref)).item()
    assert decomposition.reward_model_gap(tables, run.gold_margin, 1.0) == pytest.approx(expected, abs=1e-12)
    assert expected > 0  # pi* of gold is gold's optimum: pi* of a reward model trained for two steps is not
    # A reward model that were the gold reward would lose nothing.
    assert decomposition.reward_model_gap(replace(tables, rewards=gold), run.gold_margin, 1.0) == pytest.approx(0, abs=1e-12)


def test_exact_checkpoints_of_another_reward_model_or_beta_make_no_ceiling(grid, tmp_path):
    _, run, variants, _ = grid
    assert [variant.name for variant in decomposition.exact_variants(run, (1.0,))] == sorted(v.name for v in variants)
    assert decomposition.exact_variants(run, (0.5,)) == []
    other = tmp_path / 'other'
    shutil.copytree(run.folder, other)
    reward = torch.load(other / 'reward.pt', weights_only=True)
    reward['state_dict'] = {name: value + 1e-3 for name, value in reward['state_dict'].items()}
    torch.save(reward, other / 'reward.pt')  # another reward model: its fingerprint differs
    assert decomposition.exact_variants(Run(other, progress=False), (1.0,)) == []


def test_a_path_that_leaves_the_folder_says_so(grid, tmp_path):
    _, run, (_, reverse), _ = grid
    for name in ('sft.pt', 'reward.pt', f'{reverse.name}.pt'):
        shutil.copy(run.folder / name, tmp_path / name)
    assert decomposition.path_name(Run(tmp_path, progress=False), reverse) == \
        'from another checkpoint, then reverse KL 3 steps'


def test_the_split_takes_each_seed_against_its_own_ceiling():
    rows = [{'label': 'A', 'preference': 'p', 'seed': seed, 'beta': 1.0, 'gap_closed': gap}
            for seed, gap in ((0, 0.5), (1, 0.7), (2, 0.9))]
    cells = [{'preference': 'p', 'seed': 0, 'beta': 1.0, 'ceiling': {'gap_closed': 0.8, 'path': 'x'}, 'reward_model_gap': 0.1},
             {'preference': 'p', 'seed': 1, 'beta': 1.0, 'ceiling': {'gap_closed': 0.9, 'path': 'y'}, 'reward_model_gap': 0.2},
             {'preference': 'p', 'seed': 2, 'beta': 1.0, 'ceiling': None, 'reward_model_gap': 0.3}]
    split = decomposition.split_gap(rows, cells, spread)
    assert split['optimiser_gap']['A']['p'] == {'median': pytest.approx(0.25), 'low': pytest.approx(0.2),
                                                'high': pytest.approx(0.3)}  # seed 2 has no ceiling
    (target,) = split['targets']
    assert target['ceiling'] == {'median': pytest.approx(0.85), 'low': 0.8, 'high': 0.9}
    assert target['reward_model_gap']['median'] == 0.2 and target['paths'] == {0: 'x', 1: 'y'}


def test_no_exact_path_leaves_the_gap_unsplit(grid):
    summary, report = grid[3]  # the same grid before its exact path was trained
    (target,) = summary['targets']
    assert target['ceiling'] is None and target['paths'] == {}
    assert summary['optimiser_gap'] == {}
    assert 'no exact path measured' in report
