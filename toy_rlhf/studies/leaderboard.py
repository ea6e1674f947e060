"""Every method on every preference over several seeds, measured exactly: the leaderboard
(`toy-rlhf leaderboard`).

For each seed an SFT policy (shared by the preferences), for each preference and seed a reward model,
and from them each method at each beta, trained as a Variant through Run.train (its checkpoint reused
when it was made with the same settings from the same inputs, so a killed run resumes) and measured
exactly over all 10^4 responses of the same prompts (row_job, in a worker where there are workers:
the main process only trains the SFT policies and writes what comes back). Each cell's measured row
is kept in the cell's folder under the fingerprints it was made from, so a call with nothing changed
measures nothing. Writes leaderboard.md, leaderboard.json, leaderboard.png and decomposition.png (the gap split
into the ceiling of the exact optimiser's paths, each method's optimiser gap and the reward-model gap:
toy_rlhf/studies/decomposition.py) into the leaderboard's folder:

    FOLDER/seed0/sft.pt                   the seed's SFT policy
    FOLDER/seed0/first-digit/             a run folder: sft.pt (a copy), reward.pt, each method's checkpoint,
                                          rows.json (the measured rows, keyed by what they were made from)

Methods are ranked in each preference by their median gap closed under the reward model (the
objective the reward-model methods maximise; DPO and IPO aim at the gold one, shown beside it).
Every method trains at its own defaults, on every preference: a preference's recipe for a method
(Preference.recipes, which `toy-rlhf all` and `toy-rlhf METHOD` use) is left out, so that no method
gets a schedule the others are not given.
"""
import concurrent.futures
import functools
import itertools
import json
import re
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from toy_rlhf import executors
from toy_rlhf.checkpoint import load_model
from toy_rlhf.files import atomic_write, fingerprint, write_json
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import EXACT_PROMPTS, exact_tables
from toy_rlhf.pipeline import ensure_stage, reused_stage, save_reward_stage, sft_stage, train_reward_stage
from toy_rlhf.preferences import PREFERENCES, resolve_preference
from toy_rlhf.reward import RewardConfig
from toy_rlhf.run import Run
from toy_rlhf.sft import SFTConfig
from toy_rlhf.studies.against_optimum import row_job, variant_row
from toy_rlhf.studies.decomposition import cell_targets, plot_decomposition, split_gap
from toy_rlhf.studies.leaderboard_report import gap_table, leaderboard_report, plot_leaderboard
from toy_rlhf.studies.methods import method_variant
from toy_rlhf.studies.output import write_study


@dataclass
class LeaderboardConfig(executors.ExecutorConfig):
    preferences: tuple[str, ...] = ()  # built-in names or module:function (default: every built-in)
    methods: tuple[str, ...] = ()  # registry names (default: every method that trains or has an exact policy, but the yardsticks)
    seeds: tuple[Seed, ...] = (0, 1, 2)  # training seeds: an SFT policy each, a reward model per preference and seed
    betas: tuple[NonNegativeFloat, ...] = (1.0,)  # the KL strengths every method is run at
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of the exact evaluation (each: all 10^4 responses)
    seed: Seed = 0  # seed of the evaluation prompts: every cell is measured on the same ones
    quick: bool = False  # each method's quick schedule (Method.quick) and short SFT and reward schedules
    fresh: bool = False  # retrain and remeasure even where the same settings were done before


# The smoke test's SFT and reward schedules (as `toy-rlhf all --quick`): seconds, not minutes.
QUICK = {'sft': (('iters', 60), ('warmup_iters', 10)),
         'reward': (('iters', 60), ('pairs', 1000), ('held_out_pairs', 500))}
METRICS = ('gap_closed', 'gold_gap_closed', 'kl_to_target', 'consumed', 'seconds')


def chosen_methods(config):
    return config.methods or tuple(name for name, method in METHODS.items()
                                   if (method.train or method.exact_policy) and not method.reference)


def schedules(config):
    """{'sft': settings, 'reward': settings, METHOD: settings}: ((field, value), ...) over the defaults."""
    if not config.quick:
        return {}
    return {**QUICK, **{name: METHODS[name].quick for name in chosen_methods(config)}}


def cell_variants(config, seed, schedule):
    """Every chosen method at every beta on `seed`, with its schedule's settings."""
    configs = {name: replace(METHODS[name].config(), **dict(schedule.get(name, ()))) for name in chosen_methods(config)}
    return [method_variant(name, beta, seed, configs) for beta in config.betas for name in chosen_methods(config)]


def folder_name(preference):
    """A preference's folder: its name, with what a path cannot hold (module:function's colon) as _."""
    return re.sub(r'[^A-Za-z0-9._-]', '_', preference)


def cell_reward(run_dir, preference, seed, config, schedule, pool, prompts, progress):
    """Start a (preference, seed) cell: the seed's SFT policy copied into its folder, and its reward
    model reused where one was made with the same settings, else trained with the exact tables of
    prompts (reward_job) here, or in a worker where there is a pool. Returns (folder, the reward
    model's settings, a future of reward_job's result or None)."""
    folder, shared = Path(run_dir) / f'seed{seed}' / folder_name(preference), Path(run_dir) / f'seed{seed}' / 'sft.pt'
    # A copy rather than a link, so each cell is a whole run folder (toy-rlhf compare --run-dir works on it).
    if not (folder / 'sft.pt').exists() or fingerprint(folder / 'sft.pt') != fingerprint(shared):
        atomic_write(folder / 'sft.pt', lambda file: file.write(shared.read_bytes()))
    reward = replace(RewardConfig(seed=seed, preference=preference), **dict(schedule.get('reward', ())))
    if reused_stage(folder, 'reward', reward, (folder / 'sft.pt',), config.fresh):
        return folder, reward, None
    sft_policy = load_model(folder / 'sft.pt', 'policy')
    return folder, reward, executors.start(pool, reward_job, sft_policy, reward, prompts, progress=progress)


def reward_job(sft_policy, config, prompts, progress=True, threads=None):
    """A cell's reward model, trained and measured (pipeline.train_reward_stage), and its exact tables
    of prompts: (trained, ExactTables). In a worker, so that the main process does not train while
    the workers wait."""
    if threads:
        torch.set_num_threads(threads)
    trained = train_reward_stage(sft_policy, config, 'reward', progress)
    return trained, exact_tables(sft_policy, trained[0], prompts, resolve_preference(config.preference))


def row_key(run, variant, config):
    """What a measured row depends on: the fingerprints of the checkpoints it was made from, the
    variant's settings and the evaluation prompts; as JSON gives it back."""
    made_from = ([run.path(variant)] if METHODS[variant.method].train else []) + [run.sft_path, run.reward_path]
    key = {'made_from': {path.name: fingerprint(path) for path in made_from}, 'settings': asdict(variant.config()),
           'prompts': config.prompts, 'seed': config.seed}
    return json.loads(json.dumps(key))


def stored_rows(run):
    """The cell's rows.json: {variant name: {'key': row_key, 'row': measured row}}; {} if none is readable."""
    try:
        return json.loads((run.folder / 'rows.json').read_text())
    except (OSError, ValueError):
        return {}


def store_row(run, variant, key, row):
    """Add a measured row to the cell's rows.json at once: a run killed in the next keeps this one."""
    write_json(run.folder / 'rows.json', {**stored_rows(run), variant.name: {'key': key, 'row': row}})


def start_row(run, variant, config, pool, prompts, progress):
    """Measure a saved (or exact) variant of a cell unless its row is stored under the same key (or
    config.fresh): row_job in a worker, or here without a pool. Returns {future: (run, variant, key)},
    empty when there is nothing to measure."""
    key = row_key(run, variant, config)
    if not config.fresh and stored_rows(run).get(variant.name, {}).get('key') == key:
        return {}
    trains = METHODS[variant.method].train is not None
    policy, checkpoint = (run.policy(variant), run.checkpoint(variant)) if trains else (None, None)
    trained = checkpoint and {'history': checkpoint['history'], 'metrics': checkpoint['metrics']}
    return {executors.start(pool, row_job, variant, policy, trained, run.tables(prompts), run.gold_margin,
                            progress=progress): (run, variant, key)}


def measure_cell(run, seed, chosen, config, prompts):
    """Each variant's exact row in the run of `seed` (a method without a seed of its own, best-of-n,
    has rows on every seed), from rows.json where it was measured from the same checkpoints, else
    measured now (the exact tables computed only then) and stored. A stored row under the same key is
    the same numbers, so --fresh needs no exception here: its rows were all measured again by then."""
    rows = []
    for variant in chosen:
        key, stored = row_key(run, variant, config), stored_rows(run).get(variant.name, {})
        row = stored.get('row') if stored.get('key') == key else None
        if row is None:  # not measured from these checkpoints: a checkpoint the grid did not make (the ceiling's)
            row = variant_row(run, variant, run.tables(prompts))
            store_row(run, variant, key, row)
        rows.append({**row, 'preference': run.preference.name, 'seed': seed, 'beta': variant.beta,
                     'checkpoint': variant.name})
    return rows


def leaderboard(run_dir, config, progress=True, schedule=None):
    """Train and measure every cell; write the leaderboard. schedule: {'sft', 'reward', METHOD:
    settings} over the defaults (default: the quick ones with config.quick, else none). Returns the
    summary (summarise)."""
    run_dir, schedule = Path(run_dir), schedules(config) if schedule is None else schedule
    prompts = sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed))
    # The work goes to the workers as soon as what it needs is there: a cell's reward model (with its
    # exact tables) first, its variants once that is back, each variant's exact row once it is
    # saved. This process makes the seeds' SFT policies and writes every file as its job comes back:
    # on a cluster it only hands out work.
    with executors.executor(config) as pool:
        cells, pending = [], {}  # pending: {future: (run, variant, the row's key, or None for its training)}
        for seed in config.seeds:
            sft = replace(SFTConfig(seed=seed), **dict(schedule.get('sft', ())))
            ensure_stage(run_dir / f'seed{seed}', 'sft', sft, (), sft_stage, config.fresh, progress)
            preferences = config.preferences or tuple(PREFERENCES)
            # The seed's reward models first, each with its exact tables: the workers take them before
            # the cells' variants, which wait for them.
            rewards = [cell_reward(run_dir, preference, seed, config, schedule, pool, prompts, progress)
                       for preference in preferences]
            for preference, (folder, reward, job) in zip(preferences, rewards):
                made = job.result() if job else None  # (the trained reward model, its tables); None: reused
                if made:
                    save_reward_stage(folder, reward, 'reward', made[0])
                run = Run(folder, preference, config.fresh, progress)
                chosen = cell_variants(config, seed, schedule)
                _, training = run.submit(chosen, pool)  # trained and saved here and now without a pool
                run.tables(prompts, made[1] if made else None)  # without, computed here unless stored
                pending.update({future: (run, variant, None) for future, variant in training.items()})
                for variant in chosen:
                    if variant not in training.values():  # saved here, reused, or exact: measured now
                        pending.update(start_row(run, variant, config, pool, prompts, progress))
                cells.append((seed, run, chosen))
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                run, variant, key = pending.pop(future)
                if key is None:  # trained: saved, then measured
                    run.save(variant, future.result())
                    pending.update(start_row(run, variant, config, pool, prompts, progress))
                else:
                    store_row(run, variant, key, future.result())
        rows, targets = [], []
        for seed, run, chosen in cells:  # every row stored by now: read back in the grid's order
            rows += measure_cell(run, seed, chosen, config, prompts)
            measure = functools.partial(measure_cell, run, seed, config=config, prompts=prompts)
            targets += cell_targets(run, config.betas, measure, run.tables(prompts), seed)
    summary = summarise(rows)
    split = split_gap(rows, targets, spread)
    figure = plot_leaderboard(summary, run_dir / 'leaderboard.png')
    plot_decomposition(summary, split, run_dir / 'decomposition.png')
    report = write_study(run_dir, 'leaderboard', leaderboard_report(summary, split, config),
                         {'settings': asdict(config), 'schedule': schedule, 'rows': rows, **summary,
                          'cell_targets': targets, **split}, figure)
    print(gap_table(summary))
    print(f'Leaderboard: {report}, figure {figure}')
    return summary


# ---------------------------------------------------------------------------------------------
# The summary: medians and ranges over seeds, ranks, and what the seeds can tell apart.

def spread(values):
    """{'median', 'low', 'high'} of the values that are not None; None where none is."""
    values = [value for value in values if value is not None]
    return {'median': statistics.median(values), 'low': min(values), 'high': max(values)} if values else None


def summarise(rows):
    """{'methods', 'preferences', 'cells', 'method_rank', 'preference_rank', 'seed_order', 'inseparable'}:
    cells[method][preference][metric] the spread over seeds; ranks by median gap closed (1 best), a
    method's averaged over preferences, a preference's (1 easiest) over methods."""
    methods = list(dict.fromkeys(row['label'] for row in rows))
    preferences = list(dict.fromkeys(row['preference'] for row in rows))
    cells = {method: {preference: {} for preference in preferences} for method in methods}
    for method, preference in itertools.product(methods, preferences):
        chosen = [row for row in rows if (row['label'], row['preference']) == (method, preference)]
        for metric in METRICS:
            values = [row.get('samples', row.get('pairs')) if metric == 'consumed' else row.get(metric)
                      for row in chosen]
            cells[method][preference][metric] = spread(values)
        cells[method][preference]['seeds'] = len(chosen)
    median = {(method, preference): (cells[method][preference]['gap_closed'] or {'median': -np.inf})['median']
              for method, preference in itertools.product(methods, preferences)}
    by_preference = {preference: ranks({method: median[method, preference] for method in methods})
                     for preference in preferences}
    by_method = {method: ranks({preference: median[method, preference] for preference in preferences})
                 for method in methods}
    return {'methods': methods, 'preferences': preferences, 'cells': cells,
            'method_rank': {method: statistics.mean(by_preference[p][method] for p in preferences)
                            for method in methods},
            'preference_rank': {p: statistics.mean(by_method[m][p] for m in methods) for p in preferences},
            **seed_agreement(rows, cells, methods, preferences)}


def ranks(scores):
    """{name: rank} by score, highest first (1), tied names sharing the mean of their places."""
    order = sorted(scores, key=lambda name: -scores[name])
    return {name: statistics.mean(place + 1 for place, other in enumerate(order) if scores[other] == scores[name])
            for name in scores}


def seed_agreement(rows, cells, methods, preferences):
    """Per preference: whether the methods come in the same order (by gap closed) on every seed, and
    the pairs of methods whose ranges over seeds overlap (the seeds cannot separate them)."""
    same_order, inseparable = {}, {}
    for preference in preferences:
        orders = set()
        for seed in sorted({row['seed'] for row in rows}):
            scores = {row['label']: -np.inf if row['gap_closed'] is None else row['gap_closed']
                      for row in rows if (row['preference'], row['seed']) == (preference, seed)}
            orders.add(tuple(sorted(scores, key=lambda label: (-scores[label], label))))
        same_order[preference] = len(orders) == 1
        spreads = {method: cells[method][preference]['gap_closed'] for method in methods}
        inseparable[preference] = [[a, b] for a, b in itertools.combinations(methods, 2)
                                   if spreads[a] and spreads[b] and spreads[a]['low'] <= spreads[b]['high']
                                   and spreads[b]['low'] <= spreads[a]['high']]
    return {'seed_order': same_order, 'inseparable': inseparable}


# ---------------------------------------------------------------------------------------------
# The tables and the figure.
