"""A warm start for PPO by rejection-sampling fine-tuning (RFT, best-of-n fine-tuning): draw n
responses per prompt from the reference, keep the one the reward model scores highest, and fine-tune
the actor on the kept sentences by cross-entropy on their response tokens.

Why: on `last-digit` PPO from the SFT policy collapses onto one response during its climb (results,
"The collapse and the ceiling"), and the exact optimiser reached more of the gap when started from a
fit of pi* than from the SFT policy. Best-of-n of the reference is the practitioners' cheap start
nearer pi* (Llama 2's rejection sampling, RAFT, ReST's first step): it moves the policy towards
high reward while keeping much of the reference's spread. The reference of the KL penalty stays the
SFT policy, so the objective, and pi*, are unchanged; only where PPO starts moves.
"""
import torch
import torch.nn.functional as F

from toy_rlhf.language import sample_prompts
from toy_rlhf.policy import generate_responses, next_token_log_probs
from toy_rlhf.reward import score_sentences
from toy_rlhf.training import gradient_step


@torch.no_grad()
def best_of_n_sentences(reference, reward_model, prompts, n, generator):
    """For each prompt (P, 4), the sentence (P, 9) of the reward model's best of n responses drawn
    from the reference (ties go to the first drawn)."""
    sentences = generate_responses(reference, prompts.repeat_interleave(n, dim=0), generator)  # (P * n, 9)
    best = score_sentences(reward_model, sentences).view(-1, n).argmax(dim=1)  # (P,)
    return sentences.view(len(prompts), n, -1)[torch.arange(len(prompts)), best]


def response_cross_entropy(policy, sentences):
    """The mean cross-entropy of the response tokens of sentences (B, 9) under policy: the prompt is
    given, not learned."""
    log_probs = next_token_log_probs(policy, sentences)  # (B, 4, V)
    return F.nll_loss(log_probs.flatten(0, 1), sentences[:, -log_probs.size(1):].flatten())


def rejection_sampling_fine_tune(actor, reference, reward_model, config, generator):
    """Fine-tune `actor` in place on the best of config.warm_start_n reference responses to each of
    config.warm_start_prompts fresh prompts: config.warm_start_epochs passes in minibatches of
    config.prompts_per_iter, with an Adam of its own at config.warm_start_learning_rate (PPO's
    optimizer starts fresh after it). Returns the number of responses drawn, for the log's sample count."""
    prompts = sample_prompts(config.warm_start_prompts, generator)
    sentences = best_of_n_sentences(reference, reward_model, prompts, config.warm_start_n, generator)
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.warm_start_learning_rate)
    actor.train()
    for _ in range(config.warm_start_epochs):
        for index in torch.randperm(len(sentences), generator=generator).split(config.prompts_per_iter):
            gradient_step(optimizer, response_cross_entropy(actor, sentences[index]), actor, config.max_grad_norm)
    actor.eval()
    return len(prompts) * config.warm_start_n
