"""Off-policy on purpose: how far PPO lands from its fixed point pi* as the data goes stale, measured
exactly, for each ratio variant and each sampler correction (ratios.py, issue 23 section 1).

Three knobs turn off-policyness up, one at a time from on-policy PPO (beta 1, the quick schedule):
- epochs over each rollout (1, 4, 8): the trainer's own ratio pi / pi_old leaves 1; what bounds it is
  the ratio variant (ppo, gspo, gmpo, cispo with TRL's default and recommended bounds, sapo). The
  sampler is the policy, so a sampler correction has nothing to do here.
- staleness (0, 2, 4 rounds) and the sampler's temperature (1, 1.3, 1.6): the responses come from mu,
  not pi_old, and the trainer treats them as pi_old's unless a correction (tis, mis, icepop) weighs
  them by pi_old / mu.
Each run's distance from the fixed point is the exact KL(pi || pi*) of whole responses over all 10^4
responses of held-out prompts, averaged over prompts. Writes off_policy.md and off_policy.json into
the run folder and off_policy.png into its plots: `toy-rlhf off-policy` (scripts/off_policy.py), into
runs/off_policy by default. It trains its own short SFT policy and reward model (the test suite's
schedules), so every run of it starts from the same inputs at a seed.
"""
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf import figures
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveInt, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods.ppo import PPOConfig, train_ppo
from toy_rlhf.methods.rollout import Sampler
from toy_rlhf.optimal import exact_tables, optimal_log_probs, response_kl
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import RewardConfig, train_reward
from toy_rlhf.sft import SFTConfig, train_sft
from toy_rlhf.studies.output import markdown_table, write_study


@dataclass
class OffPolicyStudyConfig:
    beta: NonNegativeFloat = 1.0  # the KL strength of every run
    iters: PositiveInt = 25  # rounds of each PPO run (the registry's quick schedule)
    prompts_per_iter: PositiveInt = 64  # prompts per rollout (the quick schedule's)
    prompts: ExactPrompts = 50  # held-out prompts of the exact distance (each: all 10^4 responses)
    seed: Seed = 0  # random seed of the models, every run and the held-out prompts
    knobs: tuple[str, ...] = ('epochs', 'staleness', 'temperature')  # which knobs to turn (KNOBS)
    noise_seeds: tuple[Seed, ...] = (1, 2)  # on-policy PPO again at these seeds: how much a seed alone moves
    # The SFT policy and reward model: the test suite's short schedules (tests/conftest.py).
    sft_iters: PositiveInt = 250  # SFT steps
    sft_batch_size: PositiveInt = 128  # SFT batch size


EPOCHS = (1, 4, 8)
STALENESS = (0, 2, 4)
TEMPERATURES = (1.0, 1.3, 1.6)
# (label, PPOConfig overrides): the trainer's ratio, for the epochs knob.
RATIO_VARIANTS = (('ppo', {}), ('gspo', {'ratio': 'gspo'}), ('gmpo', {'ratio': 'gmpo'}),
                  ('cispo (trl-5)', {'ratio': 'cispo', 'cispo_bounds': 'trl-5'}),
                  ('cispo (trl default)', {'ratio': 'cispo', 'cispo_bounds': 'trl'}),
                  ('sapo', {'ratio': 'sapo'}))
# (label, overrides): the sampler's correction, for the staleness and temperature knobs.
CORRECTIONS = (('none', {}), ('tis', {'sampler_correction': 'tis'}), ('mis', {'sampler_correction': 'mis'}),
               ('icepop', {'sampler_correction': 'icepop', 'correction_band': 'openrlhf'}),
               ('tis (sequence)', {'sampler_correction': 'tis', 'correction_level': 'sequence'}))
KNOBS = (('epochs', EPOCHS, RATIO_VARIANTS, 'epochs'), ('staleness', STALENESS, CORRECTIONS, 'staleness'),
         ('temperature', TEMPERATURES, CORRECTIONS, 'sampler_temperature'))


def variants(config):
    """(knob, value, label, PPOConfig) of every run: each knob's values crossed with its variants."""
    base = PPOConfig(beta=config.beta, iters=config.iters, prompts_per_iter=config.prompts_per_iter, seed=config.seed)
    return [(knob, value, label, replace(base, **{field: value}, **overrides))
            for knob, values, kinds, field in KNOBS if knob in config.knobs
            for value in values for label, overrides in kinds]


def on_policy_twin(ppo_config):
    """The same run without a sampler correction where the sampler is the policy (its weights are
    all exactly 1 there: the same numbers), so that such a run is trained once."""
    if not Sampler(ppo_config).on_policy:
        return ppo_config
    return replace(ppo_config, sampler_correction='none', correction_level='token', correction_band='verl')


def distance_from_optimum(policy, tables, optimum):
    """KL(pi || pi*) of whole responses, averaged over the tables' prompts (nats)."""
    return response_kl(all_response_log_probs(policy.eval(), tables.prompts), optimum).mean().item()


def off_policy(run_dir, plots_dir, config, progress=True):
    """Train every variant from one SFT policy and reward model, measure each one's exact distance
    from pi*; write the table and record into run_dir and the figure into plots_dir; returns the record."""
    preference = PREFERENCES['first-digit']
    sft_policy, _ = train_sft(SFTConfig(iters=config.sft_iters, batch_size=config.sft_batch_size, targets='sampled',
                                        seed=config.seed), progress=progress)
    reward_model, _ = train_reward(sft_policy, RewardConfig(seed=config.seed), progress=progress)
    tables = exact_tables(sft_policy, reward_model, sample_prompts(config.prompts, torch.Generator().manual_seed(
        config.seed + 1_000)), preference)
    optimum = optimal_log_probs(tables.log_ref, tables.rewards, config.beta)
    rows, done = [], {}
    for knob, value, label, ppo_config in variants(config):
        key = repr(on_policy_twin(ppo_config))  # a correction's weights are all 1 where the sampler is the policy
        if key not in done:
            start = time.perf_counter()
            policy, _ = train_ppo(sft_policy, reward_model, ppo_config, preference, progress=progress)
            done[key] = {'distance': distance_from_optimum(policy, tables, optimum),
                         'seconds': time.perf_counter() - start}
        rows.append({'knob': knob, 'value': value, 'variant': label, **done[key]})
        print(f'{knob}={value:g} {label}: KL(pi || pi*) = {done[key]["distance"]:.4f}', flush=True)
    on_policy = PPOConfig(beta=config.beta, iters=config.iters, prompts_per_iter=config.prompts_per_iter)
    seeds = [distance_from_optimum(train_ppo(sft_policy, reward_model, replace(on_policy, seed=seed), preference,
                                             progress=progress)[0], tables, optimum)
             for seed in config.noise_seeds]
    record = {'settings': asdict(config), 'reference_distance': response_kl(tables.log_ref, optimum).mean().item(),
              'on_policy_other_seeds': seeds, 'rows': rows}
    figure = plot_off_policy(record, Path(plots_dir) / 'off_policy.png')
    report = write_study(run_dir, 'off_policy', off_policy_report(record), record, figure)
    print(f'Table in {report}, figure {figure}')
    return record


# ---------------------------------------------------------------------------------------------
# The table and the figure.

def measured_knobs(record):
    """The KNOBS entries the record has rows of."""
    return [entry for entry in KNOBS if any(row['knob'] == entry[0] for row in record['rows'])]


def off_policy_report(record):
    """The study's Markdown: per knob, the distance of each variant at each value."""
    parts = [f"# Off-policy PPO against pi* (beta {record['settings']['beta']:g}, first digit)\n\n"
             f"Exact KL(pi || pi*) of whole responses, mean over {record['settings']['prompts']} held-out "
             f"prompts; the SFT policy's is {record['reference_distance']:.3f}. On-policy PPO at other seeds: "
             f"{', '.join(f'{d:.4f}' for d in record['on_policy_other_seeds'])} (how much a seed alone moves it).\n"]
    for knob, values, kinds, _ in measured_knobs(record):
        cell = {(row['value'], row['variant']): row['distance'] for row in record['rows'] if row['knob'] == knob}
        header = [knob, *[label for label, _ in kinds]]
        rows = [[f'{value:g}', *[f'{cell[value, label]:.4f}' for label, _ in kinds]] for value in values]
        parts.append(markdown_table(header, rows) + '\n')
    return '\n'.join(parts)


def plot_off_policy(record, path):
    """One panel per knob: the distance from pi* against the knob, one line per variant; shaded, the
    range of on-policy PPO over the seeds (how far apart two seeds land)."""
    knobs = measured_knobs(record)
    first_values = {knob: values[0] for knob, values, *_ in KNOBS}  # each knob's on-policy value
    on_policy = [row['distance'] for row in record['rows']
                 if row['variant'] in ('ppo', 'none') and row['value'] == first_values[row['knob']]][:1]
    seeds = on_policy + record['on_policy_other_seeds']
    fig, axes = plt.subplots(1, len(knobs), figsize=(5 * len(knobs), 4.2), layout='constrained', squeeze=False)
    for ax, (knob, values, kinds, _) in zip(axes[0], knobs):
        for label, _ in kinds:
            points = [row['distance'] for value in values for row in record['rows']
                      if row['knob'] == knob and row['value'] == value and row['variant'] == label]
            ax.plot(values, points, marker='o', label=label)
        ax.axhspan(min(seeds), max(seeds), color='grey', alpha=0.2, label=f'on-policy PPO, {len(seeds)} seeds')
        ax.set(xlabel=knob, ylabel='KL(pi || pi*) (nats)', title=f'PPO, {knob}', xticks=values)
        ax.legend(fontsize=8)
    return figures.save(fig, path)
