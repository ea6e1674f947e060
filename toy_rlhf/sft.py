"""Supervised fine-tuning: teach a GPT the digit language by next-token prediction on its sentences."""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.utils import set_seed
from toy_rlhf.data import SupervisedDataset
from toy_rlhf.flags import BatchSize, Device, NonNegativeFloat, PositiveFloat, PositiveInt, Seed
from toy_rlhf.language import PROMPT_LENGTH
from toy_rlhf.policy import policy_config
from toy_rlhf.training import check_finite, learning_rate_at, progress_bar, set_learning_rate


MAX_SENTENCES = 2 ** 18  # about 34 MB of training sentences


@dataclass
class SFTConfig:
    iters: PositiveInt = 390  # optimizer steps
    batch_size: BatchSize = 256  # sentences per step
    learning_rate: PositiveFloat = 3e-3  # peak, reached after warm-up, then cosine-decayed to 0
    warmup_iters: PositiveInt = 50  # steps of linear warm-up
    # No decay: the data is unlimited, so there is nothing to regularise, and decay would hold back
    # the large logits that put (almost) no probability on digits the rule forbids.
    weight_decay: NonNegativeFloat = 0.0  # AdamW weight decay of the Linear weights
    # exact: the cross-entropy against the language's exact next-token distribution at each output
    # position (ExpectedCrossEntropy); sampled: against the sentence's own next digit, as minGPT does.
    # Exact is the default because it is more faithful on fewer sentences: 390 steps (99,840
    # sentences) end 0.0012-0.0017 nats from the language on seeds 0-2, where 800 sampled steps
    # (204,800) ended 0.0059-0.0117 and 390 sampled ones 0.013-0.028 (docs/results.md, "SFT on
    # fewer sentences"); a step costs the same either way.
    targets: Literal['exact', 'sampled'] = 'exact'  # what each output position is scored against
    model_type: Literal['gpt-nano', 'gpt-micro', 'gpt-mini'] = 'gpt-nano'  # model size (minGPT's presets)
    seed: Seed = 0  # random seed: the same seed gives the same run
    device: Device = 'cpu'  # where it trains; cpu is fastest for a model this small, auto picks cuda if present
    log_every: PositiveInt = 10  # iterations between rows of the loss log


class ExpectedCrossEntropy(torch.nn.Module):
    """A policy as minGPT's Trainer sees it when SFT learns from exact targets: model(x, targets) ->
    (logits, loss), targets (B, 4, vocab) the language's next-token distributions at the output
    positions (SupervisedDataset with targets 'exact'), loss the mean cross-entropy against them.

    The sampled next digit is one draw from that distribution, so its cross-entropy has the same
    expectation over the digit, the same gradient in expectation and the same minimum (the language
    itself), without the noise of the draw: each sentence then teaches all the digits the rule allows
    at a position, weighted exactly, instead of the one it happens to hold. The prefixes are still
    sampled sentences, so every position is trained on the contexts the language really writes.
    """

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, x, targets):
        logits, _ = self.policy(x)  # (B, 8, vocab)
        outputs = logits[:, PROMPT_LENGTH:]  # (B, 4, vocab): the positions that predict y1..y4
        return logits, F.cross_entropy(outputs.flatten(0, 1), targets.flatten(0, 1))

    def configure_optimizers(self, train_config):
        return self.policy.configure_optimizers(train_config)


def train_sft(config, progress=True):
    """Train a policy on fresh language sentences with minGPT's Trainer.

    Returns the model (eval mode) and the loss log: a list of {'iter', 'loss', 'lr'}. With either
    targets the loss is a cross-entropy whose minimum is the language's entropy (entropy_floor).
    """
    set_seed(config.seed)
    model = GPT(policy_config(config.model_type))
    # As many sentences as training reads (up to a memory cap), so each is seen about once: nothing
    # to memorise but the language itself.
    dataset = SupervisedDataset(min(config.iters * config.batch_size, MAX_SENTENCES), seed=config.seed,
                                targets=config.targets)

    trainer_config = Trainer.get_default_config()
    trainer_config.merge_from_dict({
        'device': config.device, 'num_workers': 0, 'max_iters': config.iters,
        'batch_size': config.batch_size,
        'learning_rate': learning_rate_at(0, config.iters, config.learning_rate, config.warmup_iters),
        'weight_decay': config.weight_decay,
    })
    trainer = Trainer(trainer_config, ExpectedCrossEntropy(model) if config.targets == 'exact' else model, dataset)
    history = []
    bar = progress_bar(config.iters, 'SFT', progress)

    def on_batch_end(trainer):
        step = trainer.iter_num
        check_finite('sft', step, loss=trainer.loss.detach())
        learning_rate = trainer.optimizer.param_groups[0]['lr']
        set_learning_rate(trainer.optimizer, learning_rate_at(
            step + 1, config.iters, config.learning_rate, config.warmup_iters))
        if step % config.log_every == 0 or step == config.iters - 1:
            loss = trainer.loss.item()
            history.append({'iter': step, 'loss': loss, 'lr': learning_rate})
            bar.set_postfix(loss=f'{loss:.4f}')
        bar.update(1)

    trainer.set_callback('on_batch_end', on_batch_end)
    try:
        trainer.run()
    finally:
        bar.close()
    return model.eval(), history
