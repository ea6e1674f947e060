"""Every response, enumerated: a policy's log-probability and a reward model's score of each of the
10^4 digit responses to a prompt, computed exactly (no sampling) in one pass of the model.

A response is four digits, so the responses to a prompt form a trie of depth four: 10 one-digit
prefixes, 100 two-digit ones, ... The pass runs each node of the trie once, attending to the keys
and values its ancestors left in a cache, instead of running 10^4 full sequences: the first digit
a thousand responses share is computed once, not a thousand times. These tables are what
toy_rlhf.optimal compares a policy with the optimum on; one pass of each model serves every beta.
"""
import math

import torch

from toy_rlhf.language import CLS, DIGITS, RESPONSE_LENGTH, join, sample_prompts
from toy_rlhf.training import TrainingError

RESPONSES = DIGITS ** RESPONSE_LENGTH  # 10^4 digit responses per prompt


def all_responses():
    """Every digit response in lexicographic order: (10^4, 4) long; row i holds the digits of i."""
    return torch.cartesian_prod(*[torch.arange(DIGITS)] * RESPONSE_LENGTH)


def trie_outputs(model, contexts, depth, end_token=None):
    """A GPT's outputs after contexts (P, T0) followed by every digit string of up to `depth` digits,
    each node of the trie of strings computed once (eval mode: no dropout). Differentiable: under
    torch.no_grad() for tables, with gradients for the exact optimiser (toy_rlhf.methods.exact).

    Returns a list: (P, 1, out) at the context's last position, then (P, 10^l, out) after each
    string of l = 1..depth digits in lexicographic order, then, if end_token is given, (P, 10^depth,
    out) after each full string followed by end_token. Equal to model(context + string) at those
    positions: a node attends to the cached keys and values of its ancestors, so the positions a
    thousand sequences share are computed once, not a thousand times.
    """
    P, T0 = contexts.shape
    cache = [[] for _ in model.transformer.h]  # per layer: (keys, values) of each level
    outputs = [_extend(model, contexts.unsqueeze(1), 0, cache)[:, :, -1]]
    for level in range(1, depth + 1):
        # Level l holds the 10^l strings of l digits; node j ends in digit j % 10.
        digits = torch.arange(DIGITS, device=contexts.device).repeat(DIGITS ** (level - 1))
        if level == depth and end_token is not None:  # only the keys and values the end token reads
            _extend(model, digits.expand(P, -1).unsqueeze(2), T0 + level - 1, cache, keys_only=True)
            break
        outputs.append(_extend(model, digits.expand(P, -1).unsqueeze(2), T0 + level - 1, cache)[:, :, 0])
    if end_token is not None:
        ends = torch.full((P, DIGITS ** depth, 1), end_token, device=contexts.device)
        outputs.append(_extend(model, ends, T0 + depth, cache)[:, :, 0])
    return outputs


def _extend(model, tokens, position, cache, keys_only=False):
    """Run tokens (P, N, n) of N nodes at positions position..position + n - 1 through the model,
    each node attending to its ancestors' keys and values in cache and causally to its own tokens;
    appends the new keys and values to cache, heads first: (P, n_head, N, n, head size). Returns the
    outputs (P, N, n, out); with keys_only, nothing: the last block stops once its keys and values
    are cached (no later position reads more)."""
    P, N, n = tokens.shape
    positions = torch.arange(position, position + n, device=tokens.device)
    x = (model.transformer.wte(tokens) + model.transformer.wpe(positions)).view(P * N, n, -1)
    for block, layer_cache in zip(model.transformer.h, cache):
        q, k, v = (t.view(P, N, *t.shape[1:]).transpose(1, 2).contiguous()
                   for t in block.attn.query_key_value(block.ln_1(x)))  # (P, nh, N, n, hs)
        layer_cache.append((k, v))
        if keys_only and block is model.transformer.h[-1]:
            return None
        y = _attention(q, layer_cache)
        x = x + block.attn.c_proj(y.permute(0, 2, 3, 1, 4).reshape(P * N, n, -1))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x)).view(P, N, n, -1)


def _attention(q, levels):
    """Softmax attention of queries q (P, nh, N, n, hs) over the keys and values of each level, (P,
    nh, N_t, n_t, hs) each, the last level being the queries' own tokens (seen causally).

    In lexicographic order the N / N_t consecutive nodes below a node of level t are its
    descendants, so viewing q as (P nh N_t, (N / N_t) n, hs) lines the queries below each node up
    with that node's keys: one batched matrix product per level, without copying any key N / N_t
    times (broadcast products summed made a table 1.4x slower, most of it writing their (..., hs) terms).
    Where a level's node has a single key and a single query below it, the product is a broadcast
    one (a batched product of 1 x 1 matrices is slower). The softmax over rows of at most 10 is
    written out (the library's is slower at that width). Returns (P, nh, N, n, hs)."""
    P, nh, N, n, hs = q.shape
    scores = torch.cat([_grouped_product(q, k.transpose(-2, -1), k.size(2)).view(P, nh, N, n, -1)
                        for k, _ in levels], dim=-1) / math.sqrt(hs)
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(diagonal=1)
    scores[..., -n:].masked_fill_(future, float('-inf'))  # a token does not see its own level's later ones
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    weights = (weights / weights.sum(dim=-1, keepdim=True)).split([k.size(3) for k, _ in levels], dim=-1)
    y = torch.zeros_like(q)
    for w, (_, v) in zip(weights, levels):
        y += _grouped_product(w, v, v.size(2)).view(q.shape)
    return y


def _grouped_product(a, b, groups):
    """a (P, nh, N, ...) in `groups` runs of consecutive nodes, each run times its own matrix of b
    (P, nh, groups, r, c): (P nh groups, rows of a's run, r) @ (r, c) -> (P nh groups, rows, c)."""
    P, nh = a.shape[:2]
    a = a.reshape(P * nh * groups, -1, b.size(-2))
    b = b.reshape(P * nh * groups, b.size(-2), b.size(-1))
    if a.size(2) == 1:  # an outer product
        return a * b
    if a.size(1) == 1 and b.size(2) == 1:  # a dot product
        return (a.transpose(1, 2) * b).sum(dim=1, keepdim=True)
    return a @ b


@torch.no_grad()
def all_response_log_probs(policy, prompts, prompts_per_pass=10):
    """log pi(y|x) of every digit response: prompts (P, 4) -> (P, 10^4) float64, responses in the
    order of all_responses(), without gradients (all_response_log_probs_with_grad, with them).

    One pass over the trie of the 1,000 three-digit prefixes y1 y2 y3 per prompt (not 10^4 x 4
    rows): the outputs after prompt + SEP + y1..yl give pi(y_{l+1} | y1..yl), and log pi(y) is the
    sum of the four conditionals. Where the policy can write SEP the digits' probabilities sum to
    less than 1; see non_digit_mass.
    """
    return torch.cat([all_response_log_probs_with_grad(policy, chunk) for chunk in prompts.split(prompts_per_pass)])


def all_response_log_probs_with_grad(policy, prompts):
    """all_response_log_probs in one pass with the autograd graph kept: (P, 4) -> (P, 10^4) float64,
    whose gradient is the exact gradient of any function of pi_theta over all responses. The
    log-softmax is taken in float64, so that log pi of a response of probability 1e-12 keeps its digits
    and an objective summed over 10^4 responses is not swamped by rounding."""
    P = len(prompts)
    levels = trie_outputs(policy, join(prompts), RESPONSE_LENGTH - 1)
    # Softmax over the whole vocabulary, then the digits: SEP keeps its share of the mass.
    conditionals = [out.double().log_softmax(dim=-1)[..., :DIGITS].reshape(P, -1) for out in levels]
    return sum(c.repeat_interleave(RESPONSES // c.size(1), dim=1) for c in conditionals)


@torch.no_grad()
def all_response_rewards(reward_model, prompts, prompts_per_pass=1):
    """The reward model's score of every digit response, read at CLS after prompt + SEP + response:
    prompts (P, 4) -> (P, 10^4) float64, by the same trie (each response's digits computed once).

    prompts_per_pass bounds the memory, ~100 MB per prompt for gpt-nano; the 10^4 leaves of one
    prompt are already a batch large enough to be fast, so one at a time is both lean and quickest.
    """
    return torch.cat([trie_outputs(reward_model, join(chunk), RESPONSE_LENGTH, end_token=CLS)[-1]
                      .squeeze(2).double() for chunk in prompts.split(prompts_per_pass)])


# ---------------------------------------------------------------------------------------------
# The tables a method trains on (the exact optimiser, distillation): of fresh prompts each step, or of
# a fixed pool computed once, since the reward model's table of a prompt costs far more than a step.

def prompt_tables(reference, rewards_of, prompts):
    """(prompts (P, 4), log pi_ref (P, 10^4), rewards_of(prompts) (P, 10^4)), without gradients."""
    with torch.no_grad():
        return prompts, all_response_log_probs(reference, prompts), rewards_of(prompts)


def prompt_pool(reference, rewards_of, config, generator):
    """The prompt_tables of config.prompt_pool prompts drawn with generator, or None for 0 (fresh
    prompts each step). A step draws config.prompts_per_iter of them without replacement, so a pool
    must hold at least that many."""
    if not config.prompt_pool:
        return None
    if config.prompt_pool < config.prompts_per_iter:
        raise TrainingError(f'prompt_pool {config.prompt_pool} is smaller than prompts_per_iter '
                            f'{config.prompts_per_iter}: each step draws its prompts from the pool; give a pool '
                            f'of at least {config.prompts_per_iter}, or 0 for fresh prompts')
    return prompt_tables(reference, rewards_of, sample_prompts(config.prompt_pool, generator))


def step_tables(reference, rewards_of, config, generator, pool=None):
    """The prompts of a step and their tables: config.prompts_per_iter fresh ones, or as many drawn
    without replacement from the pool's (prompt_pool)."""
    if pool is None:
        return prompt_tables(reference, rewards_of, sample_prompts(config.prompts_per_iter, generator))
    chosen = torch.randperm(len(pool[0]), generator=generator)[:config.prompts_per_iter]
    return tuple(table[chosen] for table in pool)
