"""Supervised fine-tuning: teach a GPT the digit language by next-token prediction on its sentences."""
from dataclasses import dataclass
from typing import Literal

from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.utils import set_seed
from toy_rlhf.data import SupervisedDataset
from toy_rlhf.flags import BatchSize, Device, NonNegativeFloat, PositiveFloat, PositiveInt, Seed
from toy_rlhf.policy import policy_config
from toy_rlhf.training import check_finite, learning_rate_at, progress_bar, set_learning_rate


MAX_SENTENCES = 2 ** 18  # about 34 MB of training sentences


@dataclass
class SFTConfig:
    iters: PositiveInt = 800  # optimizer steps
    batch_size: BatchSize = 256  # sentences per step
    learning_rate: PositiveFloat = 3e-3  # peak, reached after warm-up, then cosine-decayed to 0
    warmup_iters: PositiveInt = 50  # steps of linear warm-up
    # No decay: the data is unlimited, so there is nothing to regularise, and decay would hold back
    # the large logits that put (almost) no probability on digits the rule forbids.
    weight_decay: NonNegativeFloat = 0.0  # AdamW weight decay of the Linear weights
    model_type: Literal['gpt-nano', 'gpt-micro', 'gpt-mini'] = 'gpt-nano'  # model size (minGPT's presets)
    seed: Seed = 0  # random seed: the same seed gives the same run
    device: Device = 'cpu'  # where it trains; cpu is fastest for a model this small, auto picks cuda if present
    log_every: PositiveInt = 10  # iterations between rows of the loss log


def train_sft(config, progress=True):
    """Train a policy on fresh language sentences with minGPT's Trainer.

    Returns the model (eval mode) and the loss log: a list of {'iter', 'loss', 'lr'}.
    """
    set_seed(config.seed)
    model = GPT(policy_config(config.model_type))
    # As many sentences as training reads (up to a memory cap), so each is seen about once: nothing
    # to memorise but the language itself.
    dataset = SupervisedDataset(min(config.iters * config.batch_size, MAX_SENTENCES), seed=config.seed)

    trainer_config = Trainer.get_default_config()
    trainer_config.merge_from_dict({
        'device': config.device, 'num_workers': 0, 'max_iters': config.iters,
        'batch_size': config.batch_size,
        'learning_rate': learning_rate_at(0, config.iters, config.learning_rate, config.warmup_iters),
        'weight_decay': config.weight_decay,
    })
    trainer = Trainer(trainer_config, model, dataset)
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
