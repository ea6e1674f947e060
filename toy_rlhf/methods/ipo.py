"""Identity preference optimisation (Azar et al. 2023, "A general theoretical paradigm to understand
learning from human preferences"): DPO's pairs and loop, with a squared loss that has a finite optimum
even when the labels are never wrong.

With h = log pi/pi_ref (y_w) - log pi/pi_ref (y_l) (sequence log-probs, summed over the four digits as
in the paper), the loss of a labelled pair is
    (h - 1 / (2 beta))^2,
beta playing the paper's tau. DPO's -log sigmoid(beta * h) falls for ever as h grows, so noiseless
labels push the margin without bound; IPO regresses h onto the constant 1 / (2 beta) instead.

Target. Our pairs (toy_rlhf.data.PreferenceDataset) are always one response g with the preferred
first digit and one response b with another first digit the rule allows, both with valid later
digits; g is chosen with probability s = sigmoid(m), m the gold margin. Write D = h(g, b). The
expected loss of a pair, s (D - c)^2 + (1 - s) (-D - c)^2 with c = 1 / (2 beta), is smallest at
    D = (2s - 1) c = (2 sigmoid(m) - 1) / (2 beta) = tanh(m / 2) / (2 beta) =: delta,
and since any g of a prompt may be paired with any b, the expected loss over the data is minimised
exactly when log pi/pi_ref is constant on the g's and constant on the b's, delta apart. That is all
the data determines: responses no pair contains (later digits off the rule, first digits the rule
does not allow) may have any probability, and so may the per-prompt constant. (A finite set of pairs
determines even less; the network's generalisation fills the rest in.) The target taken here,
    pi_IPO(y | x) = pi_ref(y | x) exp(delta * 1[y1 preferred]) / Z(x),
is the maximiser of Azar et al.'s regularised objective E_{y~pi, y'~mu}[p(y > y')] - beta KL(pi || pi_ref)
(their Psi = identity), mu the data's responses (half g, half b) and p the gold labeller: the win rate
against mu is s/2 + 1/4 for every response with the preferred first digit and (1 - s)/2 + 1/4 for every
other one, delta * beta apart. It minimises the expected loss, but is not the policy of least
KL(pi || pi_ref) that does: that one gives the unpaired responses a log-ratio between those of b and
g, weighted by pi's mass on each. pi_IPO is pi* of a gold reward of margin beta * delta = tanh(m / 2) / 2
<= 1/2 whatever m: at the default m = 20 and beta = 1, delta = 0.5 nats of log-odds of the preferred
first digit, where pi* of the gold reward moves them by m / beta = 20.

Differs from TRL (loss_type="ipo"): TRL averages the log-probs over tokens (since PR #1265), so its
h is ours / 4 and its loss (h / 4 - 1 / (2 beta))^2 = (h - 1 / (2 beta / 4))^2 / 16: IPO with
tau = beta / 4, the gradient scaled by 1/16. Summed log-probs keep beta the paper's tau.
"""
import math
from dataclasses import dataclass

from toy_rlhf.flags import PositiveFloat, PositiveInt
from toy_rlhf.methods.dpo import DPOConfig, train_on_pairs
from toy_rlhf.optimal import digit_distribution


@dataclass
class IPOConfig(DPOConfig):
    # 1, as DPO's and PPO's, for the comparison. On IPO's scale that is weak: the target raises the
    # log-odds of the preferred first digit by tanh(gold_margin / 2) / (2 beta) = 0.5 nats.
    beta: PositiveFloat = 1.0  # the paper's tau, the KL strength of IPO's objective
    # From the short SFT policy the KL to the target (20 prompts) was 0.0035 nats after 200 steps and
    # after 400 at beta = 1, and 0.058 and 0.054 at beta = 0.1: the squared loss settles sooner than
    # DPO's, whose margin keeps growing.
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
    responses with the preferred first digit and the others at the minimum of the expected loss."""
    return math.tanh(config.gold_margin / 2) / (2 * config.beta)


# ---------------------------------------------------------------------------------------------
# The loop and the target.

def train_ipo(sft_policy, config, progress=True):
    """Fine-tune a copy of sft_policy on labelled pairs with IPO at config.beta; sft_policy is the
    reference and is not changed. Returns the policy (eval mode) and the log (see train_on_pairs)."""
    return train_on_pairs(sft_policy, config, ipo_loss, 'IPO', progress)


def ipo_target(tables, config):
    """pi_IPO = pi_ref exp(delta * 1[y1 preferred]) / Z, the distribution IPO aims at (see the module's
    docstring): tables, a toy_rlhf.optimal.ExactTables -> log-probs (P, 10^4)."""
    preferred = tables.gold(1.0)  # the gold reward at margin 1: 1 where y1 is the preferred digit, else 0
    return digit_distribution(tables.log_ref + ipo_margin(config) * preferred)
