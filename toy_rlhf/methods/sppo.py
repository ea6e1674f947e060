"""SPPO, self-play preference optimisation (Wu et al. 2024, arXiv 2405.00675), with the preference of
the reward model's Bradley-Terry probabilities, P(y > y') = sigmoid(r(y) - r(y')).

SPPO approximates multiplicative weights on the preference game, one policy per iteration t:
    pi_{t+1}(y) = pi_t(y) exp(eta (P(y > pi_t) - 1/2)) / Z_t,    P(y > pi) = sum_y' pi(y') P(y > y'),
each iterate fitted by regression on samples of the previous one. Policy: a copy of the SFT policy,
trained; pi_0 is the SFT policy (the reference, frozen). `iters` rounds, and every
`rounds_per_iterate` of them an SPPO iteration t:
  0. freeze    pi_t: a frozen copy of the policy as it is now (the sampler and the regression's base)
  then in each round of the iteration:
  1. rollout   K responses to each of P prompts from pi_t; their log-probs under pi_t and the reward
               model's scores s_k
  2. estimate  P^(y_k > pi_t) = the mean over the prompt's other samples j of sigmoid(s_k - s_j)
  3. update    the squared error (log pi_theta(y_k) / pi_t(y_k) - eta (P^(y_k > pi_t) - 1/2))^2,
               averaged; gradient-norm-clipped Adam steps over minibatches
eta is 1 / beta, as TRL parametrises SPPO (DPOConfig loss_type 'sppo_hard': the log ratios regressed on
+-1 / (2 beta)), so that the registry's beta is the method's only strength.

Target. The exact multiplicative-weights iterates from pi_ref over the enumerated 10^4 responses of each
prompt (mw_iterates, with nash_md.win_probability): the registry's target is pi_T after the
T = ceil(iters / rounds_per_iterate) iterations the run starts. Two reasons the trained iterates are not exactly on that trajectory, besides sampling and
the fit: the regression leaves out log Z_t (the paper replaces it by eta / 2, the 1/2 above), and a
normalised pi_theta fitting an unnormalised target by least squares under pi_t lands near, not on,
pi_t exp(eta (P - 1/2)) / Z_t (the two agree to first order in the spread of eta P under pi_t, since
E_{pi_t}[P(y > pi_t)] = 1/2 exactly); and each trained iterate starts from the previous trained one, so
the errors carry on. Without a KL anchor the iterates drift for as long as they run, towards the
responses that beat the rest (for a transitive preference, the reward model's best).

Off-policy on purpose (rollout.SamplerSettings): the responses may come from a sampler mu that is not
pi_t (an iterate of `staleness` rounds before, tempered, cut to its top k, rounded). Then the others of
a prompt are draws of mu, not pi_t, and their plain mean estimates P(y > mu): each is weighed by its
exact pi_t(y_j) / mu(y_j), normalised over the others, which estimates P(y > pi_t) again (consistently,
not unbiasedly, at K - 1 opponents). The regression takes no weight: a network that fits every
response's target exactly fits it whoever draws them; one that cannot spreads its error by the
sampler's draws, not pi_t's (measured: docs/results.md, the off-policy study).

Differs from the paper on purpose: P^ averages over the other K - 1 samples of the prompt (the paper's
average over its K samples, if it counts y_k against itself, adds a 1/2 that shrinks eta by (K - 1) / K,
a step that depends on K); the preference is the reward model's BT probability, not PairRM; each
iteration's data is sampled afresh in `rounds` rounds instead of one fixed data set per iteration.
"""
import copy
from dataclasses import dataclass

import torch

from toy_rlhf.flags import GroupSize, PositiveFloat, PositiveInt, Seed
from toy_rlhf.methods.nash_md import win_probability
from toy_rlhf.methods.rollout import (Sampler, SamplerSettings, TrainingLog, mean_rows, minibatches, prompt_groups,
                                      rollout, start_training)
from toy_rlhf.optimal import digit_distribution
from toy_rlhf.policy import token_log_probs
from toy_rlhf.training import check_finite, gradient_step


@dataclass
class SPPOConfig(SamplerSettings):
    """Not a RolloutConfig: the samples come from the frozen iterate pi_t, not from the policy being
    fitted, and there is no ratio to clip. A sampler that is not pi_t (SamplerSettings) is weighed
    exactly in the win-rate estimate."""
    beta: PositiveFloat = 0.5  # 1 / eta, the inverse step of multiplicative weights (TRL's sppo beta)
    iters: PositiveInt = 18  # sample-and-update rounds
    rounds_per_iterate: PositiveInt = 6  # rounds per SPPO iteration t, all sampling the frozen pi_t
    prompts_per_iter: PositiveInt = 64  # prompts per round
    samples_per_prompt: GroupSize = 5  # K responses per prompt, each one's P^ from the others (the paper's K)
    epochs: PositiveInt = 1  # passes of the update over each round's samples
    minibatches: PositiveInt = 2  # minibatches (gradient steps) per pass
    # From the default SFT policy 1e-3 overshoots from the first round (0.50 nats from the reference
    # after it, where iterate 1 is 0.10) and ends 1.4-2.1 nats from the exact iterate (seeds 0, 1);
    # 1e-4 ends 0.13-0.18 from it, 2e-4 0.19, 3e-4 0.23 (seed 0; docs/results.md).
    learning_rate: PositiveFloat = 1e-4  # Adam step size
    max_grad_norm: PositiveFloat = 1.0  # gradient-norm clip
    seed: Seed = 0  # random seed: the same seed gives the same run


# ---------------------------------------------------------------------------------------------
# The math, as pure functions.

def estimated_win_probability(scores, samples_per_prompt, log_weights=None):
    """P^(y_k > pi_t): the mean over the other samples j of its prompt of sigmoid(s_k - s_j), or,
    with log_weights (P * K,) the log pi_t(y_j) / mu(y_j) of samples a sampler mu drew, their weighted
    mean, the weights normalised over the others. scores (P * K,), each prompt's K adjacent -> (P * K,)."""
    grouped = scores.view(-1, samples_per_prompt)  # (P, K)
    pairwise = torch.sigmoid(grouped.unsqueeze(2) - grouped.unsqueeze(1))  # (P, K, K): P(y_k > y_j)
    if log_weights is None:
        # The diagonal is a response against itself, sigmoid(0) = 1/2: left out.
        return ((pairwise.sum(dim=2) - 0.5) / (samples_per_prompt - 1)).flatten()
    log_weights = log_weights.view(-1, samples_per_prompt).double()
    weights = (log_weights - log_weights.amax(dim=1, keepdim=True)).exp()  # (P, K): a prompt's scale cancels
    others = weights.unsqueeze(1) * (1 - torch.eye(samples_per_prompt, dtype=weights.dtype))  # (P, K, K): w_j, j != k
    return ((pairwise * others).sum(dim=2) / others.sum(dim=2)).to(scores.dtype).flatten()


def sppo_loss(log_ratio, win, eta):
    """(log pi_theta/pi_t (y) - eta (P^(y > pi_t) - 1/2))^2, averaged: log_ratio, win (B,) -> a scalar."""
    return ((log_ratio - eta * (win - 0.5)) ** 2).mean()


def mw_iterates(log_ref, rewards, eta, iterations):
    """The exact multiplicative-weights trajectory pi_0 = pi_ref, ..., pi_iterations:
    log pi_{t+1} = log pi_t + eta P(y > pi_t) - log Z_t, over the responses of each prompt:
    (P, N), (P, N) -> a list of iterations + 1 log-prob tables (P, N)."""
    trajectory = [digit_distribution(log_ref)]
    for _ in range(iterations):
        log_pi = trajectory[-1]
        trajectory.append(digit_distribution(log_pi + eta * win_probability(rewards, log_pi)))
    return trajectory


# ---------------------------------------------------------------------------------------------
# The loop and the target.

def iterations(config):
    """The SPPO iterations a run starts: ceil(iters / rounds_per_iterate)."""
    return -(-config.iters // config.rounds_per_iterate)


def target(tables, config):
    """The exact iterate pi_T, T = iterations(config), eta = 1 / config.beta, on the tables' prompts: (P, 10^4)."""
    return mw_iterates(tables.log_ref, tables.rewards, 1 / config.beta, iterations(config))[-1]


def train_sppo(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """Fine-tune a copy of sft_policy with SPPO at eta = 1 / config.beta, pi_t frozen anew every
    config.rounds_per_iterate rounds, the reward model judging each pair of samples. Returns the policy (eval mode) and the log: one row per
    round, the rollout's metrics (rollout_row, those of the frozen iterate pi_t that sampled), the
    iteration, the loss, plus what measure(rounds done, policy) returns."""
    actor, reference, optimizer, generator = start_training(sft_policy, config)
    sampler = Sampler(config)  # pi_t itself unless config makes the rollout off-policy
    eta = 1 / config.beta
    with TrainingLog(config.iters, f'SPPO eta={eta:g}', progress,
                     shown=('loss', 'objective/kl_full', 'gold/preference_rate')) as log:
        for round_ in range(config.iters):
            # 0. freeze: pi_t, the iterate this iteration samples from and regresses against
            if round_ % config.rounds_per_iterate == 0:
                iterate = copy.deepcopy(actor).eval().requires_grad_(False)
            # 1. rollout: K responses per prompt from the sampler (pi_t by default), their log-probs and the scores
            batch = rollout(iterate, reference, reward_model, prompt_groups(config, generator), generator,
                            preference, sampler)
            # 2. estimate: each response's win probability against pi_t, from the prompt's other samples
            #    (weighed by pi_t / mu where the sampler mu is not pi_t)
            log_weights = None if sampler.on_policy else (batch['logp_old'] - batch['logp_sampler']).sum(dim=1)
            batch['win'] = estimated_win_probability(batch['score'], config.samples_per_prompt, log_weights)
            check_finite('sppo', round_, win=batch['win'])
            # 3. update: regress log pi_theta/pi_t on eta (P^ - 1/2)
            stats = update(actor, optimizer, batch, eta, config)
            check_finite('sppo', round_, loss=stats['loss'])
            log.end_round(round_, batch, config.beta,
                          {'sppo/iteration': round_ // config.rounds_per_iterate + 1, **stats}, actor, measure)
    return actor.eval(), log.rows


def update(actor, optimizer, batch, eta, config):
    """config.epochs passes of minibatch steps on the SPPO loss; returns its mean."""
    actor.train()
    logp_iterate = batch['logp_old'].sum(dim=1)  # log pi_t(y): the sampler's, computed once
    steps = []
    for index in minibatches(len(batch['sentences']), config):
        log_ratio = token_log_probs(actor, batch['sentences'][index]).sum(dim=1) - logp_iterate[index]
        loss = sppo_loss(log_ratio, batch['win'][index], eta)
        gradient_step(optimizer, loss, actor, config.max_grad_norm)
        steps.append({'loss': loss.item()})
    actor.eval()
    return mean_rows(steps)
