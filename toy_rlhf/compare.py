"""Every registered method, trained from the same SFT policy and reward model, measured exactly
against the optimum it aims at: where each one lands, and how fast it gets there.

For each beta: every method that trains is run (in parallel processes with --workers), a method
without a network (best-of-n) gives its exact distribution directly, and each resulting policy is
evaluated over all 10^4 responses of the same prompts: J against J*, the KL from pi* and from the
method's own exact target (where that differs from pi*), gold metrics, and what it consumed.
"""
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from toy_rlhf import plots
from toy_rlhf.checkpoint import CheckpointError, load_checkpoint, load_model
from toy_rlhf.files import write_json, write_text
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveInt, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS, method_of_stem
from toy_rlhf.metrics import samples_to_preference
from toy_rlhf.optimal import (EXACT_PROMPTS, compare_to_optimum, exact_tables, expected_reward, objective,
                              optimal_frontier, optimal_log_probs, optimal_value, response_kl, response_log_probs_exact)
from toy_rlhf.pipeline import check_trained_from, checkpoint_preference
from toy_rlhf.reward import RewardConfig
from toy_rlhf.run import Run, Variant

# The optimum's frontier is drawn through these betas (log-spaced, plus the limit beta -> 0).
FRONTIER_BETAS = [0.0] + [10 ** (k / 8) for k in range(-20, 13)]


@dataclass
class CompareConfig:
    betas: tuple[NonNegativeFloat, ...] = (1.0,)  # the KL strengths every method is run at
    methods: tuple[str, ...] = ()  # the methods to compare, by registry name (default: all registered)
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of the exact evaluation (each: all 10^4 responses)
    # Each training run is independent: with N workers, N run at once in processes of one thread each.
    workers: PositiveInt = 1  # training processes at once (one thread each; --threads 1 gives the same numbers serially)
    seed: Seed = 0  # random seed of every run and of the evaluation prompts
    fresh: bool = False  # retrain even where a checkpoint with the same settings exists
    preference: str = ''  # the run's (its reward model's); name it only if it is module:function, imported only when named


def exact_row(label, method, config, log_pi, tables, gold_margin):
    """A policy's exact numbers against the optimum at config.beta, from its log-probs of every
    response (P, 10^4) and the shared tables (toy_rlhf.optimal.ExactTables): compare_to_optimum's
    keys, the KL from pi* and from the method's own target, and the gap closed under the gold reward
    (at the run's labeler margin, gold_margin)."""
    beta = config.beta
    optimum = optimal_log_probs(tables.log_ref, tables.rewards, beta)
    target = method.target(tables, config) if method.target is not None else optimum
    row = {'label': label, 'method': method.name,
           **compare_to_optimum(log_pi, tables.log_ref, tables.rewards, tables.prompts, beta, tables.preference),
           'kl_to_optimum': finite_or_none(response_kl(log_pi, optimum).mean().item()),
           'target': method.target_label, 'kl_to_target': finite_or_none(response_kl(log_pi, target).mean().item()),
           'gold_gap_closed': gap_closed(log_pi, tables.log_ref, tables.gold(gold_margin), beta)}
    if method.target is not None:  # where the method's own target lies, for the figure
        row['target_reward'] = expected_reward(target, tables.rewards).mean().item()
        row['target_kl_total'] = response_kl(target, tables.log_ref).mean().item()
    return row


def variant_row(run, variant, tables):
    """exact_row of a variant of the run (trained, or a method's exact distribution), with what a
    trained one consumed and how long it trained."""
    method, config = METHODS[variant.method], run.config(variant)
    if method.train is None:
        return exact_row(variant.describe(), method, config, method.exact_policy(tables, config), tables,
                         run.gold_margin)
    log_pi = response_log_probs_exact(run.policy(variant), tables.prompts)
    row = exact_row(variant.describe(), method, config, log_pi, tables, run.gold_margin)
    checkpoint = run.checkpoint(variant)
    return {**row, **consumed(method, checkpoint['history']), 'seconds': checkpoint['metrics']['seconds']}


def finite_or_none(kl):
    """A KL as JSON can hold it: None where it is infinite (at beta = 0, pi* puts no mass where a
    policy still does); tables show that as inf."""
    return kl if math.isfinite(kl) else None


def gap_closed(log_pi, log_ref, rewards, beta):
    """(J - J_ref) / (J* - J_ref) of a policy under `rewards`: 1 at the optimum, 0 for the reference;
    None where there is no gap to close (a reward no policy can improve on the reference)."""
    J = objective(log_pi, log_ref, rewards, beta).mean().item()
    J_ref = objective(log_ref, log_ref, rewards, beta).mean().item()
    J_star = optimal_value(log_ref, rewards, beta).mean().item()
    return (J - J_ref) / (J_star - J_ref) if J_star > J_ref else None


def checkpoint_row(policy_path, reference_path, reward_path, n_prompts, seed, check_inputs=True, named=None):
    """exact_row of the policy at policy_path, by the method that made it (its settings and beta read
    from the checkpoint), over all 10^4 responses of n_prompts prompts drawn with seed: against pi* and
    the method's own target. Refuses a reference or reward model it was not trained from, unless
    check_inputs is False."""
    settings = load_checkpoint(policy_path, 'policy')['train_config']
    method = METHODS.get(settings.get('method')) or method_of_stem(Path(policy_path).stem)
    if method is None or 'beta' not in settings:
        raise CheckpointError(f'{policy_path}: not made by a training method (no method or beta stored); '
                              'run `toy-rlhf METHOD` to make one')
    if check_inputs:
        check_trained_from(policy_path, {'sft.pt': reference_path, 'reward.pt': reward_path})
    reward_settings = load_checkpoint(reward_path, 'reward')['train_config']
    preference = checkpoint_preference(reward_path, reward_settings, named, not check_inputs)
    config = method.config(**{field.name: settings[field.name] for field in fields(method.config)
                              if field.name in settings})
    prompts = sample_prompts(n_prompts, torch.Generator().manual_seed(seed))
    tables = exact_tables(load_model(reference_path, 'policy'), load_model(reward_path, 'reward'), prompts, preference)
    log_pi = response_log_probs_exact(load_model(policy_path, 'policy'), prompts)
    return exact_row(Path(policy_path).stem, method, config, log_pi, tables,
                     reward_settings.get('gold_margin', RewardConfig.gold_margin))


def variants(config, method_configs=None):
    """The comparison's variants: every method at every beta, on the comparison's seed, with the
    settings in method_configs ({name: config}) where given."""
    def at(name, beta):
        base = (method_configs or {}).get(name) or METHODS[name].config()
        names = {field.name for field in fields(base)}
        return Variant.of(replace(base, beta=beta, **({'seed': config.seed} if 'seed' in names else {})), name)
    return [at(name, beta) for beta in config.betas for name in (config.methods or METHODS)]


def compare(run_dir, plots_dir, config, method_configs=None, progress=True):
    """Train and evaluate every method at every beta; write run_dir/methods.md and methods.json and
    draw plots_dir/methods.png. method_configs: {name: config} settings of the methods (their beta and
    seed are set here). A run folder without an SFT policy or reward model gets them first. Returns
    the rows of the table."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    run = Run(run_dir, config.preference, config.fresh, progress).build(config.seed)
    chosen = variants(config, method_configs)

    # 1. train every method that trains (reusing current checkpoints)
    run.train(chosen, config.workers)

    # 2. evaluate every policy exactly on the same prompts
    start = time.perf_counter()
    tables = run.tables(sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed)))
    rows = [variant_row(run, variant, tables) for variant in chosen]
    histories = {variant.describe(): (variant.method, run.checkpoint(variant)['history'])
                 for variant in chosen if METHODS[variant.method].train is not None and METHODS[variant.method].online}
    frontier = optimal_frontier(tables.log_ref, tables.rewards, tables.prompts, FRONTIER_BETAS, tables.preference)
    print(f'Exact evaluation of {len(rows)} policies on {config.prompts} prompts: {time.perf_counter() - start:.1f} s')

    # 3. the figure and the table
    figure = plots.plot_methods(frontier, rows, histories, plots_dir / 'methods.png')
    write_json(run_dir / 'methods.json', {'settings': asdict(config), 'policies': rows})
    write_text(run_dir / 'methods.md', methods_report(rows, config, figure, run_dir))
    print(methods_table(rows))
    print(f'Table in {run_dir / "methods.md"}, figure {figure}')
    return rows


def consumed(method, history):
    """What a run consumed: rollout samples (online) or labelled pairs (offline), and the samples
    until its rollout's exact preference rate first reached the target (online only)."""
    last = history[-1]
    if method.online:
        return {'samples': last['samples'], 'samples_to_target': samples_to_preference(history)}
    return {'pairs': last['pairs']}


def methods_table(rows):
    """The Markdown table of the comparison: one row per policy."""
    lines = ['| method | J | J* | gap closed | KL first | KL later | preference | fidelity | gold | '
             'KL from pi* | own target | KL from own target | consumed | samples to 99% | seconds |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|']
    for row in rows:
        used = f"{row['samples']:,} samples" if 'samples' in row else \
            f"{row['pairs']:,} pairs" if 'pairs' in row else 'none (exact)'
        # Samples to 99%: an online method that never reached it says so; the others consume no samples.
        to_target = row.get('samples_to_target')
        to_target = f'{to_target:,}' if to_target is not None else 'never' if 'samples' in row else ''
        seconds = row.get('seconds')
        lines.append(
            f"| {row['label']} | {row['J']:.3f} | {row['J_star']:.3f} | {_number(row['gap_closed'], '.2%')} | "
            f"{row['kl_first']:.3f} | {row['kl_later']:.3f} | {row['preference_rate']:.2%} | "
            f"{row['fidelity']:.2%} | {row['gold_rate']:.2%} | {_kl(row['kl_to_optimum'])} | {row['target']} | "
            f"{_kl(row['kl_to_target'])} | {used} | {to_target} | "
            f"{'' if seconds is None else f'{seconds:.1f}'} |")
    return '\n'.join(lines)


def _kl(value):
    return 'inf' if value is None else f'{value:.3f}'


def _number(value, style):
    return 'n/a' if value is None else format(value, style)


def methods_report(rows, config, figure, run_dir):
    relative_figure = Path(os.path.relpath(figure, run_dir)).as_posix()
    return f"""# Which method, and where it lands

Every method from the same SFT policy and reward model, seed {config.seed}, evaluated exactly over all
10^4 responses of {config.prompts} prompts. J = E[r] - beta * KL(pi || pi_ref) under the reward model;
J* its maximum, reached by pi* = pi_ref exp(r / beta) / Z; gap closed = (J - J_ref) / (J* - J_ref).
KL from pi*: KL(policy || pi*), 0 only at the optimum. Own target: the exact distribution the method
converges to where that is not pi* of the reward model, and the policy's KL from it. Samples to 99%:
rollout samples until the rollout's exact preference rate first reached 99%.

{methods_table(rows)}

![methods]({relative_figure})
"""
