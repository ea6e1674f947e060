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
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mingpt.utils import set_seed
from toy_rlhf.data import PreferenceDataset
from toy_rlhf.language import PROMPT_LENGTH, RESPONSE_LENGTH, join
from toy_rlhf.metrics import preferred_probability
from toy_rlhf.policy import token_log_probs
from toy_rlhf.reward import RewardConfig
from toy_rlhf.training import (check_finite, gradient_step, learning_rate_at, progress_bar,
                               set_learning_rate)


@dataclass
class DPOConfig:
    # KL strength of the objective DPO solves, the same beta as PPO's penalty; smaller lets the policy
    # move further from the reference. 1, as PPO's default, so the two methods can be compared.
    beta: float = 1.0
    pairs: int = RewardConfig.pairs  # labelled pairs in the training set (the "human" data, finite)
    # From the default SFT policy the preference rate is 0.993 after 100 steps and 0.999 from 200 on;
    # 400 (~10 s on one core) also brings a weaker SFT policy to its plateau.
    iters: int = 400  # optimizer steps
    batch_size: int = 64  # pairs per step
    # Peak Adam step size, after warm-up, then cosine-decayed to 0. 1e-4 ends a little short of the
    # plateau (preference 0.9975); 1e-3 reaches it but moves the later digits too (KL 1.32 vs 1.25).
    learning_rate: float = 3e-4
    warmup_iters: int = 20
    max_grad_norm: float = 1.0  # gradient-norm clip
    # The labeler's margin, as RewardConfig.gold_margin: at 20 a label is wrong with probability 2e-9.
    # The same default (and seed) as the reward model's, so both learn from the very same labels.
    gold_margin: float = RewardConfig.gold_margin
    seed: int = 0
    device: str = 'cpu'
    log_every: int = 10  # iterations between rows of the log


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
    """log pi_ref of every accepted and of every rejected response in `pairs`: two (N,) tensors.
    The reference is frozen, so these are constants of the whole run."""
    chosen, rejected = [], []
    for index in torch.arange(len(pairs)).split(batch_size):
        context, accepted, other = pairs[index]
        chosen.append(sequence_log_probs(reference, context, accepted))
        rejected.append(sequence_log_probs(reference, context, other))
    return torch.cat(chosen), torch.cat(rejected)


def train_dpo(sft_policy, config, progress=True):
    """Fine-tune a copy of sft_policy on labelled pairs with DPO at config.beta; sft_policy is the
    reference and is not changed.

    Returns the policy (eval mode) and the log: a list of dicts with TRL's metric names (implicit
    rewards beta * log pi/pi_ref of chosen and rejected responses, their margin and accuracy, the
    policy's sequence log-probs) and the exact probability of the preferred first digit on the batch.
    """
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    pairs = PreferenceDataset(config.pairs, config.gold_margin, seed=config.seed)
    reference = sft_policy.eval()
    reference_chosen, reference_rejected = reference_log_probs(reference, pairs)
    # requires_grad_ because the SFT policy may have been frozen as another run's reference.
    policy = copy.deepcopy(sft_policy).requires_grad_(True).to(config.device)
    # No weight decay: it would pull the weights towards 0, not towards the reference.
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)

    history = []
    bar = progress_bar(config.iters, f'DPO beta={config.beta:g}', progress)
    policy.train()
    for step in range(config.iters):
        set_learning_rate(optimizer, learning_rate_at(step, config.iters, config.learning_rate,
                                                      config.warmup_iters))
        batch = torch.randint(len(pairs), (config.batch_size,), generator=generator)
        context, chosen, rejected = (tensor.to(config.device) for tensor in pairs[batch])
        # Chosen and rejected responses share one forward pass: (2B, 5) + (2B, 5) -> (2B,).
        policy_chosen, policy_rejected = sequence_log_probs(
            policy, torch.cat([context, context]), torch.cat([chosen, rejected])).chunk(2)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, reference_chosen[batch].to(config.device),
            reference_rejected[batch].to(config.device), config.beta)
        check_finite('dpo', step, loss=loss.detach())
        gradient_step(optimizer, loss, policy, config.max_grad_norm)
        if step % config.log_every == 0 or step == config.iters - 1:
            margins = chosen_rewards - rejected_rewards
            row = {'iter': step, 'loss': loss.item(),
                   'rewards/chosen': chosen_rewards.mean().item(),
                   'rewards/rejected': rejected_rewards.mean().item(),
                   'rewards/margins': margins.mean().item(),
                   'rewards/accuracies': (margins > 0).float().mean().item(),
                   'logps/chosen': policy_chosen.mean().item(),
                   'logps/rejected': policy_rejected.mean().item(),
                   'gold/preference_rate': first_digit_preference(policy, context[:, :PROMPT_LENGTH]),
                   'lr': optimizer.param_groups[0]['lr']}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.2f}",
                            pref=f"{row['gold/preference_rate']:.3f}")
        bar.update(1)
    bar.close()
    return policy.eval(), history


@torch.no_grad()
def first_digit_preference(policy, prompts):
    """The policy's mean probability of the preferred first digit on prompts (B, 4): exact per prompt."""
    context = join(prompts)
    log_probs = policy(context)[0][:, -1:].log_softmax(dim=-1)  # (B, 1, V): the first response position
    return preferred_probability(log_probs, context).mean().item()
