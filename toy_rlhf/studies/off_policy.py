"""Off-policy on purpose: how far PPO, RLOO and GRPO land from their fixed points (pi*, or next to
it) as the data goes stale, measured exactly, for each ratio variant and each sampler correction
(ratios.py, issue 23); and, when named, the other methods that sample (online DPO, distillation,
SPPO, Nash-MD), each against its own target.

Three knobs turn off-policyness up, one at a time from each method's on-policy run (at --beta, the
registry's quick schedule of the method or, with --schedule default, its defaults, on every seed):
- epochs over each rollout (1, 4, 8): the trainer's own ratio pi / pi_old leaves 1; what bounds it is
  the ratio variant, for PPO and GRPO (ppo, gspo, gmpo, cispo with TRL's default and recommended
  bounds, sapo), RLOO's own clip of the whole response's ratio. The sampler is the policy, so a
  sampler correction has nothing to do here.
- staleness (0, 2, 4 rounds) and the sampler's temperature (1, 1.3, 1.6): the responses come from mu,
  not pi_old, and the trainer treats them as pi_old's unless a correction (tis, mis, icepop) weighs
  them by pi_old / mu: per token or per response for PPO and GRPO, per response for RLOO and Nash-MD
  (their one action is the response). Three have no correction to turn ('none'), since whoever samples
  leaves their fixed point where it is: online DPO (with Bradley-Terry labels its optimum is pi*),
  distillation (each state's own divergence to the teacher) and SPPO (a regression, with the win
  rates weighed by pi_t / mu always); the study shows how far a run gets.
Two more turn only when named (--knobs): the sampler's top k (0, 4, 2), which drops responses no
weight can bring back, and its logits' precision (fp32, bf16, fp16), an inference engine's rounding.
GRPO trains with the two fixes that put its fixed point next to pi* (the registry's preset; 0.003
nats from it on the default first-digit run's held-out prompts, grpo.fixed_point), so that the ratio
family aims at nearly the same policy. Each method is measured against its own registry target at
the study's beta (PPO, RLOO, online DPO: pi*; GRPO: its exact fixed point; distillation: its
teacher, pi* by default; SPPO: the exact multiplicative-weights iterate of its schedule; Nash-MD:
pi_tau). Each run's distance is the exact KL(pi || target) of whole responses over all 10^4
responses of held-out prompts, averaged over prompts; each cell's table entry is the median over
seeds and its [lowest, highest].

On a Run: an empty folder gets the default SFT policy and reward model of --seed, an existing run is
reused (`toy-rlhf off-policy --run-dir runs/default --workers 2`), and every trained policy is a
checkpoint of the run folder, reused by a rerun. Writes off_policy.md and off_policy.json into the run
folder and off_policy.png into its plots (scripts/off_policy.py).
"""
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import torch

from toy_rlhf import figures
from toy_rlhf.executors import ExecutorConfig, executor
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveInt, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.rollout import Sampler
from toy_rlhf.optimal import optimal_log_probs, response_kl
from toy_rlhf.run import Run, Variant
from toy_rlhf.studies.leaderboard import spread
from toy_rlhf.studies.output import markdown_table, write_study

# The methods whose sampler need not be the policy (rollout.SamplerSettings); all but the first three
# studied when named.
STUDIED_METHODS = ('ppo', 'rloo', 'grpo', 'online_dpo', 'distill', 'sppo', 'nash_md')


@dataclass
class OffPolicyStudyConfig(ExecutorConfig):
    methods: tuple[str, ...] = ('ppo', 'rloo', 'grpo')  # the methods whose knobs are turned (also: online_dpo, distill, sppo, nash_md)
    knobs: tuple[str, ...] = ('epochs', 'staleness', 'temperature')  # which knobs to turn (epochs, staleness, temperature, top_k, precision)
    seeds: tuple[Seed, ...] = (0, 1, 2)  # every cell is trained on each: the table shows the median and range
    beta: NonNegativeFloat = 1.0  # the KL strength of every run
    # The quick schedules learn in seconds, at steps some methods overshoot with (SPPO, Nash-MD: their
    # configs); the defaults are each method's own, at their cost.
    schedule: Literal['quick', 'default'] = 'quick'  # each method's registry quick schedule, or its defaults
    iters_scale: PositiveInt = 1  # each method's schedule's rounds times this (longer: nearer convergence)
    prompts: ExactPrompts = 50  # held-out prompts of the exact distance (each: all 10^4 responses)
    seed: Seed = 0  # the SFT policy and reward model of an empty run folder, and the held-out prompts


EPOCHS = (1, 4, 8)
STALENESS = (0, 2, 4)
TEMPERATURES = (1.0, 1.3, 1.6)
# The sampler keeps the k most likely tokens (0: all). A later digit has at most four allowed values:
# k = 4 keeps them, k = 2 drops responses the policy writes, which no weight can bring back (a weight
# corrects only what the sampler can draw).
TOP_K = (0, 4, 2)
# The sampler's logits rounded to an inference engine's dtype before it samples (rollout.PRECISIONS).
PRECISIONS = ('fp32', 'bf16', 'fp16')
# (label, config overrides): the trainer's ratio, for the epochs knob (a per-token loss: PPO, GRPO).
RATIO_VARIANTS = (('ppo', {}), ('gspo', {'ratio': 'gspo'}), ('gmpo', {'ratio': 'gmpo'}),
                  ('cispo (trl-5)', {'ratio': 'cispo', 'cispo_bounds': 'trl-5'}),
                  ('cispo (trl default)', {'ratio': 'cispo', 'cispo_bounds': 'trl'}),
                  ('sapo', {'ratio': 'sapo'}))
# RLOO's epochs: it has one ratio, the whole response's, clipped.
SEQUENCE_CLIP = (('sequence clip', {}),)
# Online DPO's epochs: no ratio at all, its DPO loss.
OWN_LOSS = (('its own loss', {}),)
# (label, overrides): the sampler's correction, for the staleness and temperature knobs. RLOO's config
# has no correction_level (its weight is the whole response's): it takes those without one.
CORRECTIONS = (('none', {}), ('tis', {'sampler_correction': 'tis'}), ('mis', {'sampler_correction': 'mis'}),
               ('icepop', {'sampler_correction': 'icepop', 'correction_band': 'openrlhf'}),
               ('tis (sequence)', {'sampler_correction': 'tis', 'correction_level': 'sequence'}))
# (knob, its values, its variants, the config field it sets); each knob's first value is on-policy.
KNOBS = (('epochs', EPOCHS, RATIO_VARIANTS, 'epochs'), ('staleness', STALENESS, CORRECTIONS, 'staleness'),
         ('temperature', TEMPERATURES, CORRECTIONS, 'sampler_temperature'), ('top_k', TOP_K, CORRECTIONS, 'sampler_top_k'),
         ('precision', PRECISIONS, CORRECTIONS, 'sampler_precision'))
# The fixes that put GRPO's fixed point next to pi* (the registry's preset): no division by the group's std
# (Dr. GRPO) and the k3 term times the ratio to the rollout policy (DeepSeek-V3.2's bias correction).
FIXED_POINT_SETTINGS = {'grpo': (('scale_rewards', 'none'), ('kl', 'bias-corrected-k3'))}


# ---------------------------------------------------------------------------------------------
# The cells: (method, knob, value, variant label, seed), each a Variant of the run.

def method_schedules(config):
    """{method: ((field, value), ...)} over its defaults: its quick schedule (Method.quick) as the
    registry gives it, or nothing (its defaults), as config.schedule says."""
    return {name: METHODS[name].quick if config.schedule == 'quick' else () for name in config.methods}


def base_configs(config, schedule):
    """{method: its on-policy config}: the schedule's settings over the defaults, its rounds times
    iters_scale, config.beta, and the settings that put the method's fixed point at (or next to) pi*."""
    bases = {}
    for name in config.methods:
        base = replace(METHODS[name].config(), **dict(schedule[name]), **dict(FIXED_POINT_SETTINGS.get(name, ())))
        # The step annealed to 0 for every method that can (PPO's quick schedule keeps a constant one
        # for the tests): at a constant step the last rounds jump about where the knob moved the fixed point.
        annealed = {'anneal_lr': True} if hasattr(base, 'anneal_lr') else {}
        bases[name] = replace(base, beta=config.beta, iters=base.iters * config.iters_scale, **annealed)
    return bases


def knob_variants(method, kinds):
    """The variants of a knob that `method` takes: every one whose settings its config has; in place of
    RATIO_VARIANTS, RLOO its own sequence clip and online DPO its loss, which has no ratio."""
    names = {field.name for field in fields(METHODS[method].config)}
    if kinds is RATIO_VARIANTS and 'ratio' not in names:
        return SEQUENCE_CLIP if 'clip' in names else OWN_LOSS
    return tuple((label, overrides) for label, overrides in kinds if overrides.keys() <= names)


def on_policy_twin(method_config):
    """The same run without a sampler correction where the sampler is the policy (its weights are all
    exactly 1 there: the same numbers), so that such a run is trained once."""
    if not Sampler(method_config).on_policy:
        return method_config
    defaults = type(method_config)()
    corrections = [name for name in ('sampler_correction', 'correction_level', 'correction_band')
                   if hasattr(method_config, name)]
    return replace(method_config, **{name: getattr(defaults, name) for name in corrections})


def cells(config, schedule):
    """(method, knob, value, label, seed, Variant) of every cell: each method's knobs' values crossed
    with its variants of the knob, on every seed; the Variant is the on-policy twin's."""
    bases = base_configs(config, schedule)
    return [(method, knob, value, label, seed,
             Variant.of(on_policy_twin(replace(bases[method], seed=seed, **{field: value}, **overrides)), method))
            for method in config.methods for knob, values, kinds, field in KNOBS if knob in config.knobs
            for value in values for label, overrides in knob_variants(method, kinds) for seed in config.seeds]


def off_policy(run_dir, plots_dir, config, progress=True, schedule=None):
    """Train every cell's variant on the run (an empty folder gets its SFT policy and reward model
    first; checkpoints made with the same settings are reused), measure each one's exact distance from
    its method's target; write the table and record into run_dir and the figure into plots_dir;
    returns the record. schedule: {method: ((field, value), ...)} over its defaults (default:
    method_schedules)."""
    schedule = method_schedules(config) if schedule is None else schedule
    run = Run(run_dir, progress=progress).build(config.seed)
    tables = run.tables(sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed + 1_000)))
    bases = base_configs(config, schedule)
    targets = {method: target_log_probs(method, tables, base) for method, base in bases.items()}
    chosen = cells(config, schedule)
    on_policy = {method: [Variant.of(replace(base, seed=seed), method) for seed in config.seeds]
                 for method, base in bases.items()}
    variants = list(dict.fromkeys([*(cell[-1] for cell in chosen), *(v for runs in on_policy.values() for v in runs)]))
    measured = {}

    def measure(variant):  # as each arrives: its response log-probs (8 MB at 100 prompts) are let go at once
        measured[variant.name] = {'distance': response_kl(run.response_log_probs(variant, tables.prompts),
                                                          targets[variant.method]).mean().item(),
                                  'seconds': run.checkpoint(variant)['metrics']['seconds']}
    with executor(config) as pool:
        run.train(variants, pool, tables.prompts, then=measure)
    rows = []
    for method, knob, value, label, seed, variant in chosen:
        rows.append({'method': method, 'knob': knob, 'value': value, 'variant': label, 'seed': seed,
                     **measured[variant.name]})
        print(f'{method} {knob}={shown(value)} {label} seed {seed}: KL(pi || target) = {rows[-1]["distance"]:.4f}',
              flush=True)
    record = {'preference': run.preference.name, 'settings': asdict(config),
              'on_policy_configs': {name: asdict(base) for name, base in bases.items()},
              'targets': {method: METHODS[method].target_name(base) for method, base in bases.items()},
              'reference_distance': {method: response_kl(tables.log_ref, target).mean().item()
                                     for method, target in targets.items()},
              'on_policy': {method: [measured[variant.name]['distance'] for variant in runs]
                            for method, runs in on_policy.items()},
              'rows': rows}
    figure = plot_off_policy(record, Path(plots_dir) / 'off_policy.png')
    report = write_study(run.folder, 'off_policy', off_policy_report(record), record, figure)
    print(f'Table in {report}, figure {figure}')
    return record


def target_log_probs(method, tables, config):
    """The exact distribution (P, 10^4) `method` run with `config` converges to on the tables' prompts:
    its registry target, pi* of the reward model at config.beta where it names none."""
    target = METHODS[method].target
    return target(tables, config) if target else optimal_log_probs(tables.log_ref, tables.rewards, config.beta)


# ---------------------------------------------------------------------------------------------
# The table and the figure.

def panels(record):
    """(method, knob, values, labels, {(value, label): spread over seeds}) of each method and knob
    the record has rows of, in the order of its settings and KNOBS."""
    found = []
    for method in record['settings']['methods']:
        for knob, values, kinds, _ in KNOBS:
            rows = [row for row in record['rows'] if row['method'] == method and row['knob'] == knob]
            if rows:
                labels = [label for label, _ in knob_variants(method, kinds)]
                cell = {(value, label): spread([row['distance'] for row in rows
                                                if row['value'] == value and row['variant'] == label])
                        for value in values for label in labels}
                found.append((method, knob, values, labels, cell))
    return found


def shown(value):
    """A knob's value as the table and the figure write it: a number in its shortest form, or a dtype."""
    return value if isinstance(value, str) else f'{value:g}'


def entry(distances):
    """A table cell: the median over seeds and, with more than one seed, [lowest, highest]."""
    text = f"{distances['median']:.4f}"
    return text if distances['low'] == distances['high'] else f"{text} [{distances['low']:.4f}, {distances['high']:.4f}]"


def off_policy_report(record):
    """The study's Markdown: per method and knob, the distance of each variant at each value."""
    settings = record['settings']
    on_policy = '; '.join(f"{METHODS[method].label} {entry(spread(distances))}"
                          for method, distances in record['on_policy'].items())
    targets = '; '.join(f"{METHODS[method].label} {target} (the SFT policy {record['reference_distance'][method]:.3f})"
                        for method, target in record['targets'].items())
    parts = [f"# Off-policy on purpose against each method's target (beta {settings['beta']:g}, "
             f"{record['preference']})\n\n"
             f"Exact KL(pi || target) of whole responses, mean over {settings['prompts']} held-out prompts; each "
             f"cell the median over seeds {', '.join(map(str, settings['seeds']))} [lowest, highest]. Targets: "
             f"{targets}. On-policy: {on_policy} (how much a seed alone moves it).\n"]
    for method, knob, values, labels, cell in panels(record):
        rows = [[shown(value), *[entry(cell[value, label]) for label in labels]] for value in values]
        parts.append(f'## {METHODS[method].label}, {knob}\n\n' + markdown_table([knob, *labels], rows) + '\n')
    return '\n'.join(parts)


def plot_off_policy(record, path):
    """A row of panels per method, one panel per knob: the distance from its target against the knob, the
    median over seeds of each variant, its range shaded; in grey, the range of the method's on-policy
    run over the seeds (how far apart two seeds land)."""
    found = panels(record)
    methods = list(dict.fromkeys(method for method, *_ in found))
    knobs = list(dict.fromkeys(knob for _, knob, *_ in found))
    fig, axes = plt.subplots(len(methods), len(knobs), figsize=(5 * len(knobs), 4.2 * len(methods)),
                             layout='constrained', squeeze=False)
    for method, knob, values, labels, cell in found:
        ax = axes[methods.index(method)][knobs.index(knob)]
        positions = range(len(values))  # in the knob's order, on-policy first (top_k's 0 keeps every token, fp32 rounds nothing)
        for label in labels:
            median, low, high = ([cell[value, label][key] for value in values] for key in ('median', 'low', 'high'))
            line, = ax.plot(positions, median, marker='o', label=label)
            ax.fill_between(positions, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        seeds = record['on_policy'][method]
        ax.axhspan(min(seeds), max(seeds), color='grey', alpha=0.2, label='on-policy, range over seeds')
        ax.set(xlabel=knob, ylabel='KL(pi || target) (nats)', title=f'{METHODS[method].label}, {knob}')
        ax.set_xticks(positions, [shown(value) for value in values])
        ax.legend(fontsize=8)
    return figures.save(fig, path)
