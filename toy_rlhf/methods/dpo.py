"""Direct preference optimisation (Rafailov et al. 2023): the KL-regularised RLHF objective solved on
the labelled pairs themselves, with no reward model and no sampling.

The objective PPO maximises, E[r(x, y)] - beta * KL(pi || pi_ref), has the optimum
    pi*(y | x) = pi_ref(y | x) exp(r(x, y) / beta) / Z(x),  so  r(x, y) = beta log pi*/pi_ref + beta log Z(x).
Put into the Bradley-Terry likelihood of a label (y_w chosen over y_l), Z(x) cancels:
    P(y_w > y_l) = sigmoid(beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l)),
and the policy is fitted by maximum likelihood of the labels. beta * log pi/pi_ref is the policy's
implicit reward.

Policy: a copy of the SFT policy, trained. Reference: the SFT policy, frozen; its log-probs of every
pair are computed once. Each iteration: a minibatch of pairs -> the policy's sequence log-probs of
both responses -> the DPO loss -> a gradient-norm-clipped Adam step.

With labels drawn at gold margin m (each right with probability sigmoid(m)), the expected loss of a
pair is smallest where the implicit reward of its preferred response exceeds the other's by m: the RL
optimum for a gold reward of m. At the
default m = 20 no label in the data set is wrong, so the loss only approaches 0 as the margin grows
without bound: DPO on noiseless labels has no finite optimum, and the longer it trains the further the
margin grows, past where the KL-regularised optimum would stop (at beta = 10) or, at small beta, off
the language. A small gold margin (noisy labels) gives a finite target.
"""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from toy_rlhf.data import PreferenceDataset
from toy_rlhf.flags import BatchSize, Device, PositiveFloat, PositiveInt, Seed
from toy_rlhf.language import PROMPT_LENGTH, RESPONSE_LENGTH
from toy_rlhf.methods.rollout import TrainingLog, start_training
from toy_rlhf.optimal import gold_table, optimal_log_probs
from toy_rlhf.policy import token_log_probs
from toy_rlhf.reward import RewardConfig
from toy_rlhf.training import check_finite, gradient_step, learning_rate_at, set_learning_rate


@dataclass
class DPOConfig:
    # 1, as PPO's default, so the two methods can be compared; smaller lets the policy move further.
    beta: PositiveFloat = 1.0  # KL strength of the objective DPO solves, the same beta as PPO's penalty
    pairs: PositiveInt = RewardConfig.pairs  # labelled pairs in the training set (the "human" data, finite)
    # From the default SFT policy the preference rate plateaus well within this; 400 also brings a
    # weaker SFT policy to its plateau.
    iters: PositiveInt = 400  # optimizer steps
    batch_size: BatchSize = 64  # pairs per step
    # 1e-4 ends a little short of the plateau; 1e-3 reaches it but moves the later digits too.
    learning_rate: PositiveFloat = 3e-4  # peak Adam step size, after warm-up, then cosine-decayed to 0
    warmup_iters: PositiveInt = 20  # steps of linear warm-up
    max_grad_norm: PositiveFloat = 1.0  # gradient-norm clip
    # The same default (and seed) as the reward model's, so both learn from the very same labels.
    gold_margin: PositiveFloat = RewardConfig.gold_margin  # the labeler's margin: smaller means noisier labels
    pair_source: Literal['default', 'language', 'sft', 'aligned'] = 'default'  # where pairs come from (RewardConfig)
    seed: Seed = 0  # random seed: the same seed gives the same run
    device: Device = 'cpu'  # where the policy trains
    log_every: PositiveInt = 10  # iterations between rows of the log


# ---------------------------------------------------------------------------------------------
# The math.

def sequence_log_probs(model, context, responses):
    """log pi(y | x) of whole responses by teacher forcing: the sum of the four digits' log-probs.

    context: (B, 5) prompt + SEP; responses: (B, 4) digits, or (B, 5) with the CLS the preference
    data appends for the reward model (dropped)  ->  (B,)
    """
    sequences = torch.cat([context, responses[:, :RESPONSE_LENGTH]], dim=1)  # (B, 9)
    return token_log_probs(model, sequences).sum(dim=1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """The DPO loss, -log sigmoid(beta * (log pi/pi_ref (y_w) - log pi/pi_ref (y_l))), averaged.

    All inputs: sequence log-probs (B,)  ->  the loss (scalar) and the implicit rewards of the chosen
    and rejected responses, beta * log pi/pi_ref, (B,) each and detached (for the log). The reference
    log-probs enter as constants: only the policy is fitted.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


# ---------------------------------------------------------------------------------------------
# The loop.

@torch.no_grad()
def reference_log_probs(reference, pairs, batch_size=4096):
    """log pi_ref of every chosen and of every rejected response in `pairs`: two (N,) tensors.
    The reference is frozen, so these are constants of the whole run."""
    chosen, rejected = [], []
    for index in torch.arange(len(pairs)).split(batch_size):
        context, chosen_responses, rejected_responses = pairs[index]
        chosen.append(sequence_log_probs(reference, context, chosen_responses))
        rejected.append(sequence_log_probs(reference, context, rejected_responses))
    return torch.cat(chosen), torch.cat(rejected)


def train_dpo(sft_policy, config, preference, progress=True):
    """Fine-tune a copy of sft_policy on labelled pairs with DPO at config.beta; sft_policy is the
    reference and is not changed. Returns the policy (eval mode) and the log (see train_on_pairs)."""
    return train_on_pairs(sft_policy, config, preference, dpo_loss, 'DPO', progress)


def train_on_pairs(sft_policy, config, preference, pair_loss, name, progress=True):
    """Fit a copy of sft_policy to a fixed set of labelled pairs by minimising
    pair_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta) -> (loss,
    implicit chosen rewards, implicit rejected rewards) over minibatches of pairs.

    Returns the policy (eval mode) and the log: a list of dicts with TRL's metric names (implicit
    rewards beta * log pi/pi_ref of chosen and rejected responses, their margin and accuracy, the
    policy's sequence log-probs), the pairs consumed so far, and the policy's rate of the
    preference's best gold level on the batch's prompts (best_level_share).
    """
    # The reference is frozen, no gradient reaches it; requires_grad_ in start_training because the
    # SFT policy may have been frozen as another run's reference.
    policy, reference, optimizer, generator = start_training(sft_policy, config)
    pairs = PreferenceDataset(config.pairs, config.gold_margin, config.seed, preference, config.pair_source, sft_policy)
    reference_chosen, reference_rejected = reference_log_probs(reference, pairs)
    # Adam without weight decay: decay would pull the weights towards 0, not towards the reference.
    policy = policy.to(config.device)  # in place: the optimizer keeps the same parameters

    with TrainingLog(config.iters, f'{name} beta={config.beta:g}', progress,
                     shown=('loss', 'rewards/margins', 'gold/preference_rate')) as log:
        for step in range(config.iters):
            set_learning_rate(optimizer, learning_rate_at(step, config.iters, config.learning_rate,
                                                          config.warmup_iters))
            batch = torch.randint(len(pairs), (config.batch_size,), generator=generator)
            context, chosen, rejected = (tensor.to(config.device) for tensor in pairs[batch])
            # Chosen and rejected responses share one forward pass: (2B, 5) + (2B, 5) -> (2B,).
            policy_chosen, policy_rejected = sequence_log_probs(
                policy, torch.cat([context, context]), torch.cat([chosen, rejected])).chunk(2)
            loss, chosen_rewards, rejected_rewards = pair_loss(
                policy_chosen, policy_rejected, reference_chosen[batch].to(config.device),
                reference_rejected[batch].to(config.device), config.beta)
            check_finite(name.lower(), step, loss=loss.detach())
            gradient_step(optimizer, loss, policy, config.max_grad_norm)
            if step % config.log_every == 0 or step == config.iters - 1:
                margins = chosen_rewards - rejected_rewards
                log.add({'iter': step, 'pairs': (step + 1) * config.batch_size, 'loss': loss.item(),
                         'rewards/chosen': chosen_rewards.mean().item(),
                         'rewards/rejected': rejected_rewards.mean().item(),
                         'rewards/margins': margins.mean().item(),
                         'rewards/accuracies': (margins > 0).float().mean().item(),
                         'logps/chosen': policy_chosen.mean().item(),
                         'logps/rejected': policy_rejected.mean().item(),
                         'gold/preference_rate': best_level_share(policy, context[:, :PROMPT_LENGTH], preference,
                                                                  step),
                         'lr': optimizer.param_groups[0]['lr']})
            log.step()
    return policy.eval(), log.rows


def best_level_share(policy, prompts, preference, step):
    """The policy's mean rate of the preference's best gold level on prompts (B, 4)
    (Preference.policy_best_level_rate: for first-digit, exact per prompt). Anything it samples is
    drawn with a generator of its own, seeded by `step`, so the log does not change the training's
    random numbers."""
    generator = torch.Generator(device=prompts.device).manual_seed(step)
    return preference.policy_best_level_rate(policy, prompts, generator).mean().item()


def gold_optimum(tables, config):
    """The exact distribution DPO converges to: pi* of the labeler's gold reward (the tables'
    preference, config's margin) at config.beta (DPO never sees the reward model; its labels come from the
    gold reward). tables: toy_rlhf.optimal.ExactTables -> log-probs (P, 10^4)."""
    gold = gold_table(tables.prompts, tables.preference, config.gold_margin)
    return optimal_log_probs(tables.log_ref, gold, config.beta)
