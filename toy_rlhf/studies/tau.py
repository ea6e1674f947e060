"""tau is not beta: the preference game's equilibrium pi_tau against pi* of the KL-regularised
objective, over one range of strengths, exactly.

Nash-MD (and every method that solves the regularised preference game) takes a KL strength tau on a
payoff in [0, 1], a win probability; RLHF's beta weighs a reward model's score, whatever its scale.
The same number is not the same strength, and the two families are not the same set of policies
(toy_rlhf/methods/nash_md.py). For one run (its SFT policy, reward model and preference), on held-out
prompts, for each strength s of a grid:
- pi*_s = pi_ref exp(r / s) / Z and the equilibrium pi_tau at tau = s (nash_md.nash_equilibrium),
  each measured exactly: KL to the reference, the reward model's mean score, the preference rate;
- Nash-MD trained at its default tau (or reused from the run folder), placed exactly: its KL from
  pi_tau, and from pi* of the same KL to the reference (the beta at which pi*'s KL equals the
  policy's, found by bisection), to say which of the two it lands nearer.
Writes tau.md and tau.json into the run folder and tau.png into its plots: `toy-rlhf tau`.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from toy_rlhf import figures
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.flags import ExactPrompts, PositiveFloat, Seed
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.nash_md import nash_equilibrium
from toy_rlhf.optimal import distribution_summary, optimal_log_probs, response_kl
from toy_rlhf.run import Run, Variant
from toy_rlhf.studies.output import markdown_table, write_study


@dataclass
class TauConfig:
    strengths: tuple[PositiveFloat, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # beta and tau values
    prompts: ExactPrompts = 100  # held-out prompts of every measurement (each: all 10^4 responses)
    seed: Seed = 0  # seed of Nash-MD's training; the held-out prompts are drawn with seed + 1000
    preference: str = ''  # the run's (its reward model's); name it only if it is module:function, imported only when named


# ---------------------------------------------------------------------------------------------
# The measurements, as pure functions of (P, 10^4) tables.

def mean_kl(log_p, log_q):
    """KL(p || q) of whole responses, mean over prompts."""
    return response_kl(log_p, log_q).mean().item()


def matching_beta(log_ref, rewards, kl, low=1e-3, high=1e3, steps=60):
    """The beta at which pi*'s mean KL to the reference is `kl`: pi*'s KL falls as beta grows, so a
    bisection on log beta. Clamped to [low, high] where the KL is out of that range's reach."""
    for _ in range(steps):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if mean_kl(optimal_log_probs(log_ref, rewards, middle), log_ref) > kl else (low, middle)
    return math.sqrt(low * high)


def strength_rows(tables, strengths):
    """For each strength s: pi*_s and pi_tau at tau = s, each {'kl_total', 'reward', 'preference_rate', ...}."""
    t = tables
    rows = []
    for strength in strengths:
        row = {'strength': strength}
        for name, log_pi in (('optimal', optimal_log_probs(t.log_ref, t.rewards, strength)),
                             ('nash', nash_equilibrium(t.log_ref, t.rewards, strength))):
            row[name] = distribution_summary(log_pi, t.log_ref, t.rewards, t.prompts, t.preference)
        rows.append(row)
    return rows


def placement(log_pi, tables, tau):
    """Where a trained policy lands: its KL from pi_tau, and from pi* of its own KL to the reference."""
    t = tables
    kl = mean_kl(log_pi, t.log_ref)
    beta = matching_beta(t.log_ref, t.rewards, kl)
    return {'tau': tau, 'kl_total': kl, 'matching_beta': beta,
            'kl_from_nash': mean_kl(log_pi, nash_equilibrium(t.log_ref, t.rewards, tau)),
            'kl_from_optimum_of_its_kl': mean_kl(log_pi, optimal_log_probs(t.log_ref, t.rewards, beta))}


# ---------------------------------------------------------------------------------------------
# The study.

def tau_study(run_dir, plots_dir, config, progress=True):
    """pi*_beta and pi_tau over config.strengths, and Nash-MD placed between them, on the run (an
    empty run folder gets its SFT policy and reward model first); writes run_dir/tau.md and .json and
    plots_dir/tau.png; returns the record."""
    run = Run(run_dir, config.preference, progress=progress).build(config.seed)
    tables = run.tables(sample_prompts(config.prompts, torch.Generator().manual_seed(config.seed + 1_000)))
    variant = Variant('nash_md', beta=METHODS['nash_md'].config().beta, seed=config.seed)
    run.train([variant])
    nash_md = placement(all_response_log_probs(run.policy(variant), tables.prompts), tables, variant.beta)
    record = {'preference': run.preference.name, 'settings': asdict(config),
              'rows': strength_rows(tables, config.strengths), 'nash_md': nash_md}
    figure = plot_tau(record, Path(plots_dir) / 'tau.png')
    report = write_study(run.folder, 'tau', tau_report(record), record, figure)
    print(f'tau against beta: {report}, {figure}')
    return record


# ---------------------------------------------------------------------------------------------
# The table and the figure.

def tau_report(record):
    header = ['strength', 'pi*: KL to reference', 'pi*: reward', 'pi*: preference rate',
              'pi_tau: KL to reference', 'pi_tau: reward', 'pi_tau: preference rate']
    rows = [[f"{row['strength']:g}", *[f"{row[name][key]:{spec}}" for name in ('optimal', 'nash')
                                         for key, spec in (('kl_total', '.4f'), ('reward', '.3f'),
                                                           ('preference_rate', '.2%'))]]
            for row in record['rows']]
    placed = record['nash_md']
    return (f"# tau is not beta: pi_tau against pi* on {record['preference']}\n\n"
            f"Each policy exact over all 10^4 responses of {record['settings']['prompts']} held-out prompts; "
            "strength: beta for pi*, tau for pi_tau.\n\n" + markdown_table(header, rows) + '\n\n'
            f"Nash-MD trained at tau = {placed['tau']:g} (its defaults): KL to the reference "
            f"{placed['kl_total']:.4f}; {placed['kl_from_nash']:.4f} nats from pi_tau, "
            f"{placed['kl_from_optimum_of_its_kl']:.4f} from pi* of the same KL (beta = {placed['matching_beta']:.3g}).\n")


def plot_tau(record, path):
    """Left: KL to the reference against the strength, one curve per family. Right: the preference
    rate against that KL, the set of policies each family traces, Nash-MD's trained policy on it."""
    rows = record['rows']
    families = (('optimal', 'pi*, strength beta', '#1f77b4'), ('nash', 'pi_tau, strength tau', '#393b79'))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), layout='constrained')
    for name, label, color in families:
        kl = [row[name]['kl_total'] for row in rows]
        marker = 'o' if name == 'optimal' else 's'
        left.plot([row['strength'] for row in rows], kl, marker=marker, color=color, label=label)
        right.plot(kl, [row[name]['preference_rate'] for row in rows], marker=marker, color=color, label=label)
    placed = record['nash_md']
    right.axvline(placed['kl_total'], color='grey', linestyle=':', linewidth=1,
                  label=f"Nash-MD trained at tau={placed['tau']:g}: its KL")
    left.set(xscale='log', xlabel='strength (beta or tau)', ylabel='KL to the reference (nats)',
             title='the same number is not the same strength')
    right.set(xlabel='KL to the reference (nats)', ylabel='preference rate', title='what each family buys with its KL')
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"tau is not beta: pi_tau against pi* on {record['preference']}, exact")
    return figures.save(fig, path)
