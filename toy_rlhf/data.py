"""Training data: language sentences for SFT, and labelled preference pairs for the reward model."""
import torch
from torch.utils.data import Dataset

from toy_rlhf.language import CLS, PROMPT_LENGTH, WINDOW, increments, join, sample_prompts, sample_responses
from toy_rlhf.metrics import true_distributions
from toy_rlhf.policy import generate_responses
from toy_rlhf.preferences import sample_aligned_path


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
    """A fixed set of `size` sentences for minGPT's Trainer: item i -> (x, y) as in supervised_batch.

    targets 'exact': y is instead the language's exact next-token distribution at each output position
    (4, vocab), given the sentence's sampled digits before it; the sentences are the same as with
    'sampled' for the same seed, only what each position is scored against differs.
    """

    def __init__(self, size, seed=0, targets='sampled'):
        self.x, self.y = supervised_batch(size, torch.Generator().manual_seed(seed))
        if targets == 'exact':
            self.y = true_distributions(torch.cat([self.x, self.y[:, -1:]], dim=1))  # (size, 4, vocab)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def gold_reward(prompts, responses, margin, preference):
    """The hidden true reward the labeler judges by: the preference's gold reward times `margin`
    (first-digit: `margin` if the first output digit is the preferred one, else 0).
    prompts (B, 4), responses (B, 4) -> (B,) float."""
    return preference.reward(prompts, responses) * margin


def labeler(prompts, first, second, margin, preference, generator=None):
    """The stand-in for a human judging by `preference`: True where `first` is chosen over `second`.

    Bradley-Terry: P(first chosen) = sigmoid(r_gold(first) - r_gold(second)), so a large margin gives
    (almost) noiseless labels and a small one noisy labels. Equal gold rewards give a coin flip.
    """
    difference = gold_reward(prompts, first, margin, preference) - gold_reward(prompts, second, margin, preference)
    return torch.rand(len(prompts), generator=generator) < torch.sigmoid(difference)


def with_cls(responses):
    """Append the CLS token the reward model reads its score at: (B, 4) -> (B, 5)."""
    return torch.cat([responses, torch.full_like(responses[:, :1], CLS)], dim=1)


class PreferenceDataset(Dataset):
    """`size` labelled pairs: item i -> (prompt + SEP (5,), chosen (5,), rejected (5,)), responses
    ending with CLS; the labeler decides which of a pair is chosen, by the preference's gold reward.

    source 'first-digit' (the notebook's, for a preference with a first_token): both responses are
    valid sentences, one starts with the preferred first digit, the other with another digit the rule
    allows. Prompts whose four digits are all equal allow only the preferred first digit, so they
    cannot form a pair and are not drawn. 'language' / 'sft': two responses sampled independently for
    the same prompt from the language / from `policy` (InstructGPT's way). 'aligned': one response of
    the aligned language (the best gold level the language reaches for the prompt) and one of the
    language, the first-digit construction for any preference: where the language rarely reaches the
    best level, most language pairs are ties. Pairs of equal gold reward get coin-flip labels.
    'default': the preference's own choice.
    """

    def __init__(self, size, gold_margin, seed, preference, source='default', policy=None):
        generator = torch.Generator().manual_seed(seed)
        source = preference.pairs if source == 'default' else source
        if source == 'first-digit':
            prompts = _pairable_prompts(size, generator)
            preferred = preference.first_token(prompts)
            first = sample_responses(prompts, generator, first_digit=preferred)
            second = sample_responses(prompts, generator,
                                      first_digit=_other_allowed_first(prompts, preferred, generator))
        elif source == 'aligned':
            prompts = sample_prompts(size, generator)
            first, second = sample_aligned_path(preference, prompts, generator), sample_responses(prompts, generator)
        else:
            prompts = sample_prompts(size, generator)
            first, second = (_sampled_responses(prompts, source, policy, generator) for _ in range(2))
        first_wins = labeler(prompts, first, second, gold_margin, preference, generator).unsqueeze(1)
        self.decisive = preference.reward(prompts, first) != preference.reward(prompts, second)  # (size,): not a tie
        self.context = join(prompts)
        self.chosen = with_cls(torch.where(first_wins, first, second))
        self.rejected = with_cls(torch.where(first_wins, second, first))

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


def _sampled_responses(prompts, source, policy, generator):
    """One response per prompt (B, 4) from the language or from policy (source 'sft'): (B, 4)."""
    if source == 'language':
        return sample_responses(prompts, generator)
    return generate_responses(policy.eval(), prompts, generator)[:, PROMPT_LENGTH + 1:]


def _other_allowed_first(prompts, preferred, generator):
    """A first output digit the rule allows that is not `preferred` (B,), uniform over the window
    slots that give one: (B, 4) -> (B,)."""
    allowed = increments(prompts[:, -WINDOW:])
    other = allowed != preferred.unsqueeze(1)
    weights = other.to(torch.float32)
    choice = torch.multinomial(weights, 1, generator=generator)
    return allowed.gather(1, choice).squeeze(1)

