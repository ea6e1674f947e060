"""What the online methods share: the rollout and the training log.

A rollout samples responses from the current policy (the actor) and computes, once and without
gradients, everything the update needs: the log-probs of the sampled tokens under the actor (the *old*
policy of PPO's ratio) and under the frozen reference, and the reward model's score. Each method then
turns those into advantages its own way, with the estimators of advantages.py.

Off-policy on purpose (SamplerConfig, OffPolicyConfig): the responses can come from a Sampler that is
not the actor, the actor of `staleness` rounds ago (asynchronous RL), its logits rounded to bf16 or
fp16, tempered or cut to the top k (an inference engine's sampling). The sampler's next-token
distribution is computed exactly, so the rollout keeps the log-probs of the sampled tokens under it
(logp_sampler) beside those under the actor at rollout time (logp_old): the importance weights of
ratios.py are exact.
"""
import copy
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch

from mingpt.utils import set_seed
from toy_rlhf.flags import GroupSize, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Seed
from toy_rlhf.language import RESPONSE_LENGTH, join, sample_prompts
from toy_rlhf.metrics import kl_divergence, rule_probability
from toy_rlhf.policy import generate_responses, token_log_probs_from, next_token_log_probs
from toy_rlhf.reward import score_sentences
from toy_rlhf.training import progress_bar


@dataclass
class RolloutConfig:
    """Settings every method that samples from its own policy shares."""
    beta: NonNegativeFloat = 1.0  # strength of the KL penalty; 0 lets the policy drift anywhere
    # At 3e-4 the exact preference rate passes 99% after about 14 rounds and beta=1 levels off within
    # 20; the later rounds are there for beta=0, whose KL is still growing at round 50.
    iters: PositiveInt = 50  # rollout-and-update rounds
    # Fewer prompts per rollout reached 99% preference in fewer samples down to 96 (seeds 0-2), at
    # the same gold rate; 64 lowered it.
    prompts_per_iter: PositiveInt = 96  # prompts in a rollout
    samples_per_prompt: GroupSize = 4  # responses per prompt: a group, each one's baseline the others
    # One pass in four minibatches: from the second minibatch on the actor is no longer the rollout
    # policy, and the ratio clip bounds how far it moves. More passes bought no quality per second.
    epochs: PositiveInt = 1  # passes of the update over each rollout
    minibatches: PositiveInt = 4  # minibatches per epoch
    learning_rate: PositiveFloat = 3e-4  # Adam step size
    # CleanRL's default, and ours: at a constant rate the last rounds keep jumping about the target (from
    # the default SFT policy PPO closed 97.0-98.1% of the gap on first-digit, seeds 0-2, the other
    # online methods 96.4-98.7% on seed 0); decayed to 0 they settle on it (docs/results.md).
    anneal_lr: bool = True  # decay the learning rate linearly to 0 over the rounds (off: constant)
    clip_epsilon: PositiveFloat = 0.2  # ratio clip: how far one rollout may move a token's probability
    max_grad_norm: PositiveFloat = 1.0  # gradient-norm clip
    seed: Seed = 0  # random seed: the same seed gives the same run


@dataclass
class SamplerSettings:
    """The Sampler's settings: a sampler that need not be the policy. The defaults are on-policy: the
    same random draws and numbers as without these fields."""
    staleness: NonNegativeInt = 0  # rounds the sampling actor lags the trained one (asynchronous RL)
    sampler_temperature: PositiveFloat = 1.0  # the sampler's temperature (the policy's is 1)
    sampler_top_k: NonNegativeInt = 0  # the sampler keeps the k most likely tokens; 0 (or k >= the vocabulary) keeps all
    sampler_precision: Literal['fp32', 'bf16', 'fp16'] = 'fp32'  # the sampler's logits rounded to this first


@dataclass
class SamplerCorrection:
    """The corrections of ratios.py for a sampler that is not the policy (its docstring has each one's
    equation and library defaults): each sample's loss times a function of its weight pi_old / mu."""
    sampler_correction: Literal['none', 'tis', 'mis', 'icepop'] = 'none'  # of the sampler's weight pi_old / mu
    correction_band: Literal['verl', 'trl', 'open-instruct', 'openrlhf'] = 'verl'  # whose default thresholds


@dataclass
class SamplerConfig(SamplerCorrection, SamplerSettings, RolloutConfig):
    """RolloutConfig with a sampler that need not be the policy, and the corrections for it. The
    defaults are on-policy."""


@dataclass
class OffPolicyConfig(SamplerConfig):
    """SamplerConfig with the trainer's per-token ratio variants of ratios.py, for the methods whose
    loss is per token (PPO, REINFORCE++, GRPO). The defaults are PPO's ratio."""
    ratio: Literal['ppo', 'gspo', 'gmpo', 'cispo', 'sapo'] = 'ppo'  # the trainer's ratio and its clip
    # TRL's default ('trl', 0.2 absolute) scales every on-policy step by 0.2; its docs recommend 5.
    cispo_bounds: Literal['trl', 'trl-5', 'verl', 'open-instruct'] = 'trl-5'  # whose reading of CISPO's clip bounds
    correction_level: Literal['token', 'sequence'] = 'token'  # the sampler's weight per token or per response


PRECISIONS = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def sampler_log_probs(logits, temperature=1.0, top_k=0, precision='fp32'):
    """The sampler's next-token log-probs from the actor's logits (..., V): rounded to `precision`,
    divided by the temperature, all but the top k set to -inf (as an inference engine samples)."""
    if precision != 'fp32':
        logits = logits.to(PRECISIONS[precision]).float()
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):  # a k of the vocabulary's size or more keeps every token
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float('-inf'))
    return logits.log_softmax(dim=-1)


class Sampler:
    """The policy that writes a rollout's responses: the actor itself (on-policy), or the actor of
    config.staleness rounds ago (the first actor until then), sampled through sampler_log_probs."""

    def __init__(self, config):
        self.config = config
        self.on_policy = (config.staleness == 0 and config.sampler_temperature == 1 and config.sampler_top_k == 0
                          and config.sampler_precision == 'fp32')
        self.copies = deque(maxlen=config.staleness + 1)  # the actors of the last rounds, oldest first

    @torch.no_grad()
    def __call__(self, actor, prompts, generator):
        """Sentences (B, 9) and logp_sampler (B, 4), the sampled tokens' log-probs under the sampler
        (None on-policy: they are logp_old, and today's sampling code draws the same numbers)."""
        if self.on_policy:
            return generate_responses(actor, prompts, generator), None
        self.copies.append(copy.deepcopy(actor).eval())
        model, sentences, logp_sampler = self.copies[0], join(prompts), []
        for _ in range(RESPONSE_LENGTH):
            logits, _ = model(sentences)
            log_probs = sampler_log_probs(logits[:, -1], self.config.sampler_temperature, self.config.sampler_top_k,
                                          self.config.sampler_precision)  # (B, V)
            token = torch.multinomial(log_probs.exp(), 1, generator=generator)  # (B, 1)
            logp_sampler.append(log_probs.gather(1, token))
            sentences = torch.cat([sentences, token], dim=1)
        return sentences, torch.cat(logp_sampler, dim=1)


# ---------------------------------------------------------------------------------------------
# The rollout and the pieces of a training loop.

def start_training(reference, config):
    """Seed everything, and return (actor, frozen reference, Adam optimizer of the actor at
    config.learning_rate, generator): the actor a trainable copy of `reference`, the reference a
    frozen copy (the caller's model is left as it was; no gradient ever reaches it)."""
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    frozen = copy.deepcopy(reference).eval().requires_grad_(False)
    actor = copy.deepcopy(reference).train().requires_grad_(True)
    # foreach: one loop over the tensors in C++ instead of Python, the same weights bit for bit.
    return actor, frozen, torch.optim.Adam(actor.parameters(), lr=config.learning_rate, foreach=True), generator


def annealed_learning_rate(config, iteration):
    """The learning rate of round `iteration` (0-based): config.learning_rate, or with anneal_lr
    that times 1 - iteration / iters, falling linearly towards 0 over the run."""
    return config.learning_rate * (1 - iteration / config.iters) if config.anneal_lr else config.learning_rate


def set_learning_rate(optimizers, config, iteration):
    """Give every optimizer (None skipped) round `iteration`'s annealed_learning_rate."""
    for optimizer in filter(None, optimizers):
        for group in optimizer.param_groups:
            group['lr'] = annealed_learning_rate(config, iteration)


def prompt_groups(config, generator):
    """config.prompts_per_iter prompts, each repeated samples_per_prompt times (adjacent): (P * K, 4)."""
    prompts = sample_prompts(config.prompts_per_iter, generator)
    return prompts.repeat_interleave(config.samples_per_prompt, dim=0)


@torch.no_grad()
def rollout(actor, reference, reward_model, prompts, generator, preference, sampler=None):
    """Sample a response per prompt from the actor (or `sampler`, a Sampler) and compute, once:

    sentences (B, 9); logp_old, logp_ref (B, 4): log-probs of the sampled tokens only (the actions
    actually taken) under the actor and the reference; logp_sampler (B, 4): under the policy that
    sampled them (logp_old itself on-policy); score (B,): the reward model's; and, for the
    log, the exact next-token KL to the reference summed along each response, the entropy, and the
    rates of the preference's best gold level (Preference.best_level_rate) and of valid later
    digits, (B,) each.
    """
    reward_model.eval()  # frozen: only ever called here, under no_grad
    if sampler is None:
        sentences, logp_sampler = generate_responses(actor, prompts, generator), None
    else:
        sentences, logp_sampler = sampler(actor, prompts, generator)
    actor_log_probs = next_token_log_probs(actor, sentences)  # (B, 4, V)
    reference_log_probs = next_token_log_probs(reference, sentences)  # (B, 4, V)
    logp_old = token_log_probs_from(actor_log_probs, sentences)  # (B, 4): the trainer's policy at rollout time
    return {
        'sentences': sentences,
        'logp_old': logp_old,
        'logp_sampler': logp_old if logp_sampler is None else logp_sampler,  # (B, 4)
        'logp_ref': token_log_probs_from(reference_log_probs, sentences),  # (B, 4)
        'score': score_sentences(reward_model, sentences),  # (B,)
        'kl_full': kl_divergence(actor_log_probs.exp(), reference_log_probs).sum(dim=1),  # (B,)
        'entropy': -(actor_log_probs.exp() * actor_log_probs).sum(dim=-1).mean(dim=1),  # (B,)
        'preferred': preference.best_level_rate(actor_log_probs, sentences),  # (B,)
        'fidelity': rule_probability(actor_log_probs, sentences)[:, 1:].mean(dim=1),  # (B,)
    }


def minibatches(size, config):
    """Indices of the minibatches of config.epochs passes over a rollout of `size` samples, each
    pass in a fresh random order."""
    for _ in range(config.epochs):
        yield from torch.randperm(size).chunk(config.minibatches)


def rollout_row(batch, beta, samples, seconds):
    """The history row every online method logs, with TRL's metric names: the mean score, the k1
    estimate of the sequence KL and the exact one, the KL-regularised reward, the entropy, and the
    exact preference rate and fidelity of the rollout policy."""
    kl = (batch['logp_old'] - batch['logp_ref']).sum(dim=1)  # k1 estimate of the sequence KL
    score = batch['score']
    return {
        'samples': samples,
        'objective/scores': score.mean().item(),
        'objective/kl': kl.mean().item(),
        'objective/kl_full': batch['kl_full'].mean().item(),
        'objective/rlhf_reward': (score - beta * kl).mean().item(),
        'policy/entropy': batch['entropy'].mean().item(),
        'gold/preference_rate': batch['preferred'].mean().item(),
        'gold/fidelity': batch['fidelity'].mean().item(),
        'time/seconds': seconds,
    }


def mean_rows(rows):
    """The mean of each number over a list of dicts with the same keys: {name: float}."""
    return {name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}


class TrainingLog:
    """The history of a stage and its progress bar; `with` closes the bar, also when the stage fails.

        with TrainingLog(config.iters, 'PPO beta=1', progress, shown=('objective/scores',)) as log:
            for iteration in range(config.iters):
                ...
                log.end_round(iteration, batch, config.beta, stats, actor, measure)
    """

    def __init__(self, total, description, progress=True, shown=()):
        self.rows = []
        self.samples = 0  # responses sampled so far, counted by end_round
        self.shown = shown  # names of the row's numbers to show beside the bar
        self.bar = progress_bar(total, description, progress)
        self.clock = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.bar.close()

    def seconds(self):
        """Seconds since the last call (or the start): the time of one iteration."""
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        return seconds

    def add(self, row):
        """Append a row to the history and show its numbers beside the bar."""
        self.rows.append(row)
        self.bar.set_postfix({name.split('/')[-1]: f'{row[name]:.3f}' for name in self.shown})

    def step(self):
        self.bar.update(1)

    def end_round(self, iteration, batch, beta, stats, policy, measure=None):
        """Close a round of an online method: count its responses, log the rollout's row, the update's
        stats and what measure(rounds done, policy) returns, and move the bar."""
        self.samples += len(batch['sentences'])
        measured = measure(iteration + 1, policy) if measure is not None else {}
        self.add({'iter': iteration, **rollout_row(batch, beta, self.samples, self.seconds()), **stats, **measured})
        self.step()
