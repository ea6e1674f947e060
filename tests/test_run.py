"""A Run reads a run folder's facts one way for every study: the preference and the gold margin are
the reward model's, a study on an empty folder trains what it needs, and a policy is measured against
its method's own target wherever it is measured."""
import concurrent.futures
import dataclasses
import json
import signal

import pytest
import torch

from mingpt.model import GPT
from toy_rlhf import cli, run as run_module
from toy_rlhf.checkpoint import load_model, save_checkpoint
from toy_rlhf.executors import ExecutorConfig, executor
from toy_rlhf.language import sample_prompts
from toy_rlhf.policy import policy_config
from toy_rlhf.reward import RewardConfig, reward_model_config
from toy_rlhf.run import Run, Variant
from toy_rlhf.sft import SFTConfig
from toy_rlhf.studies.against_optimum import checkpoint_row
from toy_rlhf.studies.credit import ExactMeasure
from toy_rlhf.studies.methods import CompareConfig, compare


@pytest.fixture(autouse=True)
def sigterm_handler_restored():
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def random_run(folder, **reward_settings):
    """A run folder holding an untrained SFT policy and reward model, the latter stored with settings."""
    torch.manual_seed(0)
    save_checkpoint(folder / 'sft.pt', GPT(policy_config()), 'policy', {}, {})
    save_checkpoint(folder / 'reward.pt', GPT(reward_model_config()), 'reward', reward_settings, {})
    return folder


def test_a_variant_is_named_as_its_checkpoint_and_gives_its_config():
    variant = Variant('ppo', beta=0.0, seed=2, settings=(('iters', 3),))
    config = variant.config()
    assert (config.beta, config.seed, config.iters) == (0.0, 2, 3)
    assert variant.name.startswith('ppo_beta0_seed2_')
    assert Variant.of(config, 'ppo') == Variant('ppo', 0.0, 2, (('iters', 3),))
    assert Variant('ppo').describe() == 'PPO beta=1'


def test_a_runs_exact_tables_are_kept_on_disk_and_computed_again_when_an_input_changes(tmp_path):
    run_dir = random_run(tmp_path / 'r', preference='last-digit')
    prompts = torch.tensor([[1, 2, 3, 4], [9, 9, 0, 1]])
    first = Run(run_dir).tables(prompts)
    [stored] = run_dir.glob('tables_*.pt')
    written = stored.stat().st_mtime_ns
    again = Run(run_dir).tables(prompts)  # another Run: from the file, the same numbers
    assert stored.stat().st_mtime_ns == written
    assert torch.equal(again.log_ref, first.log_ref) and torch.equal(again.rewards, first.rewards)
    assert again.rewards.dtype == torch.float64 and again.preference.name == 'last-digit'
    # Another reward model (same settings, other weights): the tables are its own, and rewritten.
    torch.manual_seed(1)
    save_checkpoint(run_dir / 'reward.pt', GPT(reward_model_config()), 'reward', {'preference': 'last-digit'}, {})
    other = Run(run_dir).tables(prompts)
    assert not torch.equal(other.rewards, first.rewards) and torch.equal(other.log_ref, first.log_ref)
    assert torch.equal(Run(run_dir).tables(prompts).rewards, other.rewards)
    # A broken file is not trusted: computed again.
    stored.write_bytes(b'not a checkpoint')
    assert torch.equal(Run(run_dir).tables(prompts).rewards, other.rewards)


def test_evaluate_optimal_reads_the_tables_a_study_kept_and_keeps_its_own(tmp_path, monkeypatch):
    run_dir = random_run(tmp_path / 'r', preference='first-digit')
    policy = run_dir / 'ppo_beta1.pt'
    save_checkpoint(policy, load_model(run_dir / 'sft.pt', 'policy'), 'policy', {'method': 'ppo', 'beta': 1.0}, {})
    def row():  # evaluate.py --optimal's
        return checkpoint_row(policy, run_dir / 'sft.pt', run_dir / 'reward.pt', 2, 0, check_inputs=False)
    first = row()
    [stored] = run_dir.glob('tables_*.pt')
    assert torch.equal(Run(run_dir).tables(sample_prompts(2, torch.Generator().manual_seed(0))).rewards,
                       torch.load(stored, weights_only=True)['rewards'].double())  # one cache, the Run's
    def computed_again(*args):
        raise AssertionError('the stored tables were computed again')
    monkeypatch.setattr(run_module, 'exact_tables', computed_again)
    assert row() == first


def test_the_gold_gap_closed_is_read_at_the_reward_models_margin_by_every_study(tmp_path):
    run_dir = random_run(tmp_path / 'runs' / 'r', gold_margin=2.0, preference='first-digit')
    config = CompareConfig(methods=('ppo',), presets=False, prompts=2)
    tiny = {'ppo': run_module.METHODS['ppo'].config(iters=1, prompts_per_iter=4)}
    [row] = compare(run_dir, tmp_path / 'plots', config, tiny, progress=False)
    path = run_dir / f"{Variant.of(tiny['ppo'], 'ppo').name}.pt"
    again = checkpoint_row(path, run_dir / 'sft.pt', run_dir / 'reward.pt', 2, 0)  # evaluate.py --optimal's
    run = Run(run_dir)
    assert run.gold_margin == 2.0
    assert again['gold_gap_closed'] == pytest.approx(row['gold_gap_closed'], abs=1e-12)
    # The credit study's measurement of the same policy, on the same prompts, at the run's margin.
    tables = run.tables(sample_prompts(2, torch.Generator().manual_seed(0)))
    measure = ExactMeasure(tables, tables.gold(run.gold_margin), 1.0, every=1, last=0)
    credit = measure(1, load_model(path, 'policy'))['exact/gold_gap_closed']
    assert credit == pytest.approx(row['gold_gap_closed'], abs=1e-9)
    # At the class default (margin 20) the gold objective is another one: its gap closed differs.
    run_at_20 = random_run(tmp_path / 'runs' / 's', preference='first-digit')
    (run_at_20 / path.name).write_bytes(path.read_bytes())
    other = checkpoint_row(run_at_20 / path.name, run_at_20 / 'sft.pt', run_at_20 / 'reward.pt', 2, 0,
                           check_inputs=False)
    assert other['gold_gap_closed'] != pytest.approx(row['gold_gap_closed'], abs=1e-6)


def test_evaluate_optimal_measures_a_policy_against_its_methods_own_target(tmp_path, capsys, monkeypatch):
    run_dir = random_run(tmp_path / 'runs' / 'default', preference='first-digit')
    monkeypatch.chdir(tmp_path)
    assert cli.run_command('grpo', ['--iters', '1', '--prompts-per-iter', '2', '--quiet']) is None
    [policy] = run_dir.glob('grpo_beta1*.pt')
    capsys.readouterr()
    cli.run_command('evaluate', [str(policy), '--optimal', '--optimal-prompts', '2', '--prompts', '4', '--json'])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics['optimum/target'] == "GRPO's fixed point"
    assert metrics['optimum/kl_to_target'] >= 0 and metrics['optimum/kl_to_optimum'] >= 0


def test_a_study_on_an_empty_run_folder_trains_what_it_needs_first(tmp_path, monkeypatch, capsys):
    # Tiny stages: what is tested is that the comparison builds its inputs, not what they learn.
    @dataclasses.dataclass
    class TinySFT(SFTConfig):
        iters: int = 2
        batch_size: int = 8

    @dataclasses.dataclass
    class TinyReward(RewardConfig):
        iters: int = 2
        pairs: int = 32
        held_out_pairs: int = 32

    monkeypatch.setattr(run_module, 'SFTConfig', TinySFT)
    monkeypatch.setattr(run_module, 'RewardConfig', TinyReward)
    monkeypatch.chdir(tmp_path)
    cli.run_command('compare', ['--run', 'fresh', '--methods', 'best_of_n', '--prompts', '1', '--quiet'])
    printed = capsys.readouterr().out
    assert 'sft.pt: none yet' in printed and 'reward.pt: none yet' in printed
    assert (tmp_path / 'runs' / 'fresh' / 'methods.md').is_file()


def test_overoptimisation_judges_the_proxies_by_the_runs_preference(tmp_path, monkeypatch):
    random_run(tmp_path / 'runs' / 'default', preference='last-digit')
    monkeypatch.chdir(tmp_path)
    cli.run_command('overopt', ['--pairs', '40', '--betas', '0', '--snapshot-every', '1', '--prompts', '1',
                                '--reward.iters', '2', '--reward.held-out-pairs', '40', '--ppo.iters', '1',
                                '--ppo.prompts-per-iter', '4', '--quiet'])
    key = json.loads((tmp_path / 'runs' / 'default' / 'overoptimisation.json').read_text())['key']
    assert key['gold'] == 'last-digit'
    assert key['settings']['reward']['preference'] == 'last-digit'


def test_a_method_without_a_known_target_for_the_preference_is_compared_all_the_same(tmp_path):
    # IPO's exact target is derived for a gold reward of two levels; digit-sum has 37.
    run_dir = random_run(tmp_path / 'runs' / 'r', preference='digit-sum')
    tiny = {'ipo': run_module.METHODS['ipo'].config(iters=1, pairs=16)}
    [row] = compare(run_dir, tmp_path / 'plots', CompareConfig(methods=('ipo',), prompts=1), tiny, progress=False)
    assert row['target'] == 'none known for this preference' and row['kl_to_target'] is None
    assert '| none known for this preference | n/a |' in (run_dir / 'methods.md').read_text()


def test_a_pool_trains_copies_so_the_models_this_process_reads_are_never_moved_under_it(tmp_path):
    # Pickling for a process pool moves a tensor's storage into shared memory in place, in the pool's
    # own thread: had a job carried the Run's own models, the exact tables computed meanwhile could read
    # half-moved weights (they once did: a leaderboard with a pool got another reference's log-probs).
    run = Run(random_run(tmp_path / 'r', preference='first-digit'))
    pointers = [parameter.data_ptr() for parameter in run.sft_policy.parameters()]
    variant = Variant('ppo', settings=(('iters', 1), ('prompts_per_iter', 2)))
    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        _, futures = run.submit([variant], pool)
        concurrent.futures.wait(futures)
    assert [parameter.data_ptr() for parameter in run.sft_policy.parameters()] == pointers
    assert not any(parameter.is_shared() for model in (run.sft_policy, run.reward_model)
                   for parameter in model.parameters())


@pytest.mark.parametrize('workers', [1, 2])  # here, and in a process pool
def test_train_hands_each_variant_over_as_it_is_saved_or_reused_so_its_log_probs_need_not_wait(tmp_path, workers):
    run = Run(random_run(tmp_path / 'r', preference='first-digit'), progress=False)
    prompts = sample_prompts(2, torch.Generator().manual_seed(0))
    variants = [Variant('ppo', seed=seed, settings=(('iters', 1), ('prompts_per_iter', 2))) for seed in (0, 1)]
    run.train(variants[:1])  # seed 0 trained (no log-probs kept), to be reused below
    handed = []

    def then(variant):  # measured at once: the log-probs its training computed are taken, none others held
        handed.append((variant.name, len(run._log_probs)))
        run.response_log_probs(variant, prompts)
    with executor(ExecutorConfig(workers=workers)) as pool:
        timings = run.train(variants, pool, prompts, then=then)
    assert sorted(handed) == sorted([(variants[0].name, 0), (variants[1].name, 1)])
    assert {name: timing['reused'] for name, timing in timings.items()} == {variants[0].name: True,
                                                                           variants[1].name: False}
    assert not run._log_probs
