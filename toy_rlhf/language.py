"""The digit language, known exactly.

A sentence is a prompt of four uniform digits x1..x4, the separator SEP, then four output digits.
Each output digit is (c + 1) % 10, where c is drawn uniformly from the last four digits written
so far (SEP does not count): x1..x4 for the first output digit, x2 x3 x4 y1 for the second, ...

    5 7 1 5 | 6 2 7 3     6 = 5+1 (from x1 or x4), 2 = 1+1, 7 = 6+1 (from y1), 3 = 2+1 (from y2)

Because the rule is known, every next-token distribution is known exactly, and a learned model can be
compared with it exactly rather than by eye.
"""
import torch

DIGITS = 10  # tokens 0..9
SEP = 10  # separates prompt and response
CLS = 11  # appended to a response for the reward model to read its score at
VOCAB_SIZE = 11  # what a policy reads and writes: digits and SEP
PROMPT_LENGTH = 4
RESPONSE_LENGTH = 4
WINDOW = 4  # an output digit increments one of the last WINDOW digits
SEQUENCE_LENGTH = PROMPT_LENGTH + 1 + RESPONSE_LENGTH  # prompt, SEP, response


def sample_prompts(n, generator=None):
    """n prompts of uniform digits: (n, PROMPT_LENGTH) long."""
    return torch.randint(DIGITS, (n, PROMPT_LENGTH), generator=generator)


def increments(window):
    """The tokens the rule allows after a window of digits: (..., WINDOW) -> (..., WINDOW)."""
    return (window + 1) % DIGITS


def sample_responses(prompts, generator=None, first_digit=None):
    """Language continuations of prompts (B, 4) -> responses (B, 4).

    first_digit (B,), if given, fixes the first output digit; the later digits still follow the rule.
    """
    digits = prompts
    for step in range(RESPONSE_LENGTH):
        if step == 0 and first_digit is not None:
            token = first_digit
        else:
            choice = torch.randint(WINDOW, (len(prompts), 1), generator=generator)
            token = increments(digits[:, -WINDOW:]).gather(1, choice).squeeze(1)
        digits = torch.cat([digits, token.unsqueeze(1)], dim=1)
    return digits[:, PROMPT_LENGTH:]


def with_each_first_digit(responses):
    """Each response with its first digit replaced by 0, 1, .., 9 in turn, the later digits kept:
    (B, 4) -> (B * 10, 4), the ten variants of a response adjacent."""
    variants = responses.repeat_interleave(DIGITS, dim=0)
    variants[:, 0] = torch.arange(DIGITS).repeat(len(responses))
    return variants


def join(prompts, responses=None):
    """Prompts (B, 4) and responses (B, k) -> sequences prompt + SEP + response (B, 5 + k);
    without responses, the context a response is generated from (B, 5)."""
    sep = torch.full((len(prompts), 1), SEP, dtype=prompts.dtype, device=prompts.device)
    return torch.cat([prompts, sep] if responses is None else [prompts, sep, responses], dim=1)


def windows(prefix):
    """The last WINDOW digits of each prefix (B, 5 + k), SEP skipped: (B, WINDOW)."""
    if prefix.size(1) < PROMPT_LENGTH + 1 or prefix.size(1) > SEQUENCE_LENGTH - 1:
        raise ValueError(f'a prefix is prompt + SEP + 0..{RESPONSE_LENGTH - 1} digits '
                         f'(length 5..{SEQUENCE_LENGTH - 1}), got length {prefix.size(1)}')
    digits = torch.cat([prefix[:, :PROMPT_LENGTH], prefix[:, PROMPT_LENGTH + 1:]], dim=1)
    return digits[:, -WINDOW:]


def next_token_distribution(prefix):
    """The exact distribution of the next token after each prefix (B, 5 + k), k in 0..3.

    Returns (B, VOCAB_SIZE): 1/4 on the increment of each window digit, duplicates adding up;
    zero on SEP.
    """
    allowed = increments(windows(prefix))
    one_hot = torch.nn.functional.one_hot(allowed, VOCAB_SIZE).to(torch.float32)
    return one_hot.mean(dim=1)


def is_valid_output(prompts, responses):
    """Whether each response token (B, k) follows the rule given everything before it: (B, k) bool."""
    digits = prompts
    valid = []
    for step in range(responses.size(1)):
        token = responses[:, step]
        allowed = increments(digits[:, -WINDOW:])
        valid.append((allowed == token.unsqueeze(1)).any(dim=1))
        digits = torch.cat([digits, token.unsqueeze(1)], dim=1)
    return torch.stack(valid, dim=1)


def entropy_floor():
    """The exact minimum of the SFT loss: the entropy (nats) of the true next-token distribution,
    averaged over the four output positions and over all sentences.

    The next-token distribution depends only on the window of the last four digits, so this tracks
    the exact probability of each of the 10^4 windows through the four steps, starting from the
    uniform prompt distribution (enumeration, no sampling).
    """
    states = torch.cartesian_prod(*[torch.arange(DIGITS)] * WINDOW)  # (10^4, 4), row i encodes i
    probability = torch.full((len(states),), 1.0 / len(states), dtype=torch.float64)
    allowed = increments(states)
    next_distribution = torch.nn.functional.one_hot(allowed, DIGITS).to(torch.float64).mean(dim=1)
    entropy = -(next_distribution * next_distribution.clamp_min(1e-300).log()).sum(dim=1)
    place_values = DIGITS ** torch.arange(WINDOW - 1, -1, -1)
    shifted = (states[:, 1:] * place_values[1:]).sum(dim=1)  # the window's last three digits

    position_entropies = []
    for _ in range(RESPONSE_LENGTH):
        position_entropies.append((probability * entropy).sum())
        following = torch.zeros_like(probability)
        for slot in range(WINDOW):
            following.index_add_(0, shifted * DIGITS + allowed[:, slot], probability / WINDOW)
        probability = following
    return torch.stack(position_entropies).mean().item()
