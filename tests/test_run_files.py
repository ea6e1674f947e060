"""What each command writes into a run folder and what it reads from it: a method's checkpoint is
named after its settings, so no command replaces another's finished result; a policy trains for the
preference of the reward model it trains against; and the preference a checkpoint names is imported
only when the user names it too."""
from pathlib import Path

from toy_rlhf.checkpoint import load_checkpoint
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.ppo import PPOConfig

from test_run_dir import TINY_SFT, in_a_fresh_folder, run  # noqa: F401 (in_a_fresh_folder: an autouse fixture)

TINY_REWARD = ['--iters', '1', '--pairs', '8', '--held-out-pairs', '8', '--batch-size', '2', '--quiet']
# A tiny PPO run; its warm start off, as last-digit's recipe would turn it on (what is tested here is
# where runs train and what they refuse, not what they learn).
TINY_PPO = ['--prompts-per-iter', '2', '--warm-start-n', '0', '--quiet']


def a_run(capsys, preference='first-digit'):
    for command, arguments in (('sft', TINY_SFT), ('reward', TINY_REWARD + ['--preference', preference])):
        assert run(command, arguments, capsys)[0] == 0
    return Path('runs/default')


def checkpoint_bytes(folder):
    """The run's checkpoints (not the exact tables a study keeps beside them, tables_*.pt)."""
    return {path.name: path.read_bytes() for path in folder.glob('*.pt') if not path.name.startswith('tables_')}


def test_a_method_checkpoint_is_named_after_the_settings_that_differ_from_its_defaults():
    ppo = METHODS['ppo']
    assert ppo.stem(PPOConfig()) == 'ppo_beta1'
    assert ppo.stem(PPOConfig(beta=0.0)) == 'ppo_beta0'
    assert ppo.stem(PPOConfig(seed=2)) == 'ppo_beta1_seed2'
    short, shorter = ppo.stem(PPOConfig(iters=3)), ppo.stem(PPOConfig(iters=2))
    assert short.startswith('ppo_beta1_') and shorter.startswith('ppo_beta1_') and short != shorter
    assert ppo.stem(PPOConfig(iters=3)) == short  # stable: the same settings, the same name


def test_a_comparison_with_other_settings_leaves_a_finished_checkpoint_as_it_was(capsys):
    run_dir = a_run(capsys)
    assert run('ppo', ['--iters', '1'] + TINY_PPO, capsys)[0] == 0
    before = checkpoint_bytes(run_dir)
    status, _, err = run('compare', ['--methods', 'ppo', '--no-presets', '--prompts', '1', '--ppo.iters', '2',
                                      '--ppo.prompts-per-iter', '2', '--quiet'], capsys)
    assert status == 0, err
    after = checkpoint_bytes(run_dir)
    assert {name: after[name] for name in before} == before
    assert len(after) == len(before) + 1  # the comparison's own PPO run, under its own name


def test_a_policy_trains_for_its_reward_models_preference_and_refuses_another(capsys):
    run_dir = a_run(capsys, preference='last-digit')
    assert run('ppo', ['--iters', '1'] + TINY_PPO, capsys)[0] == 0
    [policy] = run_dir.glob('ppo_beta1*.pt')
    assert load_checkpoint(policy)['train_config']['preference'] == 'last-digit'
    # DPO needs no reward model, but a run has one preference: its reward model's.
    assert run('dpo', ['--iters', '1', '--pairs', '8', '--batch-size', '2', '--quiet'], capsys)[0] == 0
    [dpo] = run_dir.glob('dpo_beta1*.pt')
    assert load_checkpoint(dpo)['train_config']['preference'] == 'last-digit'
    before = checkpoint_bytes(run_dir)
    status, _, err = run('ppo', ['--iters', '2', '--preference', 'first-digit'] + TINY_PPO, capsys)
    assert status == 2 and len(err) == 1
    assert 'reward.pt was trained for the preference last-digit, not first-digit' in err[0]
    assert checkpoint_bytes(run_dir) == before


def test_a_user_preference_stored_in_a_run_is_used_only_when_named(capsys):
    name = 'test_preferences:even_last_digit'
    run_dir = a_run(capsys, preference=name)
    status, _, err = run('ppo', ['--iters', '1'] + TINY_PPO, capsys)
    assert status == 2 and f'give --preference {name} to use it' in err[0]
    status, _, err = run('ppo', ['--iters', '1', '--preference', name] + TINY_PPO, capsys)
    assert status == 0, err
    [policy] = run_dir.glob('ppo_beta1*.pt')
    status, out, err = run('evaluate', [str(policy), '--prompts', '4', '--json'], capsys)
    assert status == 2 and f'give --preference {name}' in err[0]
    status, out, err = run('evaluate', [str(policy), '--prompts', '4', '--json', '--preference', name], capsys)
    assert status == 0 and 'preference_rate' in out


def test_a_method_refuses_a_reward_model_made_from_another_sft_policy(capsys):
    run_dir = a_run(capsys)
    assert run('sft', TINY_SFT + ['--seed', '1'], capsys)[0] == 0  # sft.pt retrained; reward.pt is not
    before = checkpoint_bytes(run_dir)
    status, _, err = run('ppo', ['--iters', '1'] + TINY_PPO, capsys)
    assert status == 2 and len(err) == 1
    assert 'reward.pt: made from another sft.pt' in err[0] and 'toy-rlhf reward' in err[0]
    assert checkpoint_bytes(run_dir) == before
