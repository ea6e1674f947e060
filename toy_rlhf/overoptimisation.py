"""Reward over-optimisation, measured exactly: the proxy reward a policy is optimised for against the
gold reward the labeler judged by, along d = sqrt(KL(pi || pi_ref)) (Gao, Schulman and Hilton 2022,
arXiv 2210.10760).

Proxies of graded quality are reward models trained from the run's SFT policy on fewer or more
labelled pairs (and, as a second axis, noisier labels: a smaller gold margin). KL is spent on each
proxy three ways, all measured over every one of the 10^4 responses of the evaluation prompts:
  pi*_beta    the exact optimum of E[proxy] - beta KL over a fine grid of beta (the optimiser's frontier)
  best-of-n   the best of n reference samples under the proxy, n = 1..10^4, exact
  PPO         trained on the proxy at small betas, a snapshot evaluated exactly every few rounds
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
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from toy_rlhf import plots
from toy_rlhf.checkpoint import load_checkpoint, load_model
from toy_rlhf.files import fingerprint, write_json, write_text
from toy_rlhf.flags import ExactPrompts, NonNegativeFloat, PositiveFloat, PositiveInt, Seed
from toy_rlhf.language import is_valid_output, sample_prompts
from toy_rlhf.methods.best_of_n import cumulative_masses, level_kl, level_log_probs, reward_levels, textbook_kl
from toy_rlhf.methods.ppo import PPOConfig, train_ppo
from toy_rlhf.optimal import (EXACT_PROMPTS, all_responses, digit_distribution, optimal_log_probs, response_kl,
                              response_log_probs_exact, response_rewards_exact)
from toy_rlhf.pipeline import ensure_stage, reward_stage, save_stage, sft_stage
from toy_rlhf.preferences import resolve_preference
from toy_rlhf.reward import RewardConfig
from toy_rlhf.sft import SFTConfig

# pi*_beta from beta = 100 (d ~ 0.03, next to the reference) down to 1e-3, ten per decade, then beta -> 0.
BETAS = [10 ** (k / 10) for k in range(20, -31, -1)] + [0.0]
# n = 1..10^4, fifteen per decade (rounded, so a few coincide at small n).
BEST_OF_N = sorted({round(10 ** (k / 15)) for k in range(61)})
MEASURED = ('proxy', 'gold', 'gold_valid')  # the expectations every point of a curve has


@dataclass
class OverOptConfig:
    pairs: tuple[PositiveInt, ...] = (250, 1000, 4000, 20000)  # labelled pairs of each proxy reward model
    # The labeler's margin sets the label noise: P(wrong label) = sigmoid(-margin), 2e-9 at 20, 12% at 2, 27% at 1.
    gold_margin: tuple[PositiveFloat, ...] = (RewardConfig.gold_margin,)  # label noise of the proxies (one set per margin)
    ppo_betas: tuple[NonNegativeFloat, ...] = (0.0, 0.03)  # PPO runs on each proxy, one per beta
    snapshot_every: PositiveInt = 5  # PPO rounds between exact evaluations of the policy
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of every exact evaluation (each: all 10^4 responses)
    seed: Seed = 0  # random seed of every stage and of the evaluation prompts
    fresh: bool = False  # retrain even where a checkpoint with the same settings exists
    # The proxies' and PPO's own schedules (flags --reward.iters, --ppo.iters, ...); pairs, margin,
    # seed and beta come from the fields above.
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


@dataclass
class SnapshotPPOConfig(PPOConfig):
    """PPO's settings and how its snapshots are measured: a run is reused only if both are the same."""
    snapshot_every: PositiveInt = 5  # rounds between exact evaluations
    prompts: ExactPrompts = EXACT_PROMPTS  # prompts of each evaluation (drawn with the seed)
    gold: str = ''  # the preference whose gold reward the snapshots are measured by (its name)


def expectations(log_pi, log_ref, values):
    """KL(pi || pi_ref) and E_pi[v] of each table v (P, N) in values, means over prompts: {name: float}."""
    pi = digit_distribution(log_pi).exp()
    return {'kl': response_kl(log_pi, log_ref).mean().item(),
            **{name: (pi * table).sum(dim=1).mean().item() for name, table in values.items()}}


def as_curve(points, reference):
    """Points (a list of expectations() dicts, ordered) as one curve of gains over the reference:
    {'kl', 'd', 'proxy', 'gold', 'gold_valid'} lists, d = sqrt(KL)."""
    curve = {'kl': [point['kl'] for point in points]}
    curve['d'] = [math.sqrt(max(kl, 0.0)) for kl in curve['kl']]  # KL >= 0; rounding may give -1e-17
    curve.update({name: [point[name] - reference[name] for point in points] for name in MEASURED})
    return curve


def optimum_curve(log_ref, rewards, values, betas):
    """pi*_beta of `rewards` at each beta, measured: a curve with 'beta'."""
    points = [expectations(optimal_log_probs(log_ref, rewards, beta), log_ref, values) for beta in betas]
    return {'beta': list(betas), **as_curve(points, expectations(log_ref, log_ref, values))}


def best_of_n_curve(log_ref, rewards, values, ns):
    """Best-of-n under `rewards` for every n in ns at once, exact: a curve with 'n' and 'textbook_kl'.

    Within a reward level pi_bon follows pi_ref (toy_rlhf.methods.best_of_n), so E_bon[v] = sum_k P_k
    m_k with m_k = E_ref[v | level k]: one pass per prompt gives every n.
    """
    log_ref = digit_distribution(log_ref.double())
    n = torch.tensor(ns, dtype=torch.float64).unsqueeze(1)  # (S, 1)
    kl = torch.zeros(len(ns), dtype=torch.float64)
    sums = {name: torch.zeros(len(ns), dtype=torch.float64) for name in values}
    for x, (log_ref_x, rewards_x) in enumerate(zip(log_ref, rewards)):
        supported, level, log_q = reward_levels(log_ref_x, rewards_x)
        levels = cumulative_masses(log_q)
        P = level_log_probs(levels, n).exp()  # (S, K): the kept response's level, for each n
        kl += level_kl(levels, n)
        within = (log_ref_x[supported] - log_q[level]).exp()  # pi_ref(y | its level)
        for name, table in values.items():
            sums[name] += P @ torch.zeros_like(log_q).index_add(0, level, within * table[x][supported])
    points = [{'kl': kl[i].item() / len(log_ref), **{name: sums[name][i].item() / len(log_ref) for name in values}}
              for i in range(len(ns))]
    return {'n': list(ns), 'textbook_kl': [textbook_kl(count) for count in ns],
            **as_curve(points, expectations(log_ref, log_ref, values))}


# Gao et al.'s forms, R(d) = alpha d - beta g(d): linear in (alpha, beta).
FORMS = {'best_of_n': lambda d: d ** 2, 'rl': lambda d: d * np.log(np.where(d > 0, d, 1.0))}


def gao_fit(d, gain, form, points=60):
    """Least-squares alpha, beta of R(d) = d (alpha - beta d) (form 'best_of_n') or d (alpha - beta
    log d) ('rl') through the points (d, gain): {'form', 'alpha', 'beta', 'rms' (of the residual),
    'residual' (gain - fit at each point), 'line' (the fit at `points` d from 0 to the largest)}."""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    design = np.stack([d, -FORMS[form](d)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, gain, rcond=None)
    residual = gain - design @ coefficients
    line = np.linspace(0, d.max(), points)
    return {'form': form, 'alpha': float(coefficients[0]), 'beta': float(coefficients[1]),
            'rms': float(np.sqrt(np.mean(residual ** 2))), 'residual': residual.tolist(),
            'line': {'d': line.tolist(), 'gain': (np.stack([line, -FORMS[form](line)], 1) @ coefficients).tolist()}}


def peak(curve, name='gold', tolerance=1e-3):
    """Where curve[name] (ordered by d) first comes within `tolerance` of its highest value, so that a
    curve that rises and stays flat peaks where it arrives: {'d', 'kl', 'gain', 'drop'}, drop being how
    far it has fallen from its highest value by the largest d (0 if it never falls)."""
    values = np.asarray(curve[name])
    best = int(np.argmax(values >= values.max() - tolerance))
    return {'d': curve['d'][best], 'kl': curve['kl'][best], 'gain': curve[name][best],
            'drop': float(values.max() - values[int(np.argmax(curve['d']))])}


# ---------------------------------------------------------------------------------------------
# The stages: proxies and PPO runs, each reused when current.

def proxy_name(pairs, margin):
    """Checkpoint stem of a proxy: reward_pairs250 (the default margin), reward_pairs250_margin2."""
    noise = '' if margin == RewardConfig.gold_margin else f'_margin{margin:g}'
    return f'reward_pairs{pairs}{noise}'


def gold_tables(gold, prompts):
    """gold(x, y) of every response and whether every digit of y obeys the rule: two (P, 10^4) float64."""
    responses = all_responses()
    every = [(prompt.expand(len(responses), -1), responses) for prompt in prompts]
    return (torch.stack([gold(*pair) for pair in every]).double(),
            torch.stack([is_valid_output(*pair).all(dim=1) for pair in every]).double())


class Tables:
    """The evaluation's (P, 10^4) tables, each computed on first use and then kept: the reference's
    log-probs, the gold reward and validity of every response, each proxy's scores. A rerun whose
    checkpoints and results are all current needs none of them."""

    def __init__(self, sft_path, prompts, gold):
        self.sft_path, self.prompts, self.gold = sft_path, prompts, gold
        self._rewards = {}

    @functools.cached_property
    def log_ref(self):
        return response_log_probs_exact(load_model(self.sft_path, 'policy'), self.prompts)

    @functools.cached_property
    def gold_and_valid(self):
        return gold_tables(self.gold, self.prompts)

    def rewards(self, proxy_path):
        if proxy_path not in self._rewards:
            self._rewards[proxy_path] = response_rewards_exact(load_model(proxy_path, 'reward'), self.prompts)
        return self._rewards[proxy_path]

    def values(self, proxy_path, margin):
        """The tables every point measures: proxy / margin, gold, gold on valid responses only."""
        gold, valid = self.gold_and_valid
        return {'proxy': self.rewards(proxy_path) / margin, 'gold': gold, 'gold_valid': gold * valid}

    def measure(self, actor, *, proxy_path, margin):
        """A policy's exact expectations(): its log-probs of every response against these tables."""
        return expectations(response_log_probs_exact(actor, self.prompts), self.log_ref,
                            self.values(proxy_path, margin))


def snapshot_stage(run_dir, config, progress=True, *, name, proxy_path, measure):
    """Train PPO on the proxy at proxy_path, measure(actor) every config.snapshot_every rounds and at
    the end (the measurements ride in the log, inside the checkpoint); write name.pt and .jsonl."""
    def every_few(rounds, actor):
        due = rounds % config.snapshot_every == 0 or rounds == config.iters
        return {f'exact/{key}': value for key, value in measure(actor).items()} if due else {}

    sft_path = Path(run_dir) / 'sft.pt'
    start = time.perf_counter()
    policy, history = train_ppo(load_model(sft_path, 'policy'), load_model(proxy_path, 'reward'), config,
                                progress, measure=every_few)
    save_stage(run_dir, name, policy, 'policy', config, {'seconds': time.perf_counter() - start}, history,
               inputs=(sft_path, proxy_path))


def snapshot_curve(history, reference):
    """The exact measurements in a snapshot run's log, as a curve with 'round', from the reference on."""
    rows = [row for row in history if 'exact/kl' in row]
    points = [reference] + [{key: row[f'exact/{key}'] for key in ('kl', *MEASURED)} for row in rows]
    return {'round': [0] + [row['iter'] + 1 for row in rows], **as_curve(points, reference)}


def ppo_run_path(proxy_path, beta):
    """reward_pairs250_ppo_beta0.pt beside reward_pairs250.pt."""
    return proxy_path.with_name(f'{proxy_path.stem}_ppo_beta{beta:g}.pt')


# ---------------------------------------------------------------------------------------------
# The study.

def overoptimisation(run_dir, plots_dir, config, progress=True):
    """Proxies, their exact curves, Gao et al.'s fits, plots_dir/overoptimisation.png and
    run_dir/overoptimisation.md and .json. The labeler and the gold are those of
    config.reward.preference: its reward, per unit of margin, is the gold every proxy is judged by.
    Returns the proxies' results."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    preference = resolve_preference(config.reward.preference)
    gold, gold_name = preference.reward, preference.name
    # 1. the reference: the run's SFT policy (trained first if the run has none)
    sft_path = run_dir / 'sft.pt'
    if not sft_path.exists():
        sft_stage(run_dir, SFTConfig(seed=config.seed), progress)
    tables = Tables(sft_path, sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed)), gold)

    # 2. the proxies (reward models on `pairs` labels drawn at `margin`) and PPO on each, snapshots
    # measured exactly as it trains; every stage reused when current
    proxies = [(pairs, margin, run_dir / f'{proxy_name(pairs, margin)}.pt')
               for margin in config.gold_margin for pairs in config.pairs]
    for pairs, margin, path in proxies:
        ensure_stage(run_dir, path.stem, replace(config.reward, pairs=pairs, gold_margin=margin, seed=config.seed),
                     (sft_path,), functools.partial(reward_stage, name=path.stem), config.fresh, progress)
        for beta in config.ppo_betas:
            ppo_config = SnapshotPPOConfig(**{**asdict(config.ppo), 'beta': beta, 'seed': config.seed,
                                              'preference': preference.name},
                                           snapshot_every=config.snapshot_every, prompts=config.prompts,
                                           gold=gold_name)
            measure = functools.partial(tables.measure, proxy_path=path, margin=margin)
            ensure_stage(run_dir, ppo_run_path(path, beta).stem, ppo_config, (sft_path, path),
                         functools.partial(snapshot_stage, name=ppo_run_path(path, beta).stem, proxy_path=path,
                                           measure=measure), config.fresh, progress)

    # 3. every proxy's exact curves, unless measured from these same checkpoints before (the
    # expensive part: the tables); Gao et al.'s forms through them and where they peak
    inputs = [sft_path] + [run for *_, path in proxies for run in (path, *(ppo_run_path(path, beta)
                                                                          for beta in config.ppo_betas))]
    key = json.loads(json.dumps({'settings': asdict(replace(config, fresh=False)), 'gold': gold_name,
                                 'betas': BETAS, 'best_of_n': BEST_OF_N,
                                 'inputs': {path.name: fingerprint(path) for path in inputs}}))
    curves = None if config.fresh else stored_curves(run_dir / 'overoptimisation.json', key)
    if curves is None:
        curves = [proxy_curves(tables, margin, path, config.ppo_betas) for _, margin, path in proxies]
    else:
        print(f'{run_dir / "overoptimisation.json"}: reusing the curves (measured from the same checkpoints)')
    results = [{'name': path.stem, 'pairs': pairs, 'margin': margin, 'curves': measured,
                'fits': fits(measured), 'peaks': peaks(measured)}
               for (pairs, margin, path), measured in zip(proxies, curves)]

    # 4. the figure and the report
    figure = plots.plot_overoptimisation(results, plots_dir / 'overoptimisation.png')
    write_json(run_dir / 'overoptimisation.json', {'key': key, 'proxies': results})
    write_text(run_dir / 'overoptimisation.md', report(results, config, figure, run_dir))
    print(peak_table(results))
    print(f'Report {run_dir / "overoptimisation.md"}, figure {figure}')
    return results


def proxy_curves(tables, margin, proxy_path, ppo_betas):
    """One proxy's exact curves: pi*_beta, best-of-n, and each PPO run's snapshots."""
    log_ref, rewards, values = tables.log_ref, tables.rewards(proxy_path), tables.values(proxy_path, margin)
    reference = expectations(log_ref, log_ref, values)
    return {'optimum': optimum_curve(log_ref, rewards, values, BETAS),
            'best_of_n': best_of_n_curve(log_ref, rewards, values, BEST_OF_N),
            **{f'ppo_beta{beta:g}': snapshot_curve(load_checkpoint(ppo_run_path(proxy_path, beta))['history'],
                                                   reference) for beta in ppo_betas}}


def stored_curves(path, key):
    """The curves in the study's JSON at path if they were measured with this key, else None."""
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(stored, dict) and stored.get('key') == key):
        return None
    return [proxy['curves'] for proxy in stored['proxies']]


def rl_points(curves):
    """Every point of the RL curves of a proxy: pi*_beta and all PPO snapshots, one curve."""
    rl = [curve for name, curve in curves.items() if name != 'best_of_n']
    return {key: [value for curve in rl for value in curve[key]] for key in ('kl', 'd', *MEASURED)}


def fits(curves):
    """Gao et al.'s forms through each gold curve: best-of-n's form through best-of-n, the RL form
    through pi*_beta alone and through pi*_beta with PPO's snapshots. {curve: {gold name: fit}}."""
    sources = {'best_of_n': (curves['best_of_n'], 'best_of_n'), 'optimum': (curves['optimum'], 'rl'),
               'rl_all': (rl_points(curves), 'rl')}
    return {source: {name: gao_fit(curve['d'], curve[name], form) for name in ('gold', 'gold_valid')}
            for source, (curve, form) in sources.items()}


def peaks(curves):
    """Where each curve's gold and valid gold peak: {curve: {gold name: peak}}."""
    return {source: {name: peak(curve, name) for name in ('gold', 'gold_valid')} for source, curve in curves.items()}


# ---------------------------------------------------------------------------------------------
# The report.

def peak_table(results):
    """One row per proxy and curve: where gold and valid gold peak and how far they fall after."""
    lines = ['| proxy | curve | gold: peak gain | at d (KL) | fall after | valid gold: peak gain | at d (KL) | '
             'fall after | proxy gain at largest d |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for result in results:
        for source, both in result['peaks'].items():
            curve = result['curves'][source]
            cells = [f"{p['gain']:+.3f} | {p['d']:.2f} ({p['kl']:.2f}) | {p['drop']:.3f}"
                     for p in (both['gold'], both['gold_valid'])]
            lines.append(f"| {result['name']} | {source} | {' | '.join(cells)} | "
                         f"{curve['proxy'][int(np.argmax(curve['d']))]:+.3f} |")
    return '\n'.join(lines)


def fit_table(results):
    """One row per proxy and fit: alpha, beta, RMS residual against the gold curve's range."""
    lines = ['| proxy | points | form | gold: alpha, beta, RMS | valid gold: alpha, beta, RMS |',
             '|---|---|---|---|---|']
    for result in results:
        for source, both in result['fits'].items():
            cells = [f"{fit['alpha']:.3f}, {fit['beta']:.3f}, {fit['rms']:.4f}" for fit in both.values()]
            lines.append(f"| {result['name']} | {source} | {both['gold']['form']} | {' | '.join(cells)} |")
    return '\n'.join(lines)


def report(results, config, figure, run_dir):
    relative_figure = Path(os.path.relpath(figure, run_dir)).as_posix()
    return f"""# Reward over-optimisation, measured exactly

Proxies: reward models from the run's SFT policy on {', '.join(f'{n:,}' for n in config.pairs)} labelled
pairs at gold margin {', '.join(f'{m:g}' for m in config.gold_margin)}; seed {config.seed}. Every point is
exact over all 10^4 responses of {config.prompts} prompts: d = sqrt(KL(pi || SFT)); gains over the SFT
policy; gold per unit of margin (gold: the preferred first digit; valid gold: that, and every digit in
the language); proxy divided by its labels' margin. Curves: `optimum` is pi*_beta of the proxy (beta
{max(BETAS):g} .. {min(b for b in BETAS if b > 0):g}, then 0), `best_of_n` n = 1 .. {max(BEST_OF_N):,},
`ppo_betaB` PPO snapshots every {config.snapshot_every} rounds.

## Where gold peaks

"fall after": how far the gain has fallen from its peak by the largest d of the curve (0: it never falls).

{peak_table(results)}

## Gao et al.'s forms, least squares on the gold curves

best_of_n: R(d) = d (alpha - beta d); rl: R(d) = d (alpha - beta log d), through pi*_beta (`optimum`)
and through pi*_beta with every PPO snapshot (`rl_all`). RMS: root mean square residual, in gold units.

{fit_table(results)}

![over-optimisation]({relative_figure})
"""
