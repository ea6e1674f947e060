"""The exact tables and curves of reward over-optimisation, and Gao et al.'s forms fitted to them:
the over-optimisation study's math (toy_rlhf.studies.overoptimisation).

A curve is a list of points, each a distribution measured over all 10^4 responses of the evaluation
prompts: its KL from the reference, d = sqrt(KL), and the expected proxy, gold and valid gold as
gains over the reference. Gao, Schulman and Hilton (2022, arXiv 2210.10760) fit
R(d) = d (alpha - beta d) to best-of-n and R(d) = d (alpha - beta log d) to RL; both are linear in
(alpha, beta), so a fit is least squares.
"""
import functools
import math

import numpy as np
import torch

from toy_rlhf.checkpoint import load_model
from toy_rlhf.language import is_valid_output
from toy_rlhf.methods.best_of_n import cumulative_masses, level_kl, level_log_probs, reward_levels, textbook_kl
from toy_rlhf.enumeration import all_responses, all_response_log_probs, all_response_rewards
from toy_rlhf.optimal import digit_distribution, optimal_log_probs, response_kl

MEASURED = ('proxy', 'gold', 'gold_valid')  # the expectations every point of a curve has


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
        return all_response_log_probs(load_model(self.sft_path, 'policy'), self.prompts)

    @functools.cached_property
    def gold_and_valid(self):
        return gold_tables(self.gold, self.prompts)

    def keep_rewards(self, proxy_path, rewards):
        """The proxy's scores of every response, computed elsewhere (where it trained)."""
        self._rewards[proxy_path] = rewards

    def rewards(self, proxy_path):
        if proxy_path not in self._rewards:
            self._rewards[proxy_path] = all_response_rewards(load_model(proxy_path, 'reward'), self.prompts)
        return self._rewards[proxy_path]

    def values(self, proxy_path, margin):
        """The tables every point measures: proxy / margin, gold, gold on valid responses only."""
        gold, valid = self.gold_and_valid
        return {'proxy': self.rewards(proxy_path) / margin, 'gold': gold, 'gold_valid': gold * valid}


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


def rl_points(curves):
    """Every point of the RL curves of a proxy: pi*_beta and every snapshot of the method's runs, one curve."""
    rl = [curve for name, curve in curves.items() if name != 'best_of_n']
    return {key: [value for curve in rl for value in curve[key]] for key in ('kl', 'd', *MEASURED)}


def fits(curves):
    """Gao et al.'s forms through each gold curve: best-of-n's form through best-of-n, the RL form
    through pi*_beta alone and through pi*_beta with the method's snapshots. {curve: {gold name: fit}}."""
    sources = {'best_of_n': (curves['best_of_n'], 'best_of_n'), 'optimum': (curves['optimum'], 'rl'),
               'rl_all': (rl_points(curves), 'rl')}
    return {source: {name: gao_fit(curve['d'], curve[name], form) for name in ('gold', 'gold_valid')}
            for source, (curve, form) in sources.items()}


def peaks(curves):
    """Where each curve's gold and valid gold peak: {curve: {gold name: peak}}."""
    return {source: {name: peak(curve, name) for name in ('gold', 'gold_valid')} for source, curve in curves.items()}
