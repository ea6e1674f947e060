"""KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024, arXiv 2402.01306), with TRL's defaults,
on the labelled pairs taken apart: each chosen response a desirable example, each rejected one an
undesirable example (unpaired), offline like DPO (train_on_pairs' loop and data).

With log ratios h_w = log pi/pi_ref (y_w), h_l = log pi/pi_ref (y_l) (sequence log-probs) and a
reference point z0, the loss of a batch is the mean over its 2B examples of
    desirable     lambda_D (1 - sigmoid(beta (h_w - z0)))
    undesirable   lambda_U (1 - sigmoid(beta (z0 - h_l)))
z0 estimates KL(pi || pi_ref): the mean log ratio, clamped at 0 and detached (no gradient flows
through the reference point). The value function saturates: an example far on the right side of z0
stops pulling, so unlike DPO's margin the log ratios do not grow without bound.

No closed-form target is known (the registry's target is None): z0 depends on pi itself and the
sigmoid is not the log-likelihood of a Bradley-Terry model, so the optimum is not pi* of any reward
derived here; it is compared with pi* all the same.

TRL's defaults (KTOConfig): beta 0.1, desirable_weight = undesirable_weight = 1, loss_type 'kto'.
Differs from TRL on purpose: TRL estimates z0 on mismatched pairs (each prompt with another example's
completion) gathered over the batch; here the pair loss sees only the batch's own responses, so z0 is
their mean log ratio, chosen and rejected together (clamped and detached as TRL). Learning rate and
schedule are DPO's (TRL's 1e-6 is for large language models).
"""
from dataclasses import dataclass

import torch

from toy_rlhf.flags import PositiveFloat
from toy_rlhf.methods.dpo import DPOConfig, train_on_pairs


@dataclass
class KTOConfig(DPOConfig):
    beta: PositiveFloat = 0.1  # TRL's default: the sharpness of KTO's value function
    desirable_weight: PositiveFloat = 1.0  # lambda_D, weight of the desirable (chosen) examples' losses
    undesirable_weight: PositiveFloat = 1.0  # lambda_U, weight of the undesirable (rejected) examples' losses


def kto_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
             desirable_weight=1.0, undesirable_weight=1.0):
    """KTO's loss over the chosen (desirable) and rejected (undesirable) responses of a batch, all
    sequence log-probs (B,) -> the loss (scalar) and the implicit rewards beta * log pi/pi_ref of
    the chosen and rejected responses (B,) each, detached, for the log."""
    chosen_log_ratios = policy_chosen - reference_chosen
    rejected_log_ratios = policy_rejected - reference_rejected
    z0 = torch.cat([chosen_log_ratios, rejected_log_ratios]).detach().mean().clamp(min=0)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (chosen_log_ratios - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rejected_log_ratios)))
    loss = torch.cat([desirable, undesirable]).mean()
    return loss, beta * chosen_log_ratios.detach(), beta * rejected_log_ratios.detach()


def train_kto(sft_policy, config, preference, progress=True):
    """Fine-tune a copy of sft_policy with KTO on the labelled pairs' responses, taken apart; the
    reference is sft_policy, unchanged. Returns the policy (eval mode) and the log (train_on_pairs)."""
    def pair_loss(*log_probs_and_beta):
        return kto_loss(*log_probs_and_beta, config.desirable_weight, config.undesirable_weight)
    return train_on_pairs(sft_policy, config, preference, pair_loss, 'KTO', progress)


def target(tables, config):
    """None: no closed-form target is known for KTO (see the module's docstring)."""
    return None
