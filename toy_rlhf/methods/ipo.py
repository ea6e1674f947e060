"""Identity preference optimisation (Azar et al. 2023, "A general theoretical paradigm to understand
learning from human preferences"): DPO's pairs and loop, with a squared loss that has a finite optimum
even when the labels are never wrong.

With h = log pi/pi_ref (y_w) - log pi/pi_ref (y_l) (sequence log-probs, summed over the four digits as
in the paper), the loss of a labelled pair is
    (h - 1 / (2 beta))^2,
beta playing the paper's tau. DPO's -log sigmoid(beta * h) falls for ever as h grows, so noiseless
labels push the margin without bound; IPO regresses h onto the constant 1 / (2 beta) instead.

Target, for a gold reward r of two levels, 0 and 1 (first-digit, last-digit, distinct). The labeler
chooses y over y' with probability p = sigmoid(m (r(y) - r(y'))), m the gold margin, whatever source
the pair came from (toy_rlhf.data.PreferenceDataset). Write D = h(y, y'). The expected loss of a pair,
p (D - c)^2 + (1 - p) (-D - c)^2 with c = 1 / (2 beta), is smallest at D = (2p - 1) c: at
    D = (2 sigmoid(m) - 1) / (2 beta) = tanh(m / 2) / (2 beta) =: delta
where r(y) = 1 and r(y') = 0, at -delta the other way round, at 0 for a tie. So log pi/pi_ref = delta
* r + a constant of the prompt puts every pair at its minimum at once, and minimises the expected
loss over the data. That is all the data determines: responses no pair contains (for the first-digit
pairs, later digits off the rule and first digits the rule does not allow) may have any probability,
and so may the per-prompt constant. (A finite set of pairs determines even less; the network's
generalisation fills the rest in.) The target taken here,
    pi_IPO(y | x) = pi_ref(y | x) exp(delta * r(x, y)) / Z(x),
is the maximiser of Azar et al.'s regularised objective E_{y~pi, y'~mu}[p(y > y')] - beta KL(pi || pi_ref)
(their Psi = identity), mu the data's responses and p the gold labeller: whatever mu, a response at
level 1 wins against it s - 1/2 more often than one at level 0 (s = sigmoid(m)), delta * beta apart.
It minimises the expected loss, but is not the policy of least KL(pi || pi_ref) that does: that one
gives the unpaired responses a log-ratio between those of the two levels, weighted by pi's mass on
each. pi_IPO is pi* of a gold reward of margin beta * delta = tanh(m / 2) / 2 <= 1/2 whatever m: at
the default m = 20 and beta = 1, delta = 0.5 nats of log-odds of the preferred first digit (for
first-digit), where pi* of the gold reward moves them by m / beta = 20. A gold reward of more levels
(digit-sum) has in general no target of this form: the pairs' minima tanh(m (r(y) - r(y')) / 2) /
(2 beta) are not the differences of one function of the response, so ipo_target refuses it.

Differs from TRL (loss_type="ipo"): TRL averages the log-probs over tokens (since PR #1265), so its
h is ours / 4 and its loss (h / 4 - 1 / (2 beta))^2 = (h - 1 / (2 beta / 4))^2 / 16: IPO with
tau = beta / 4, the gradient scaled by 1/16. Summed log-probs keep beta the paper's tau.
"""
import math
from dataclasses import dataclass

from toy_rlhf.flags import PositiveFloat, PositiveInt
from toy_rlhf.methods.dpo import DPOConfig, train_on_pairs
from toy_rlhf.optimal import digit_distribution, gold_table


@dataclass
class IPOConfig(DPOConfig):
    # 1, as DPO's and PPO's, for the comparison. On IPO's scale that is weak: the target raises the
    # log-odds of the gold reward's upper level by tanh(gold_margin / 2) / (2 beta) = 0.5 nats.
    beta: PositiveFloat = 1.0  # the paper's tau, the KL strength of IPO's objective
    # Doubling the steps left the KL to the target where it was: the squared loss settles sooner
    # than DPO's, whose margin keeps growing.
    iters: PositiveInt = 200  # optimizer steps


# ---------------------------------------------------------------------------------------------
# The math.

def ipo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """The IPO loss, (h - 1 / (2 beta))^2 with h = log pi/pi_ref (y_w) - log pi/pi_ref (y_l), averaged.

    All inputs: sequence log-probs (B,)  ->  the loss (scalar) and, as dpo_loss gives them for the
    log, the implicit rewards beta * log pi/pi_ref of the chosen and rejected responses, (B,) each and
    detached.
    """
    chosen_log_ratios = policy_chosen - reference_chosen
    rejected_log_ratios = policy_rejected - reference_rejected
    h = chosen_log_ratios - rejected_log_ratios
    loss = ((h - 1 / (2 * beta)) ** 2).mean()
    return loss, beta * chosen_log_ratios.detach(), beta * rejected_log_ratios.detach()


def ipo_margin(config):
    """delta = (2 sigmoid(m) - 1) / (2 beta) = tanh(m / 2) / (2 beta): the log-ratio gap between the
    responses at the gold reward's level 1 and those at level 0 at the minimum of the expected loss."""
    return math.tanh(config.gold_margin / 2) / (2 * config.beta)


# ---------------------------------------------------------------------------------------------
# The loop and the target.

def train_ipo(sft_policy, config, preference, progress=True):
    """Fine-tune a copy of sft_policy on labelled pairs with IPO at config.beta; sft_policy is the
    reference and is not changed. Returns the policy (eval mode) and the log (see train_on_pairs)."""
    return train_on_pairs(sft_policy, config, preference, ipo_loss, 'IPO', progress)


def ipo_target(tables, config):
    """pi_IPO = pi_ref exp(delta * r) / Z, the distribution IPO aims at (see the module's docstring),
    r the gold reward of the tables' preference: tables, a toy_rlhf.optimal.ExactTables -> log-probs
    (P, 10^4). Derived for a gold reward of the two levels 0 and 1 only (first-digit, last-digit,
    distinct): for any other, None (no exact target is known)."""
    gold = gold_table(tables.prompts, tables.preference, 1.0)  # (P, 10^4): the gold reward itself
    if not ((gold == 0) | (gold == 1)).all():
        return None
    return digit_distribution(tables.log_ref + ipo_margin(config) * gold)
