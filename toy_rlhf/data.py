"""Training data: language sentences for SFT, and labelled preference pairs for the reward model."""
import torch
from torch.utils.data import Dataset

from toy_rlhf.language import (CLS, PROMPT_LENGTH, WINDOW, increments, join,
                               preferred_first_token, sample_prompts, sample_responses)


def supervised_batch(n, generator=None):
    """n fresh sentences in the notebook's SFT layout.

    x = [x1 x2 x3 x4 SEP y1 y2 y3] (n, 8); y = [-1 -1 -1 -1 y1 y2 y3 y4] (n, 8): the loss is taken on
    the output digits only, each predicted from everything before it.
    """
    prompts = sample_prompts(n, generator)
    sentences = join(prompts, sample_responses(prompts, generator))
    x = sentences[:, :-1]
    y = sentences[:, 1:].clone()
    y[:, :PROMPT_LENGTH] = -1
    return x, y


class SupervisedDataset(Dataset):
    """A fixed set of `size` sentences for minGPT's Trainer: item i -> (x, y) as in supervised_batch."""

    def __init__(self, size, seed=0):
        self.x, self.y = supervised_batch(size, torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def gold_reward(prompts, responses, margin):
    """The hidden true reward the labeler judges by: `margin` if the first output digit is the
    preferred one, else 0. prompts (B, 4), responses (B, >=1) -> (B,) float."""
    preferred = responses[:, 0] == preferred_first_token(prompts)
    return preferred.to(torch.float32) * margin


def labeler(prompts, first, second, margin, generator=None):
    """The stand-in for a human: True where `first` is chosen over `second`.

    Bradley-Terry: P(first chosen) = sigmoid(r_gold(first) - r_gold(second)), so a large margin gives
    (almost) noiseless labels and a small one noisy labels.
    """
    difference = gold_reward(prompts, first, margin) - gold_reward(prompts, second, margin)
    return torch.rand(len(prompts), generator=generator) < torch.sigmoid(difference)


def with_cls(responses):
    """Append the CLS token the reward model reads its score at: (B, 4) -> (B, 5)."""
    return torch.cat([responses, torch.full_like(responses[:, :1], CLS)], dim=1)


class PreferenceDataset(Dataset):
    """`size` labelled pairs: item i -> (prompt + SEP (5,), chosen (5,), rejected (5,)).

    Both responses are valid sentences of the language and end with CLS. One starts with the
    preferred first digit (x4 + 1) % 10, the other with another digit the rule allows; the labeler
    decides which is chosen. Prompts whose four digits are all equal allow only the preferred
    first digit, so they cannot form a pair and are not drawn.
    """

    def __init__(self, size, gold_margin, seed=0):
        generator = torch.Generator().manual_seed(seed)
        prompts = _pairable_prompts(size, generator)
        preferred = preferred_first_token(prompts)
        good = sample_responses(prompts, generator, first_token=preferred)
        bad = sample_responses(prompts, generator, first_token=_other_allowed_first(prompts, generator))
        good_wins = labeler(prompts, good, bad, gold_margin, generator).unsqueeze(1)
        self.context = join(prompts)
        self.chosen = with_cls(torch.where(good_wins, good, bad))
        self.rejected = with_cls(torch.where(good_wins, bad, good))

    def __len__(self):
        return len(self.context)

    def __getitem__(self, i):
        return self.context[i], self.chosen[i], self.rejected[i]

    def sequences(self, index=slice(None)):
        """The chosen and rejected sequences of the indexed pairs, each prompt + SEP + response +
        CLS: two (B, 10) tensors."""
        context = self.context[index]
        return torch.cat([context, self.chosen[index]], 1), torch.cat([context, self.rejected[index]], 1)


def _pairable_prompts(n, generator):
    """n uniform prompts, redrawn where all four digits are equal (no valid rejected response)."""
    prompts = sample_prompts(n, generator)
    while True:
        unpairable = (prompts == prompts[:, :1]).all(dim=1)
        if not unpairable.any():
            return prompts
        prompts[unpairable] = sample_prompts(int(unpairable.sum()), generator)


def _other_allowed_first(prompts, generator):
    """A first output digit the rule allows that is not the preferred one, uniform over the window
    slots that give one: (B, 4) -> (B,)."""
    allowed = increments(prompts[:, -WINDOW:])
    other = allowed != preferred_first_token(prompts).unsqueeze(1)
    weights = other.to(torch.float32)
    choice = torch.multinomial(weights, 1, generator=generator)
    return allowed.gather(1, choice).squeeze(1)

