"""The policy: a GPT over digits and SEP that writes a response after prompt + SEP.

Log-probabilities go by one name per shape, here and everywhere: next_token_log_probs (B, T, vocab),
the distribution at each response position; token_log_probs (B, T), of the tokens a response holds;
sequence_log_probs (B,), of whole responses (methods/dpo.py); all_response_log_probs (P, 10^4), of
every response of each prompt (toy_rlhf.enumeration).
"""
import torch

from mingpt.model import GPT
from toy_rlhf.language import PROMPT_LENGTH, RESPONSE_LENGTH, SEQUENCE_LENGTH, VOCAB_SIZE, join


def policy_config(model_type='gpt-nano'):
    """A GPT config for the policy: vocabulary of digits and SEP, context of a sentence minus its
    last token. Dropout is off: the data is unlimited (nothing to overfit) and RL needs the network
    that samples to be the one that scores (same log-probs, deterministic)."""
    config = GPT.get_default_config()
    config.model_type = model_type
    config.vocab_size = VOCAB_SIZE
    config.block_size = SEQUENCE_LENGTH - 1
    config.embd_pdrop = config.resid_pdrop = config.attn_pdrop = 0.0
    return config


def started_from(policy, config):
    """A GPT built from `config` that starts from every weight of `policy` but its output head, which
    is new. The token and position tables are copied into their first rows, so `config` may add
    tokens or positions (the reward model's CLS); their new rows keep GPT's initialisation.
    `config` must have the policy's sizes (n_layer, n_head, n_embd)."""
    model = GPT(config)
    weights = model.state_dict()
    for name, tensor in policy.state_dict().items():
        if not name.startswith('lm_head.'):
            weights[name][:len(tensor)] = tensor
    model.load_state_dict(weights)
    return model


def next_token_log_probs(model, sequences):
    """Log-probabilities of the next token at each response position, by teacher forcing.

    sequences: (B, 9) prompt + SEP + 4 digits -> (B, 4, vocab): row t is log pi(. | prefix of y_t).
    """
    logits, _ = model(sequences[:, :-1])
    return logits[:, PROMPT_LENGTH:].log_softmax(dim=-1)


def token_log_probs_from(log_probs, sequences):
    """From next-token log-probs (B, 4, vocab), those of the response tokens actually in
    `sequences` (B, 9): (B, 4)."""
    return log_probs.gather(2, sequences[:, PROMPT_LENGTH + 1:].unsqueeze(2)).squeeze(2)


def token_log_probs(model, sequences):
    """Log-probabilities of the response tokens actually in `sequences` (B, 9) -> (B, 4)."""
    return token_log_probs_from(next_token_log_probs(model, sequences), sequences)


@torch.no_grad()
def generate_responses(model, prompts, generator=None):
    """Sample a response at temperature 1 (no top-k) for each prompt (B, 4) -> sentences (B, 9)."""
    return model.generate(join(prompts), RESPONSE_LENGTH, do_sample=True, generator=generator)
