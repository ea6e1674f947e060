"""A warm start for PPO by rejection-sampling fine-tuning (RFT, best-of-n fine-tuning): draw n
responses per prompt from the reference, keep one, and fine-tune the actor on the kept sentences by
cross-entropy on their response tokens. Which one is kept (`warm_start_pick`):
- 'best': the one the reward model scores highest (RFT as Llama 2, RAFT and ReST's first step do);
- 'resample': one drawn with probability softmax(score / beta) over the n (sampling-importance-
  resampling): approximately a sample of pi* = pi_ref exp(r / beta) / Z, exactly as n grows, so the
  fine-tuning is a sampled forward-KL fit of pi*. Where several of the n reach the top level, 'best'
  keeps whichever the reward model's small differences favour, the same one for similar prompts;
  'resample' keeps them in pi*'s proportions, at the same cost.

Why: on `last-digit` PPO from the SFT policy collapses onto one response during its climb (results,
"The collapse and the ceiling"), and the exact optimiser reached more of the gap when started from a
fit of pi* than from the SFT policy. Best-of-n of the reference is the practitioners' cheap start
nearer pi* (Llama 2's rejection sampling, RAFT, ReST's first step): it moves the policy towards
high reward while keeping much of the reference's spread. The reference of the KL penalty stays the
SFT policy, so the objective, and pi*, are unchanged; only where PPO starts moves.
"""
import copy
import hashlib
from dataclasses import asdict

import torch
import torch.nn.functional as F

from toy_rlhf.language import sample_prompts
from toy_rlhf.policy import generate_responses, next_token_log_probs
from toy_rlhf.reward import score_sentences
from toy_rlhf.training import gradient_step


@torch.no_grad()
def kept_sentences(reference, reward_model, prompts, n, generator, pick='best', beta=1.0):
    """For each prompt (P, 4), the sentence (P, 9) of one of n responses drawn from the reference:
    the reward model's best (pick 'best'; ties go to the first drawn), or one drawn with probability
    softmax(score / beta) over the n (pick 'resample')."""
    sentences = generate_responses(reference, prompts.repeat_interleave(n, dim=0), generator)  # (P * n, 9)
    scores = score_sentences(reward_model, sentences).view(-1, n)  # (P, n)
    if pick == 'best':
        kept = scores.argmax(dim=1)
    else:  # self-normalised importance weights of pi* against the reference, which drew them
        kept = torch.multinomial(torch.softmax(scores.double() / beta, dim=1), 1, generator=generator).squeeze(1)
    return sentences.view(len(prompts), n, -1)[torch.arange(len(prompts)), kept]


def response_cross_entropy(policy, sentences):
    """The mean cross-entropy of the response tokens of sentences (B, 9) under policy: the prompt is
    given, not learned."""
    log_probs = next_token_log_probs(policy, sentences)  # (B, 4, V)
    return F.nll_loss(log_probs.flatten(0, 1), sentences[:, -log_probs.size(1):].flatten())


# The last warm start this process made, under what it was made from. `toy-rlhf all` trains PPO at
# two betas from the same SFT policy, reward model and seed, and keeping the best of n does not
# depend on beta: the second run takes the first's result (the actor's weights and the generator's
# state after it, so every later draw is the same) instead of paying for it again.
_last_warm_start = {}


def warm_start(actor, reference, reward_model, config, generator):
    """rejection_sampling_fine_tune, or the same result without its cost when the last call in this
    process had the same inputs: the same weights of actor, reference and reward model, generator
    state and settings (beta among them only where the pick depends on it). Returns the samples drawn."""
    settings = {name: value for name, value in asdict(config).items()
                if name != 'beta' or config.warm_start_pick == 'resample'}
    key = (weights_digest(actor, reference, reward_model), generator.get_state().numpy().tobytes(), repr(settings))
    if key not in _last_warm_start:
        samples = rejection_sampling_fine_tune(actor, reference, reward_model, config, generator)
        _last_warm_start.clear()
        _last_warm_start[key] = copy.deepcopy(actor.state_dict()), generator.get_state(), samples
    weights, generator_state, samples = _last_warm_start[key]
    actor.load_state_dict(weights)
    generator.set_state(generator_state)
    actor.eval()
    return samples


def weights_digest(*models):
    """A hash of the models' weights, in order."""
    digest = hashlib.sha256()
    for model in models:
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def rejection_sampling_fine_tune(actor, reference, reward_model, config, generator):
    """Fine-tune `actor` in place on one kept (config.warm_start_pick) of config.warm_start_n
    reference responses to each of config.warm_start_prompts fresh prompts: config.warm_start_epochs passes in minibatches of
    config.warm_start_batch_size, with an Adam of its own at config.warm_start_learning_rate (PPO's
    optimizer starts fresh after it). Returns the number of responses drawn, for the log's sample count."""
    prompts = sample_prompts(config.warm_start_prompts, generator)
    sentences = kept_sentences(reference, reward_model, prompts, config.warm_start_n, generator,
                               config.warm_start_pick, config.beta)
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.warm_start_learning_rate, foreach=True)
    actor.train()
    for _ in range(config.warm_start_epochs):
        for index in torch.randperm(len(sentences), generator=generator).split(config.warm_start_batch_size):
            gradient_step(optimizer, response_cross_entropy(actor, sentences[index]), actor, config.max_grad_norm)
    actor.eval()
    return len(prompts) * config.warm_start_n
