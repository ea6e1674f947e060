"""Exact measurements of a policy against the known language."""
import torch

from toy_rlhf.language import PROMPT_LENGTH, RESPONSE_LENGTH, join, next_token_distribution, sample_prompts, sample_responses
from toy_rlhf.policy import response_log_probs


def kl_from_truth(model, sequences):
    """KL(true || model) in nats at each response position of sentences (B, 9) -> (B, 4)."""
    log_q = response_log_probs(model, sequences)
    kls = []
    for step in range(RESPONSE_LENGTH):
        p = next_token_distribution(sequences[:, :PROMPT_LENGTH + 1 + step])
        kls.append(torch.xlogy(p, p).sum(dim=1) - (p * log_q[:, step]).sum(dim=1))
    return torch.stack(kls, dim=1)


@torch.no_grad()
def language_kl(model, n=4096, seed=0):
    """Mean over output positions of KL(true language || model), in nats, by teacher forcing on n
    language sentences drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n, generator)
    sentences = join(prompts, sample_responses(prompts, generator))
    return kl_from_truth(model.eval(), sentences).mean().item()
