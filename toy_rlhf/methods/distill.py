"""On-policy distillation from an exact teacher (Agarwal et al. 2024, GKD, arXiv 2306.13649; BOND,
Sessa et al. 2024, arXiv 2407.14622, for the best-of-n teacher).

Student: a copy of the SFT policy, trained. Reference: the SFT policy, frozen. Reward model: frozen.
The teacher is a distribution known exactly, by enumeration of the 10^4 responses of each prompt:
  'optimal'    pi* of the reward model at beta, pi_ref exp(r / beta) / Z
  'best-of-n'  the best of n reference samples under the reward model (best_of_n.py): BOND's target
Each iteration:
  1. rollout     K responses to each of P prompts, sampled from the student (on-policy), as PPO's
  2. teacher     its exact next-token distribution at every state the student reached: the teacher's
                 mass on the prefix y<t followed by each digit, over its mass on y<t (the digit
                 conditionals of the enumerated table); SEP gets the reference's probability at that
                 state, so a divergence to it is finite (the tables hold digit responses only); after
                 a SEP the student wrote (a state the teacher never reaches) the reference's
  3. update      the divergence between the student's and the teacher's whole next-token
                 distributions (all V tokens, not only the sampled one), averaged over the sampled
                 positions: reverse KL(student || teacher) (TRL DistillationTrainer's default),
                 forward KL(teacher || student), or the generalised JSD of GKD at jsd_beta
No reward, advantage, baseline or ratio: the per-token divergence is differentiated through the
state's own distribution only (the states are samples). Its expectation is zero exactly where the
student's conditionals equal the teacher's at every state it reaches, so the fixed point is the
teacher itself, for every divergence: the registry's `target`.

Off-policy on purpose (rollout.SamplerSettings): the states may come from a sampler that is not the
student (stale, tempered, cut to its top k, rounded), with no importance weight: the loss at a state
is that state's own divergence, least where the student's conditionals there are the teacher's, so
the fixed point is the teacher whichever sampler visits the states, as long as it visits them all; the
sampler only sets how much each state weighs in a finite run, or in a network that cannot match the
teacher everywhere (a state it never draws, behind a top k, is left untrained). Measured: a stale or
tempered sampler lands where the student's own samples do (docs/results.md, the off-policy study).

Differs from TRL on purpose: samples at temperature 1 (GKD 0.9) and only from the student (GKD's
lmbda = 1: fully on-policy), since a temperature would make the target the teacher of a tempered
student; the teacher is exact, not a network.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from toy_rlhf.enumeration import all_response_rewards, prompt_pool, step_tables
from toy_rlhf.flags import NonNegativeInt, PositiveFloat, PositiveInt, Probability
from toy_rlhf.language import DIGITS, PROMPT_LENGTH, RESPONSE_LENGTH, SEP
from toy_rlhf.methods.best_of_n import best_of_n_log_probs
from toy_rlhf.methods.rollout import (RolloutConfig, Sampler, SamplerSettings, TrainingLog, mean_rows, minibatches,
                                      rollout, set_learning_rate, start_training)
from toy_rlhf.optimal import digit_distribution, optimal_log_probs
from toy_rlhf.policy import next_token_log_probs
from toy_rlhf.training import check_finite, gradient_step


@dataclass
class DistillConfig(SamplerSettings, RolloutConfig):
    teacher: Literal['optimal', 'best-of-n'] = 'optimal'  # pi* of the reward model at beta, or best-of-n at n
    n: PositiveInt = 8  # samples of the best-of-n teacher
    divergence: Literal['reverse-kl', 'forward-kl', 'jsd'] = 'reverse-kl'  # per token, student's to the teacher
    jsd_beta: Probability = 0.5  # GKD's beta of the generalised JSD (0: forward KL, 1: reverse KL)
    # Every teacher table costs an enumeration of the reward model over 10^4 responses: few prompts,
    # more responses each.
    prompts_per_iter: PositiveInt = 16  # prompts in a rollout (each gets an exact teacher)
    samples_per_prompt: PositiveInt = 8  # responses per prompt
    # As the exact optimiser's (a dataset of prompts): each round's prompts drawn from a fixed pool
    # whose teachers are computed once, about a quarter of the time of fresh prompts (50 x 16 reward
    # model enumerations). Not the default: from a pool of 128 the student closed less of the gap on
    # prompts it never saw (seed 0, three of four preferences, docs/results.md).
    prompt_pool: NonNegativeInt = 0  # draw each round's prompts from this many fixed ones (0: fresh prompts)
    learning_rate: PositiveFloat = 1e-3  # Adam step size


# ---------------------------------------------------------------------------------------------
# The math, as pure functions.

def teacher_table(log_ref, rewards, config):
    """log-probs (P, 10^4) of the teacher over digit responses: the registry's target, and what the
    teacher's next-token distributions are read from."""
    if config.teacher == 'optimal':
        return optimal_log_probs(log_ref, rewards, config.beta)
    return best_of_n_log_probs(log_ref, rewards, config.n)


def teacher_next_token(table, responses, log_ref_next):
    """The teacher's next-token log-probs at each response position: table (B, 10^4) of each sample's
    prompt, responses (B, 4) digits, log_ref_next (B, 4, V) the reference's -> (B, 4, V).

    Position t: log q(a | y<t) = log q(y<t a) - log q(y<t) over digits a (prefix marginals of the
    table), scaled by 1 - pi_ref(SEP | y<t); SEP keeps pi_ref's log-prob.
    """
    B = len(table)
    grid = digit_distribution(table).view(B, *[DIGITS] * RESPONSE_LENGTH)
    rows, digit_prefix = torch.arange(B), responses.clamp(max=DIGITS - 1)
    out = []
    for t in range(RESPONSE_LENGTH):
        marginal = grid.logsumexp(dim=tuple(range(t + 2, RESPONSE_LENGTH + 1))) if t + 1 < RESPONSE_LENGTH else grid
        at_prefix = marginal[(rows, *digit_prefix[:, :t].T)]  # (B, 10): log q(y<t a)
        digits = at_prefix.log_softmax(dim=-1)  # log q(a | y<t), digits only
        log_sep = log_ref_next[:, t, SEP].double()
        teacher = torch.cat([digits + torch.log1p(-log_sep.exp()).unsqueeze(1), log_sep.unsqueeze(1)], dim=1)
        # After a SEP the student wrote, a state the teacher never reaches: the reference stands in.
        after_sep = (responses[:, :t] == SEP).any(dim=1, keepdim=True)
        out.append(torch.where(after_sep, log_ref_next[:, t].double(), teacher))
    return torch.stack(out, dim=1).float()  # (B, 4, V): digits 0..9, then SEP


def kl(log_p, log_q):
    """KL(p || q) of each next-token distribution: (..., V) x 2 -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def divergence_loss(log_student, log_teacher, divergence, jsd_beta):
    """The mean over positions of the chosen divergence: (B, T, V) x 2 -> a scalar. jsd: GKD's
    beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student."""
    if divergence == 'reverse-kl':
        return kl(log_student, log_teacher).mean()
    if divergence == 'forward-kl':
        return kl(log_teacher, log_student).mean()
    log_m = torch.logaddexp(log_teacher + torch.log(torch.tensor(jsd_beta)),
                            log_student + torch.log(torch.tensor(1 - jsd_beta)))
    return (jsd_beta * kl(log_teacher, log_m) + (1 - jsd_beta) * kl(log_student, log_m)).mean()


# ---------------------------------------------------------------------------------------------
# The loop and the target.

def target(tables, config):
    """The teacher on the tables' prompts (toy_rlhf.optimal.ExactTables): log-probs (P, 10^4)."""
    return teacher_table(tables.log_ref, tables.rewards, config)


def train_distill(sft_policy, reward_model, config, preference, progress=True, measure=None):
    """Distil the exact teacher of config into a copy of sft_policy, on the student's own samples.

    Returns the student (eval mode) and the log: one dict per iteration, the rollout's metrics
    (rollout_row), the divergence, and what measure(rounds done, student) returns.
    """
    student, reference, optimizer, generator = start_training(sft_policy, config)
    sampler = Sampler(config)  # the student itself unless config makes the rollout off-policy
    reward_model.eval()
    def rewards_of(prompts):
        return all_response_rewards(reward_model, prompts)
    with TrainingLog(config.iters, f'distill {config.teacher} beta={config.beta:g}', progress,
                     shown=('objective/scores', 'objective/kl_full', 'gold/preference_rate')) as log:
        pool = prompt_pool(reference, rewards_of, config, generator)
        for iteration in range(config.iters):
            # 0. learning rate of this round: decayed towards 0 (anneal_lr), or constant
            set_learning_rate((optimizer,), config, iteration)
            # 1. rollout: P prompts (fresh, or from the pool) x K samples from the sampler (the student by default)
            prompts, log_ref, rewards = step_tables(reference, rewards_of, config, generator, pool)  # (P, 4), (P, 10^4) x 2
            batch = rollout(student, reference, reward_model, prompts.repeat_interleave(config.samples_per_prompt, 0),
                            generator, preference, sampler)
            # 2. teacher: from the exact tables of the P prompts, its next-token distributions at the sampled states
            table = teacher_table(log_ref, rewards, config)
            with torch.no_grad():
                log_ref_next = next_token_log_probs(reference, batch['sentences'])
            batch['log_teacher'] = teacher_next_token(table.repeat_interleave(config.samples_per_prompt, 0),
                                                      batch['sentences'][:, PROMPT_LENGTH + 1:], log_ref_next)
            # 3. update: the divergence per token, over minibatches
            stats = update(student, optimizer, batch, config)
            check_finite('distill', iteration, loss=stats['loss'])
            log.end_round(iteration, batch, config.beta, stats, student, measure)
    return student.eval(), log.rows


def update(student, optimizer, batch, config):
    """config.epochs passes of minibatch steps on the divergence; returns its mean."""
    student.train()
    steps = []
    for index in minibatches(len(batch['sentences']), config):
        log_student = next_token_log_probs(student, batch['sentences'][index])  # (b, 4, V)
        loss = divergence_loss(log_student, batch['log_teacher'][index], config.divergence, config.jsd_beta)
        gradient_step(optimizer, loss, student, config.max_grad_norm)
        steps.append({'loss': loss.item()})
    student.eval()
    return mean_rows(steps)
