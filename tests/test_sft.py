"""SFT: what the policy learns from, and that it learns the language, measured against the exact one."""
import torch
import torch.nn.functional as F

from mingpt.model import GPT
from toy_rlhf.data import SupervisedDataset
from toy_rlhf.language import PROMPT_LENGTH, next_token_distribution
from toy_rlhf.metrics import language_kl
from toy_rlhf.policy import policy_config
from toy_rlhf.sft import ExpectedCrossEntropy, SFTConfig, train_sft


def test_exact_targets_are_the_languages_next_token_distributions_of_the_same_sentences():
    sampled, exact = SupervisedDataset(200, seed=5), SupervisedDataset(200, seed=5, targets='exact')
    assert torch.equal(sampled.x, exact.x)
    assert exact.y.shape == (200, 4, 11)
    sentences = torch.cat([sampled.x, sampled.y[:, -1:]], dim=1)  # (200, 9)
    for step in range(4):
        prefix = sentences[:, :PROMPT_LENGTH + 1 + step]
        assert torch.equal(exact.y[:, step], next_token_distribution(prefix))
        # The digit the sentence holds is one the distribution allows.
        assert torch.all(exact.y[:, step].gather(1, sampled.y[:, PROMPT_LENGTH + step, None]) > 0)


def test_the_expected_cross_entropy_is_the_sampled_one_averaged_over_every_allowed_digit():
    torch.manual_seed(0)
    policy = GPT(policy_config())
    data = SupervisedDataset(50, seed=6, targets='exact')
    _, loss = ExpectedCrossEntropy(policy)(data.x, data.y)
    # The same average by brute force: for each position, the sampled loss with each digit 0..10 as
    # the target (GPT's own cross-entropy, the other positions masked), weighted by the digit's
    # exact probability.
    expected = torch.zeros(())
    for step in range(4):
        for token in range(11):
            targets = torch.full(data.x.shape, -1)
            targets[:, PROMPT_LENGTH + step] = token
            logits, _ = policy(data.x)
            per_sentence = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction='none').sum(1)
            expected = expected + (data.y[:, step, token] * per_sentence).mean() / 4
    assert torch.allclose(loss, expected, atol=1e-6)


def test_exact_targets_learn_the_language_in_fewer_sentences_than_sampled_ones():
    # 100 steps of 128 sentences (far fewer than the default schedule's), seed 0 (the same seed gives the
    # same numbers): sampled targets end more than twice as far from the language as exact ones. The
    # bound on exact targets says they learned most of it: a uniform guess over the digits is ~1.1
    # nats per token away.
    schedule = dict(iters=100, batch_size=128, warmup_iters=10, seed=0)
    exact, _ = train_sft(SFTConfig(targets='exact', **schedule), progress=False)
    sampled, _ = train_sft(SFTConfig(targets='sampled', **schedule), progress=False)
    exact_kl, sampled_kl = language_kl(exact, seed=1), language_kl(sampled, seed=1)
    assert exact_kl < 0.15
    assert sampled_kl > 2 * exact_kl
