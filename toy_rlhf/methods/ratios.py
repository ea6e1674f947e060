"""The importance-ratio family of 2025-26 and the corrections for a sampler that is not the policy:
pure functions of token log-probs (B, T), shared by PPO, REINFORCE++ and GRPO (config fields of
rollout.OffPolicyConfig).

Two importance weights, from two different pairs of policies:
- the *trainer's* ratio rho_t = pi(y_t|s_t) / pi_old(y_t|s_t): the policy being updated against the
  trainer's own policy at rollout time (logp_old). It moves away from 1 over the epochs and
  minibatches of one rollout; the ratio variants below are different ways to clip or smooth it.
- the *sampler's* weight w_t = pi_old(y_t|s_t) / mu(y_t|s_t): the trainer's policy at rollout time
  against the sampler mu that actually wrote the tokens (logp_sampler: a stale actor, another
  temperature, top-k, rounded logits). It is fixed for the rollout; the corrections truncate or mask it.
On-policy (one epoch, one minibatch or at its first step, mu = pi_old = pi) rho = w = 1 and every
variant's gradient is its base estimator's, -mean_t A_t grad log pi(y_t|s_t) (tests/test_ratios.py),
except CISPO under TRL's default bound (0.2: the gradient times 0.2).

Ratio variants (`ratio`), each the per-token objective that the loss negates and averages:
  ppo    min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t): token level (Schulman et al. 2017).
  gspo   s = (pi(y)/pi_old(y))^(1/|y|) = exp(mean_t log rho_t), the sequence's ratio per token; clipped
         as PPO's but with the paper's tiny range 1 - 3e-4, 1 + 4e-4 (Zheng et al. 2025, arXiv 2507.18071
         v2 section 5.1; verl's GSPO example). Written as TRL's `gspo_token`: each token's weight has the
         value s and the gradient s grad log pi(y_t), which is GSPO's exactly where A_t is the same for
         every token (GRPO) and also defined where it is not (PPO's per-token advantages).
  gmpo   the geometric mean of the token ratios, each clipped in log space to [-0.4, 0.4] pessimistically
         for the advantage's sign before the mean (Zhao et al. 2025, arXiv 2507.20673; TRL
         GMPOConfig(epsilon=0.4)); no outer clip. Token-gradient form as gspo.
  cispo  sg(clip(rho_t, low, high)) A_t log pi(y_t): a detached, bounded importance weight times
         REINFORCE; no token's gradient is ever zeroed (MiniMax-M1, arXiv 2506.13585). The bounds'
         semantics differ by library (`cispo_bounds`):
           trl            clamp(rho, max=epsilon_high), absolute, epsilon_high unset -> epsilon = 0.2:
                          every on-policy gradient is scaled by 0.2, every weight flattened to <= 0.2
           trl-5          the same with epsilon_high = 5.0, the value TRL's docs recommend
           verl           1 - clip_ratio_low, 1 + clip_ratio_high, offsets, at the actor's 0.2 / 0.2
           open-instruct  clamp(rho, max=1 + clip_higher), clip_higher = 0.272
  sapo   (4 / tau) sigmoid(tau (rho_t - 1)) A_t, tau = 1.0 where A > 0 and 1.05 where A < 0 (TRL's
         defaults; Qwen, arXiv 2511.20347): a soft trust region whose slope at rho = 1 is exactly 1.

Sampler corrections (`sampler_correction`) multiply each token's loss by a detached f(w):
  tis     truncated importance sampling, min(w, C) (Yao et al. 2025, "Your efficient RL framework
          secretly brings you off-policy RL training")
  mis     masked importance sampling, w 1[w <= C]: an outlier is dropped, not capped (Liu, Li et al.
          2025, "When speed kills stability"; TRL's `sequence_mask`)
  icepop  w 1[c <= w <= C], two-sided (IcePop, arXiv 2510.18855)
at token level (w_t) or sequence level (w = prod_t w_t, the unbiased one before truncation, given to
every token of the response) by `correction_level`, with each library's default band
(`correction_band`, SAMPLER_BANDS). The same weight multiplies GRPO's KL term: both are expectations
over tokens of pi_old, which the sampler's tokens are not.
"""
import math

import torch

RATIOS = ('ppo', 'gspo', 'gmpo', 'cispo', 'sapo')
GSPO_CLIP = (3e-4, 4e-4)  # (low, high): 1 - low <= s <= 1 + high, the GSPO paper's and verl's example
GMPO_CLIP = 0.4  # |log rho_t| <= this, TRL's GMPOConfig.epsilon
SAPO_TEMPERATURES = (1.0, 1.05)  # tau for positive, negative advantages (TRL)
# (low, high) absolute bounds on CISPO's weight; the libraries' readings of their clip settings.
CISPO_BOUNDS = {'trl': (0.0, 0.2), 'trl-5': (0.0, 5.0), 'verl': (0.8, 1.2), 'open-instruct': (0.0, 1.272)}
# (c, C) bands of the sampler weight; c = 0 where the library only caps from above.
SAMPLER_BANDS = {'verl': (0.0, 2.0),  # algorithm.rollout_correction threshold 2.0
                 'trl': (0.0, 3.0),  # vllm_importance_sampling_cap 3.0, sequence_mask by default
                 'open-instruct': (0.0, 2.0),  # use_rho_correction, clamp <= 2.0
                 'openrlhf': (0.5, 5.0)}  # is_correction thresholds [0.5, 5.0]


# ---------------------------------------------------------------------------------------------
# The trainer's ratio: per-token objectives (B, T) and where each one's clip binds (B, T) bool.

def ppo_objective(logp_new, logp_old, advantages, clip_low, clip_high):
    """min(rho A, clip(rho, 1 - low, 1 + high) A), rho = exp(logp_new - logp_old), per token."""
    ratio = (logp_new - logp_old).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return torch.min(unclipped, clipped), (ratio < 1 - clip_low) | (ratio > 1 + clip_high)


def carrying_value(log_value, log_token):
    """exp(log_value) in value, with the gradient exp(log_value) * grad log_token: a sequence's weight
    given to each token so that the token's own log-prob carries the gradient ((B, 1), (B, T) -> (B, T))."""
    return (log_value.detach() + log_token - log_token.detach()).exp()


def gspo_objective(logp_new, logp_old, advantages, clip_low=GSPO_CLIP[0], clip_high=GSPO_CLIP[1]):
    """min(s A, clip(s, 1 - low, 1 + high) A) per token, s = exp(mean_t log rho_t) the sequence's
    length-normalised ratio (GSPO-token: gradient s grad log pi(y_t))."""
    log_s = (logp_new - logp_old).mean(dim=1, keepdim=True)  # (B, 1)
    s = carrying_value(log_s, logp_new)  # (B, T): every token the value s
    clipped = s.clamp(1 - clip_low, 1 + clip_high) * advantages
    return torch.min(s * advantages, clipped), (s < 1 - clip_low) | (s > 1 + clip_high)


def gmpo_objective(logp_new, logp_old, advantages, clip=GMPO_CLIP):
    """G A per token, G = exp(mean_t l_t), l_t = log rho_t clipped to [-clip, clip] only where that
    lowers the objective: min(l, clip(l)) for A > 0, max for A < 0 (PPO's pessimism, in log space)."""
    log_ratio = logp_new - logp_old
    sign = advantages.sign()
    pessimistic = sign * torch.min(sign * log_ratio, sign * log_ratio.clamp(-clip, clip))
    geometric_mean = carrying_value(pessimistic.mean(dim=1, keepdim=True), pessimistic)
    return geometric_mean * advantages, pessimistic != log_ratio


def cispo_objective(logp_new, logp_old, advantages, bounds='trl-5'):
    """sg(clip(rho, low, high)) A log pi(y_t) per token, (low, high) = CISPO_BOUNDS[bounds]."""
    low, high = CISPO_BOUNDS[bounds]
    ratio = (logp_new - logp_old).exp().detach()
    return ratio.clamp(low, high) * advantages * logp_new, (ratio < low) | (ratio > high)


def sapo_objective(logp_new, logp_old, advantages, temperatures=SAPO_TEMPERATURES):
    """(4 / tau) sigmoid(tau (rho - 1)) A per token, tau by the advantage's sign. The 'clipped' tokens
    are those whose gate has lost more than half its slope at rho = 1."""
    ratio = (logp_new - logp_old).exp()
    tau = torch.where(advantages > 0, *advantages.new_tensor(temperatures))  # in the advantages' precision
    gate = torch.sigmoid(tau * (ratio - 1))
    return 4 / tau * gate * advantages, 4 * gate * (1 - gate) < 0.5


def policy_objective(ratio, logp_new, logp_old, advantages, clip_low, clip_high, cispo_bounds):
    """The per-token objective of variant `ratio` and its clip mask; clip_low, clip_high are PPO's
    (the other variants keep their papers' ranges)."""
    if ratio == 'ppo':
        return ppo_objective(logp_new, logp_old, advantages, clip_low, clip_high)
    if ratio == 'gspo':
        return gspo_objective(logp_new, logp_old, advantages)
    if ratio == 'gmpo':
        return gmpo_objective(logp_new, logp_old, advantages)
    if ratio == 'cispo':
        return cispo_objective(logp_new, logp_old, advantages, cispo_bounds)
    if ratio == 'sapo':
        return sapo_objective(logp_new, logp_old, advantages)
    raise ValueError(f'ratio must be one of {RATIOS}, got {ratio!r}')


# ---------------------------------------------------------------------------------------------
# The sampler's weight: detached, per token (B, T).

def sampler_weights(logp_old, logp_sampler, correction, level='token', band='verl'):
    """f(w) per token for `correction` (module docstring), w = pi_old / mu of each token ('token') or
    of the whole response, on each of its tokens ('sequence'); None for 'none' (no weight at all)."""
    if correction == 'none':
        return None
    log_w = logp_old - logp_sampler  # (B, T): the log weight of each sampled token
    if level == 'sequence':
        log_w = log_w.sum(dim=1, keepdim=True).expand_as(log_w)
    elif level != 'token':
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    w = log_w.exp().detach()
    low, high = SAMPLER_BANDS[band]
    if correction == 'tis':
        return w.clamp(max=high)
    if correction == 'mis':
        return w * (w <= high)
    if correction == 'icepop':
        return w * ((w >= low) & (w <= high))
    raise ValueError(f"correction must be 'none', 'tis', 'mis' or 'icepop', got {correction!r}")


def weighted_mean(terms, weights):
    """The mean of per-token terms (B, T), each times its sampler weight where there is one."""
    return terms.mean() if weights is None else (weights * terms).mean()


def policy_loss(logp_new, logp_old, logp_sampler, advantages, config, clip_high=None):
    """The policy loss of config's variant and correction (rollout.OffPolicyConfig), averaged over
    tokens: (loss, clip fraction, approximate KL(old || new) of the trainer's ratio, sampler weights or
    None). With ratio 'ppo' and no correction it is advantages.clipped_surrogate_loss, number for number."""
    clip_high = config.clip_epsilon if clip_high is None else clip_high
    objective, clipped = policy_objective(config.ratio, logp_new, logp_old, advantages, config.clip_epsilon,
                                          clip_high, config.cispo_bounds)
    weights = sampler_weights(logp_old, logp_sampler, config.sampler_correction, config.correction_level,
                              config.correction_band)
    log_ratio = logp_new - logp_old
    approx_kl = (log_ratio.exp() - 1) - log_ratio
    return (weighted_mean(-objective, weights), clipped.float().mean().detach(), approx_kl.mean().detach(),
            weights)


def effective_sample_size(weights):
    """(sum w)^2 / (n sum w^2) of the sampler weights: 1 when they are all equal, small when a few
    tokens carry the batch; 1 without weights."""
    if weights is None:
        return 1.0
    total = weights.sum()
    return (total ** 2 / (weights.numel() * (weights ** 2).sum()).clamp_min(math.ulp(1.0))).item()
