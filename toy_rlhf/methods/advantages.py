"""The advantage estimators and the clipped surrogate of the online methods: pure functions of tensors,
each unit-tested with hand-computed values (tests/test_ppo.py, test_rloo.py, test_grpo.py, test_reinforce_pp.py).

A method turns a rollout (rollout.py) into advantages with these; PPO, RLOO, REINFORCE++ and GRPO then
update the policy through the clipped surrogate.
"""
import torch


def returns_to_go(rewards):
    """Undiscounted return from each token to the end: G_t = sum_{t' >= t} r_t'. (B, T) -> (B, T)."""
    return rewards.flip(1).cumsum(1).flip(1)


def leave_one_out_advantages(returns, samples_per_prompt):
    """Each sample's return minus the mean return of the other samples of the same prompt.

    returns: (P * K, ...), the K samples of a prompt adjacent -> the same shape. The baseline does not
    depend on the sample's own actions, so the policy gradient stays unbiased; it removes the
    prompt's difficulty from the signal without a critic network.
    """
    K = samples_per_prompt
    grouped = returns.view(-1, K, *returns.shape[1:])
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (K - 1)
    return (grouped - others_mean).view_as(returns)


def group_normalised_advantages(scores, samples_per_prompt, scale):
    """GRPO's advantages: (r - mean of the prompt's group) / spread, scores (P * K,) -> (P * K,).

    scale: 'group' divides by the group's standard deviation (Bessel-corrected, + 1e-4 as TRL), 'batch'
    by the whole batch's, 'none' not at all (Dr. GRPO). Dividing by the group's spread weights each
    prompt by how much its rewards vary, not by how much is at stake.
    """
    grouped = scores.view(-1, samples_per_prompt)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == 'group':
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale == 'batch':
        centred = centred / (scores.std() + 1e-4)
    elif scale != 'none':
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred.view_as(scores)


def whiten(x):
    """Shift and scale to mean 0, standard deviation 1: keeps the step size independent of the
    reward scale (and of beta)."""
    return (x - x.mean()) / (x.std() + 1e-8)


def gae_advantages(rewards, values, gae_lambda):
    """Generalised advantage estimation with gamma = 1: A_t = sum_k lambda^k delta_{t+k},
    delta_t = r_t + V_{t+1} - V_t, V after the last token = 0. (B, T), (B, T) -> (B, T)."""
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + next_values - values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.size(1))):
        running = deltas[:, t] + gae_lambda * running
        advantages[:, t] = running
    return advantages


def per_token_rewards(score, logp_old, logp_ref, beta):
    """Rewards for each response token: a KL penalty everywhere, the reward model's score at the end.

    score: (B,)  logp_old, logp_ref: (B, T)  ->  (B, T)
    The penalty -beta * (logp_old - logp_ref) (the k1 estimator of the KL, from the rollout policy)
    sums over tokens to -beta * log(pi/pi_ref) of the whole response, so the return of the first
    token is the KL-regularised objective of the sequence.
    """
    rewards = -beta * (logp_old - logp_ref)
    rewards[:, -1] += score
    return rewards


def clipped_surrogate_loss(logp_new, logp_old, advantages, clip_epsilon, clip_epsilon_high=None, weights=None):
    """PPO's clipped objective, negated for minimisation, per token.

    ratio = exp(logp_new - logp_old); loss = -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)),
    eps_high = eps unless given (DAPO's asymmetric clip), each term times its weight where `weights`
    are given (a sampler's importance weights, detached). The min makes the objective pessimistic: a
    token cannot gain from moving its probability further than the clip range from the rollout
    policy. Returns the loss, the fraction of clipped tokens and the approximate KL(old || new) (k3
    estimator, Schulman 2020), all scalars.
    """
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    log_ratio = logp_new - logp_old
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_epsilon, 1 + high) * advantages
    objective = torch.min(unclipped, clipped)
    loss = -(objective if weights is None else weights * objective).mean()
    clip_fraction = ((ratio < 1 - clip_epsilon) | (ratio > 1 + high)).float().mean()
    approx_kl = ((ratio - 1) - log_ratio).mean()
    return loss, clip_fraction.detach(), approx_kl.detach()
