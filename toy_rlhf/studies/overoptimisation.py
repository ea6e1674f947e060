"""Reward over-optimisation, measured exactly: the proxy reward a policy is optimised for against the
gold reward the labeler judged by, along d = sqrt(KL(pi || pi_ref)) (Gao, Schulman and Hilton 2022,
arXiv 2210.10760).

Proxies of graded quality are reward models trained from the run's SFT policy on fewer or more
labelled pairs (and, as a second axis, noisier labels: a smaller gold margin). KL is spent on each
proxy three ways, all measured over every one of the 10^4 responses of the evaluation prompts:
  pi*_beta    the exact optimum of E[proxy] - beta KL over a fine grid of beta (the optimiser's frontier)
  best-of-n   the best of n reference samples under the proxy, n = 1..10^4, exact
  a method    any registered online method (PPO unless --method says otherwise) trained on the proxy
              at small betas, a snapshot evaluated exactly every few rounds (its `measure`)
Each point gives the expected proxy reward, the gold reward, and the gold reward counted on valid
responses only (the language's rule holds in every digit): the proxy never saw an invalid response,
so its extrapolation there is where hacking happens. Gao et al.'s forms are fitted to the gold curves.

Units: every reward is a gain over the reference (R(0) = 0, as the forms assume). Gold is the
labeler's reward per unit of margin, the preference's own reward (0 to 1 for the built-ins; for the
first digit, gold gain is preference-rate gain and valid gold gain is gold-rate gain), and each proxy is divided by the margin its labels were
drawn at: a Bradley-Terry labeler makes the proxy estimate margin * gold up to a constant per prompt,
so proxy / margin is the proxy's own estimate of the gold gain, on the same axis.
"""
import functools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from toy_rlhf.checkpoint import load_checkpoint, load_model
from toy_rlhf.enumeration import all_response_log_probs, all_response_rewards
from toy_rlhf.executors import ExecutorConfig, executor, run_jobs
from toy_rlhf.files import fingerprint
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveFloat, PositiveInt, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import EXACT_PROMPTS
from toy_rlhf.pipeline import reused_stage, save_reward_stage, save_stage, sft_stage, train_reward_stage
from toy_rlhf.preferences import resolve_preference
from toy_rlhf.reward import RewardConfig
from toy_rlhf.run import Variant
from toy_rlhf.sft import SFTConfig
from toy_rlhf.studies.output import markdown_table, write_study
from toy_rlhf.studies.overoptimisation_figure import plot_overoptimisation
from toy_rlhf.studies.overoptimisation_curves import (MEASURED, Tables, as_curve, best_of_n_curve, expectations,
                                                      fits, optimum_curve, peaks)

# pi*_beta from beta = 100 (d ~ 0.03, next to the reference) down to 1e-3, ten per decade, then beta -> 0.
BETAS = [10 ** (k / 10) for k in range(20, -31, -1)] + [0.0]
# n = 1..10^4, fifteen per decade (rounded, so a few coincide at small n).
BEST_OF_N = sorted({round(10 ** (k / 15)) for k in range(61)})


@dataclass
class OverOptConfig(ExecutorConfig):
    SET_BY_STUDY = ('seed', 'device', 'beta', 'pairs', 'gold_margin', 'preference')  # the stages' settings set here
    pairs: tuple[PositiveInt, ...] = (250, 1000, 4000, 20000)  # labelled pairs of each proxy reward model
    # The labeler's margin sets the label noise: P(wrong label) = sigmoid(-margin), 2e-9 at 20, 12% at 2, 27% at 1.
    gold_margin: tuple[PositiveFloat, ...] = (RewardConfig.gold_margin,)  # label noise of the proxies (one set per margin)
    # The online method trained on each proxy: any registered one that samples and learns from a reward
    # model (its settings: --METHOD.*).
    method: str = 'ppo'
    betas: tuple[NonNegativeFloat, ...] = (0.0, 0.03)  # the method's runs on each proxy, one per beta
    snapshot_every: PositiveInt = 5  # the method's rounds between exact evaluations of the policy
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of every exact evaluation (each: all 10^4 responses)
    seed: Seed = 0  # random seed of every stage and of the evaluation prompts
    fresh: bool = False  # retrain even where a checkpoint with the same settings exists
    # The proxies' own schedule (flags --reward.iters, ...); pairs, margin and seed come from the
    # fields above. The method's settings are its config's (overoptimisation's method_config).
    reward: RewardConfig = field(default_factory=RewardConfig)


@functools.cache
def snapshot_config_class(config_class):
    """A method's settings (config_class) and how its snapshots are measured, as one config: a run is
    reused only if both are the same, and its checkpoint stores both."""
    @dataclass
    class SnapshotConfig(config_class):
        snapshot_every: PositiveInt = 5  # rounds between exact evaluations
        prompts: ExactPrompts = EXACT_PROMPTS  # prompts of each evaluation (drawn with the seed)
        gold: str = ''  # the preference whose gold reward the snapshots are measured by (its name)
    return SnapshotConfig


# ---------------------------------------------------------------------------------------------
# The stages: proxies and the method's runs on them, each reused when current.

def proxy_name(pairs, margin):
    """Checkpoint stem of a proxy: reward_pairs250 (the default margin), reward_pairs250_margin2."""
    noise = '' if margin == RewardConfig.gold_margin else f'_margin{margin:g}'
    return f'reward_pairs{pairs}{noise}'


def snapshot_job(method, config, snapshot_every, gold, sft_policy, proxy, prompts, log_ref, values, progress=True,
                 threads=None):
    """Train `method` (a registry name) at `config` on the proxy reward model, measuring the actor
    exactly against the tables (log_ref and values of prompts: expectations()) every snapshot_every
    rounds and at the end; the measurements ride in the log. A pure function of its arguments, so that
    a worker can run it: returns (policy, history, seconds)."""
    if threads:
        torch.set_num_threads(threads)

    def every_few(rounds, actor):
        due = rounds % snapshot_every == 0 or rounds == config.iters
        return {f'exact/{key}': value for key, value in
                expectations(all_response_log_probs(actor, prompts), log_ref, values).items()} if due else {}

    start = time.perf_counter()
    policy, history = METHODS[method].train(sft_policy, reward_model=proxy, config=config,
                                            preference=resolve_preference(gold), progress=progress, measure=every_few)
    return policy, history, time.perf_counter() - start


def proxy_job(sft_policy, config, name, prompts, progress=True, threads=None):
    """A proxy: its reward model trained and measured (pipeline.train_reward_stage) and its scores of
    every response of prompts (the table its runs are measured by). Returns (trained, rewards)."""
    if threads:
        torch.set_num_threads(threads)
    trained = train_reward_stage(sft_policy, config, name, progress)
    return trained, all_response_rewards(trained[0], prompts)


def snapshot_curve(history, reference):
    """The exact measurements in a snapshot run's log, as a curve with 'round', from the reference on."""
    rows = [row for row in history if 'exact/kl' in row]
    points = [reference] + [{key: row[f'exact/{key}'] for key in ('kl', *MEASURED)} for row in rows]
    return {'round': [0] + [row['iter'] + 1 for row in rows], **as_curve(points, reference)}


def run_variants(config, method_config=None):
    """The method's run on a proxy at each of config.betas (Variants: their names are their curves' among
    a proxy's curves), from method_config (the method's settings; its defaults if None)."""
    base = Variant.of(method_config or METHODS[config.method].config(), config.method)
    return [replace(base, beta=beta, seed=config.seed) for beta in config.betas]


def run_path(proxy_path, variant):
    """reward_pairs250_ppo_beta0.pt beside reward_pairs250.pt."""
    return proxy_path.with_name(f'{proxy_path.stem}_{variant.name}.pt')


# ---------------------------------------------------------------------------------------------
# The study.

def overoptimisation(run_dir, plots_dir, config, method_config=None, progress=True):
    """Proxies, their exact curves, Gao et al.'s fits, plots_dir/overoptimisation.png and
    run_dir/overoptimisation.md and .json. The labeler and the gold are those of
    config.reward.preference: its reward, per unit of margin, is the gold every proxy is judged by.
    config.method trains on each proxy with method_config (its settings; beta and seed are the study's).
    Returns the proxies' results."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    preference = resolve_preference(config.reward.preference)
    variants = run_variants(config, method_config)
    # 1. the reference: the run's SFT policy (trained first if the run has none)
    sft_path = run_dir / 'sft.pt'
    if not sft_path.exists():
        sft_stage(run_dir, SFTConfig(seed=config.seed), progress)
    tables = Tables(sft_path, sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed)),
                    preference.reward)

    # 2. the proxies and the method's runs on each
    proxies = [(pairs, margin, run_dir / f'{proxy_name(pairs, margin)}.pt')
               for margin in config.gold_margin for pairs in config.pairs]
    train_proxies(run_dir, config, proxies, variants, tables, preference.name, progress)

    # 3. every proxy's exact curves, unless measured from these same checkpoints before (the
    # expensive part: the tables); Gao et al.'s forms through them and where they peak
    inputs = [sft_path] + [run for *_, path in proxies for run in (path, *(run_path(path, variant)
                                                                          for variant in variants))]
    settings = {name: value for name, value in asdict(replace(config, fresh=False)).items()
                if name not in ExecutorConfig.__dataclass_fields__}  # where they trained does not change them
    key = json.loads(json.dumps({'settings': settings, 'gold': preference.name,
                                 'method_settings': [asdict(variant.config()) for variant in variants],
                                 'betas': BETAS, 'best_of_n': BEST_OF_N,
                                 'inputs': {path.name: fingerprint(path) for path in inputs}}))
    curves = None if config.fresh else stored_curves(run_dir / 'overoptimisation.json', key)
    if curves is None:
        curves = [proxy_curves(tables, margin, path, variants) for _, margin, path in proxies]
    else:
        print(f'{run_dir / "overoptimisation.json"}: reusing the curves (measured from the same checkpoints)')
    results = [{'name': path.stem, 'pairs': pairs, 'margin': margin, 'curves': measured,
                'fits': fits(measured), 'peaks': peaks(measured)}
               for (pairs, margin, path), measured in zip(proxies, curves)]

    # 4. the figure and the report
    runs = [(variant.name, variant.describe()) for variant in variants]
    figure = plot_overoptimisation(results, METHODS[config.method].label, runs, plots_dir / 'overoptimisation.png')
    report = write_study(run_dir, 'overoptimisation', overoptimisation_report(results, config),
                         {'key': key, 'proxies': results}, figure)
    print(peak_table(results))
    print(f'Report {report}, figure {figure}')
    return results


def train_proxies(run_dir, config, proxies, variants, tables, gold_name, progress):
    """Each proxy (pairs, margin, path): a reward model on `pairs` labels drawn at `margin`, then each
    variant of the method on it, its snapshots measured exactly as it trains; every stage reused when
    current. With config.workers > 1, the proxies train at once in worker processes, then the runs."""
    sft_path, sft_policy = run_dir / 'sft.pt', load_model(run_dir / 'sft.pt', 'policy')
    reward_configs = {path: replace(config.reward, pairs=pairs, gold_margin=margin, seed=config.seed)
                      for pairs, margin, path in proxies}

    def save_proxy(path, made):
        trained, rewards = made
        save_reward_stage(run_dir, reward_configs[path], path.stem, trained)
        tables.keep_rewards(path, rewards)

    def save_run(key, made):
        (path, variant), (policy, history, seconds) = key, made
        save_stage(run_dir, run_path(path, variant).stem, policy, 'policy', runs[key], {'seconds': seconds}, history,
                   inputs=(sft_path, path), method=variant.method)

    with executor(config) as pool:
        # 1. the proxies' reward models, each with its scores of every response (its runs' tables)
        run_jobs(pool, {path: (proxy_job, sft_policy, reward_configs[path], path.stem, tables.prompts)
                        for path in reward_configs
                        if not reused_stage(run_dir, path.stem, reward_configs[path], (sft_path,), config.fresh)},
                 save_proxy, progress)
        # 2. the method's runs on each, measured against their proxy's tables
        runs = {(path, variant): snapshot_config(variant.config(), config, gold_name)
                for _, _, path in proxies for variant in variants}
        run_jobs(pool, {(path, variant): (snapshot_job, variant.method, variant.config(), config.snapshot_every,
                                          gold_name, sft_policy, load_model(path, 'reward'), tables.prompts,
                                          tables.log_ref, tables.values(path, margin))
                        for _, margin, path in proxies for variant in variants
                        if not reused_stage(run_dir, run_path(path, variant).stem, runs[path, variant],
                                            (sft_path, path), config.fresh)},
                 save_run, progress)


def snapshot_config(method_config, config, gold_name):
    """A run's stored settings: its method's config and how its snapshots were measured."""
    return snapshot_config_class(type(method_config))(
        **{name: getattr(method_config, name) for name in method_config.__dataclass_fields__},
        snapshot_every=config.snapshot_every, prompts=config.prompts, gold=gold_name)


def proxy_curves(tables, margin, proxy_path, variants):
    """One proxy's exact curves: pi*_beta, best-of-n, and each of the method's runs' snapshots."""
    log_ref, rewards, values = tables.log_ref, tables.rewards(proxy_path), tables.values(proxy_path, margin)
    reference = expectations(log_ref, log_ref, values)
    return {'optimum': optimum_curve(log_ref, rewards, values, BETAS),
            'best_of_n': best_of_n_curve(log_ref, rewards, values, BEST_OF_N),
            **{variant.name: snapshot_curve(load_checkpoint(run_path(proxy_path, variant))['history'], reference)
               for variant in variants}}


def stored_curves(path, key):
    """The curves in the study's JSON at path if they were measured with this key, else None."""
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(stored, dict) and stored.get('key') == key):
        return None
    return [proxy['curves'] for proxy in stored['proxies']]


# ---------------------------------------------------------------------------------------------
# The report.

def peak_table(results):
    """One row per proxy and curve: where gold and valid gold peak and how far they fall after."""
    rows = []
    for result in results:
        for source, both in result['peaks'].items():
            curve = result['curves'][source]
            cells = [cell for p in (both['gold'], both['gold_valid'])
                     for cell in (f"{p['gain']:+.3f}", f"{p['d']:.2f} ({p['kl']:.2f})", f"{p['drop']:.3f}")]
            rows.append([result['name'], source, *cells, f"{curve['proxy'][int(np.argmax(curve['d']))]:+.3f}"])
    header = ['proxy', 'curve', 'gold: peak gain', 'at d (KL)', 'fall after', 'valid gold: peak gain', 'at d (KL)',
              'fall after', 'proxy gain at largest d']
    return markdown_table(header, rows, text_columns=(0, 1))


def fit_table(results):
    """One row per proxy and fit: alpha, beta, RMS residual against the gold curve's range."""
    rows = [[result['name'], source, both['gold']['form'],
             *(f"{fit['alpha']:.3f}, {fit['beta']:.3f}, {fit['rms']:.4f}" for fit in both.values())]
            for result in results for source, both in result['fits'].items()]
    header = ['proxy', 'points', 'form', 'gold: alpha, beta, RMS', 'valid gold: alpha, beta, RMS']
    return markdown_table(header, rows, text_columns=range(len(header)))


def overoptimisation_report(results, config):
    method = METHODS[config.method]
    return f"""# Reward over-optimisation, measured exactly

Proxies: reward models from the run's SFT policy on {', '.join(f'{n:,}' for n in config.pairs)} labelled
pairs at gold margin {', '.join(f'{m:g}' for m in config.gold_margin)}; seed {config.seed}. Every point is
exact over all 10^4 responses of {config.prompts} prompts: d = sqrt(KL(pi || SFT)); gains over the SFT
policy; gold per unit of margin (gold: the preferred first digit; valid gold: that, and every digit in
the language); proxy divided by its labels' margin. Curves: `optimum` is pi*_beta of the proxy (beta
{max(BETAS):g} .. {min(b for b in BETAS if b > 0):g}, then 0), `best_of_n` n = 1 .. {max(BEST_OF_N):,},
`{method.name}_betaB` {method.label} snapshots every {config.snapshot_every} rounds.

## Where gold peaks

"fall after": how far the gain has fallen from its peak by the largest d of the curve (0: it never falls).

{peak_table(results)}

## Gao et al.'s forms, least squares on the gold curves

best_of_n: R(d) = d (alpha - beta d); rl: R(d) = d (alpha - beta log d), through pi*_beta (`optimum`)
and through pi*_beta with every {method.label} snapshot (`rl_all`). RMS: root mean square residual, in gold units.

{fit_table(results)}
"""
