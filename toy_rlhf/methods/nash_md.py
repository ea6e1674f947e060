"""Nash-MD (Munos et al. 2024, "Nash learning from human feedback", arXiv 2312.00886) as TRL's
experimental NashMDTrainer runs it, with the preference of the reward model's Bradley-Terry
probabilities, P(y > y') = sigmoid(r(y) - r(y')).

Policy: a copy of the SFT policy, trained. Reference: the SFT policy, frozen. Reward model: frozen,
the judge. Each iteration:
  1. rollout   one response y per prompt from the policy, and one y' from the geometric mixture of
               policy and reference, token by token: log_softmax((1 - m) logits_pi + m logits_ref),
               m = mixture_coef (TRL's default 0.5)
  2. judge     P = sigmoid(s - s'), the Bradley-Terry probability that y beats y'
  3. update    the loss of each y, as TRL:
                   beta * sg(log pi/pi_ref) * log pi(y)  -  (P - 1/2) * log pi(y)
               (sg: no gradient): REINFORCE on the game's payoff, 1/2 its control variate, plus
               REINFORCE on the KL; a few gradient-norm-clipped Adam steps over minibatches

Target. The regularised preference game max_pi min_pi' P(pi > pi') - tau KL(pi || pi_ref)
+ tau KL(pi' || pi_ref) is symmetric, and its unique equilibrium pi_tau is its own best response:
    pi_tau(y) = pi_ref(y) exp(P(y > pi_tau) / tau) / Z,    P(y > pi) = sum_y' pi(y') sigmoid(r(y) - r(y')),
with tau = beta. The registry's target solves this over the enumerated 10^4 responses of each prompt by
mirror descent (nash_equilibrium). With more than two rewards pi_tau is in general not pi* at any beta:
P(y > pi) is steepest in r(y) where the opponent's rewards are close and saturates where they are far,
so pi_tau sets near-equal responses further apart and far-worse ones less far apart than pi* of the
same KL (tests/test_nash.py: by hand on three responses, measured on the reward model's tables).

The expected update is the gradient of P(pi > sg(pi_mix)) - beta KL(pi || pi_ref), whose fixed point is
pi ∝ pi_ref exp(P(y > pi_mix) / beta): the opponent is the mixture, not pi itself. With m -> 0 that is
pi_tau; the paper's Nash-MD reaches pi_tau with step sizes that shrink, and TRL's fixed m = 1/2 keeps a
bias. Under a Bradley-Terry preference it is small (with two responses, none: P(a > pi) - P(b > pi)
does not depend on pi): on the first-digit tables at tau = 0.1 that fixed point, solved like pi_tau
with the per-token mixture as the opponent, is 0.008 nats from pi_tau and 0.03 from pi* of its KL.

Cost of the target: P(y > pi) over all pairs is a 10^4 x 10^4 matrix per prompt. It depends on the
responses only through their rewards, so pi's mass is spread onto a grid of reward values (linear
weights to the two nearest points), convolved with the sigmoid by FFT, and read back at each r(y)
by linear interpolation: second-order accurate in the grid's step (WIN_GRID_POINTS points across the
prompt's reward range), the error against the direct sum is checked in tests/test_nash.py.

Off-policy on purpose (rollout.SamplerSettings, SamplerCorrection): the policy's responses may come
from a sampler mu that is not the policy (the opponent's stay the mixture's). The loss is REINFORCE,
an expectation over the policy's responses, so without a correction its expectation is over mu's; a
correction multiplies each response's loss by f(w) of its whole weight w = pi_old(y) / mu(y)
(ratios.sampler_weights at sequence level, as RLOO's): 'tis' caps it, which at a cap above every
weight is the unbiased gradient again.

Differs from TRL on purpose:
- the KL term multiplies each token's log-prob by the log ratio of the response from that token on
  (kl_gradient 'to-go'), an unbiased REINFORCE gradient of the sequence KL (the tokens before t do not
  depend on y_t; weighting by the whole response's log ratio is unbiased too, but puts the first
  digit's log ratio as noise on every later digit); TRL multiplies each token's log-prob by its own
  token's log ratio only ('per-token', available), which leaves out what a token does to the KL of
  the tokens after it, so its fixed point is not the one above;
- samples at temperature 1 (TRL's OnlineDPOConfig default 0.9): the update's expectation is over the
  policy itself; no missing-EOS penalty (every response here has four tokens).
"""
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from toy_rlhf.flags import PositiveFloat, PositiveInt, Probability, Seed
from toy_rlhf.language import RESPONSE_LENGTH, join
from toy_rlhf.methods.advantages import returns_to_go
from toy_rlhf.methods.ratios import effective_sample_size, sampler_weights
from toy_rlhf.methods.rollout import (Sampler, SamplerCorrection, SamplerSettings, TrainingLog, mean_rows, minibatches,
                                      prompt_groups, rollout, start_training)
from toy_rlhf.optimal import digit_distribution
from toy_rlhf.policy import next_token_log_probs, token_log_probs_from
from toy_rlhf.reward import score_sentences
from toy_rlhf.training import check_finite, gradient_step

WIN_GRID_POINTS = 512  # reward values P(y > pi) is computed at, per prompt (then interpolated)


@dataclass
class NashMDConfig(SamplerCorrection, SamplerSettings):
    """Not a RolloutConfig: one response per prompt from the policy (the other from the mixture), and
    no ratio to clip. The policy's responses may come from a sampler that is not the policy, and be
    weighed by a correction (SamplerSettings, SamplerCorrection)."""
    beta: PositiveFloat = 0.1  # tau, TRL's default: the KL strength of the game (not PPO's beta: the payoff is in [0, 1])
    mixture_coef: Probability = 0.5  # m: the opponent samples from pi^(1 - m) pi_ref^m, per token (TRL's default)
    kl_gradient: Literal['to-go', 'per-token'] = 'to-go'  # each token's KL weight: the log ratio from it on, or its own (TRL)
    # A slow learning rate over many rounds: the payoff's REINFORCE weight falls on every digit, and a
    # faster rate spends its KL as noise on digits 2-4 (tests/test_nash.py).
    iters: PositiveInt = 100  # sample-judge-update rounds
    prompts_per_iter: PositiveInt = 128  # prompts per round, each giving a policy and a mixture response
    samples_per_prompt: ClassVar[int] = 1  # one policy response per prompt (not a flag)
    epochs: PositiveInt = 1  # passes of the update over each round's responses
    minibatches: PositiveInt = 2  # minibatches (gradient steps) per pass
    learning_rate: PositiveFloat = 3e-4  # Adam step size
    max_grad_norm: PositiveFloat = 1.0  # gradient-norm clip
    seed: Seed = 0  # random seed: the same seed gives the same run


# ---------------------------------------------------------------------------------------------
# The math, as pure functions.

def win_probability(rewards, log_pi, points=WIN_GRID_POINTS):
    """P(y > pi) = sum_y' pi(y') sigmoid(r(y) - r(y')) for every response: rewards, log_pi (P, N) -> (P, N).

    pi's mass is put on `points` equally spaced reward values spanning each prompt's rewards (each
    response's split linearly between its two nearest), convolved with the sigmoid (an FFT of the
    grid), and read back at each r(y) by linear interpolation. log_pi is over the same N responses
    (renormalised here).
    """
    P = len(rewards)
    pi = digit_distribution(log_pi).exp()
    low, high = rewards.amin(dim=1, keepdim=True), rewards.amax(dim=1, keepdim=True)
    step = ((high - low) / (points - 1)).clamp_min(1e-12)  # a constant reward: every response on one point
    position = (rewards - low) / step
    below = position.floor().long().clamp(max=points - 2)
    weight_above = position - below  # (P, N): linear weights to the points below and above
    mass = torch.zeros(P, points, dtype=pi.dtype)
    mass.scatter_add_(1, below, pi * (1 - weight_above)).scatter_add_(1, below + 1, pi * weight_above)
    # sigmoid(step * (a - b)) for a - b = -(points - 1) .. points - 1: the kernel of the convolution
    offsets = torch.arange(-(points - 1), points, dtype=pi.dtype)
    kernel = torch.sigmoid(step * offsets)  # (P, 2 points - 1)
    length = 4 * points  # >= 3 points - 2: a linear, not circular, convolution
    full = torch.fft.irfft(torch.fft.rfft(kernel, length) * torch.fft.rfft(mass, length), length)
    on_grid = full[:, points - 1:2 * points - 1]  # (P, points): sum_b kernel[a - b] mass[b]
    return on_grid.gather(1, below) * (1 - weight_above) + on_grid.gather(1, below + 1) * weight_above


def best_response(log_ref, rewards, log_opponent, tau):
    """The KL-regularised best response to an opponent: log (pi_ref exp(P(y > opponent) / tau) / Z), (P, N)."""
    return digit_distribution(log_ref + win_probability(rewards, log_opponent) / tau)


def nash_equilibrium(log_ref, rewards, tau, step=0.5, tolerance=1e-10, max_iters=1000):
    """pi_tau, the regularised Nash equilibrium, by mirror descent from pi_ref:
        log pi_{k+1} = (1 - step) log pi_k + step log best_response(pi_k)   (renormalised),
    until no log-prob moves by more than `tolerance`: (P, N), (P, N) -> (P, N) log-probs. At the fixed
    point pi is its own best response. Raises if it has not converged in max_iters."""
    log_ref = digit_distribution(log_ref)
    log_pi = log_ref
    for _ in range(max_iters):
        response = best_response(log_ref, rewards, log_pi, tau)
        if (response - log_pi).abs().max() < tolerance:
            return response
        log_pi = digit_distribution((1 - step) * log_pi + step * response)
    raise RuntimeError(f'nash_equilibrium: no convergence in {max_iters} iterations at tau={tau}')


def nash_md_loss(logp, logp_ref, probability, beta, kl_gradient, weights=None):
    """The loss of the policy's responses: logp (B, T) token log-probs with gradients, logp_ref (B, T),
    probability (B,) P(y > y'). beta * sum_t sg(w_t) log pi(y_t | y<t) - (P - 1/2) log pi(y), averaged,
    each response's times its sampler weight (B,) where there is one; the KL's weight w_t is the log
    ratio of tokens t..T ('to-go') or of token t alone ('per-token', TRL)."""
    log_ratio = (logp - logp_ref).detach()  # (B, T)
    if kl_gradient == 'to-go':
        # Token t's choice changes the log ratios of t and after, never those before it.
        kl_term = (returns_to_go(log_ratio) * logp).sum(dim=1)
    elif kl_gradient == 'per-token':
        kl_term = (log_ratio * logp).sum(dim=1)
    else:
        raise ValueError(f"kl_gradient must be 'to-go' or 'per-token', got {kl_gradient!r}")
    payoff = (probability - 0.5) * logp.sum(dim=1)  # 1/2: the control variate, P(y > y) of a tie
    loss = beta * kl_term - payoff  # (B,)
    return loss.mean() if weights is None else (weights * loss).mean()


# ---------------------------------------------------------------------------------------------
# The loop and the target.

@torch.no_grad()
def generate_from_mixture(policy, reference, prompts, mixture_coef, generator):
    """Sample a response per prompt (B, 4) from the geometric mixture of policy and reference, token by
    token from log_softmax((1 - m) logits_pi + m logits_ref): sentences (B, 9)."""
    sentences = join(prompts)
    for _ in range(RESPONSE_LENGTH):
        logits = (1 - mixture_coef) * policy(sentences)[0][:, -1] + mixture_coef * reference(sentences)[0][:, -1]
        next_token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        sentences = torch.cat([sentences, next_token], dim=1)
    return sentences


def target(tables, config):
    """pi_tau at tau = config.beta on the tables' prompts (toy_rlhf.optimal.ExactTables): (P, 10^4)."""
    return nash_equilibrium(tables.log_ref, tables.rewards, config.beta)


def train_nash_md(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """Fine-tune a copy of sft_policy with Nash-MD at tau = config.beta, reward_model judging each
    policy response against a mixture response. Returns the policy (eval mode) and the log: one row per
    round, the rollout's metrics (rollout_row), the loss and TRL's Nash-MD statistics, plus what
    measure(rounds done, policy) returns."""
    actor, reference, optimizer, generator = start_training(sft_policy, config)
    sampler = Sampler(config)  # the policy itself unless config makes the rollout off-policy
    with TrainingLog(config.iters, f'Nash-MD tau={config.beta:g}', progress,
                     shown=('rewards/probabilities', 'objective/kl_full', 'gold/preference_rate')) as log:
        for iteration in range(config.iters):
            # 1. rollout: a response from the sampler (the policy by default), and one from the mixture, per prompt
            prompts = prompt_groups(config, generator)
            batch = rollout(actor, reference, reward_model, prompts, generator, preference, sampler)
            mixture = generate_from_mixture(actor, reference, prompts, config.mixture_coef, generator)
            # 2. judge: the Bradley-Terry probability that the policy's response wins
            with torch.no_grad():  # the judge is frozen: no gradient reaches it
                batch['probability'] = torch.sigmoid(batch['score'] - score_sentences(reward_model, mixture))
            check_finite('nash_md', iteration, probability=batch['probability'])
            # 3. update: REINFORCE on the payoff and on the KL
            stats = update(actor, optimizer, batch, config)
            check_finite('nash_md', iteration, loss=stats['loss'])
            log.end_round(iteration, batch, config.beta, stats, actor, measure)
    return actor.eval(), log.rows


def update(actor, optimizer, batch, config):
    """config.epochs passes of minibatch steps on the Nash-MD loss; returns its mean and the mean
    P(y > y') (and the sampler weights' effective sample size, with a correction)."""
    actor.train()
    steps = []
    for index in minibatches(len(batch['sentences']), config):
        sentences = batch['sentences'][index]
        logp = token_log_probs_from(next_token_log_probs(actor, sentences), sentences)  # (b, 4)
        # the sampler's weight pi_old(y) / mu(y) of each whole response, corrected; None without a correction
        weights = sampler_weights(batch['logp_old'][index], batch['logp_sampler'][index], config.sampler_correction,
                                  'sequence', config.correction_band)
        weights = None if weights is None else weights[:, 0]
        loss = nash_md_loss(logp, batch['logp_ref'][index], batch['probability'][index], config.beta,
                            config.kl_gradient, weights)
        gradient_step(optimizer, loss, actor, config.max_grad_norm)
        step = {'loss': loss.item(), 'rewards/probabilities': batch['probability'][index].mean().item()}
        if weights is not None:
            step['sampler/effective_sample_size'] = effective_sample_size(weights)
        steps.append(step)
    actor.eval()
    return mean_rows(steps)
