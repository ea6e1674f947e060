"""What every training stage shares: the learning-rate schedule, progress bars, finite checks."""
import math

import torch
from tqdm.auto import tqdm



class TrainingError(Exception):
    """A stage that cannot go on (a NaN or inf, or settings it cannot train with); the message is one
    line naming what stopped it."""


def learning_rate_at(step, total_steps, peak, warmup_steps):
    """Linear warm-up to `peak` over warmup_steps, then a cosine decay to 0 at total_steps.

    Ending at 0 lets the last steps average out gradient noise, which is what brings the SFT model's
    KL to the true language down to the 0.01 nats range in a few hundred steps.
    """
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    progress = min(1.0, step / max(1, total_steps))
    return peak * warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, learning_rate):
    for group in optimizer.param_groups:
        group['lr'] = learning_rate


def gradient_step(optimizer, loss, model, max_grad_norm):
    """One optimizer step on loss, with the gradient norm of model's parameters clipped to
    max_grad_norm: a rare outsized gradient (a near-zero probability, an extreme advantage) then
    cannot throw the model far in one step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


def check_finite(stage, iteration, **quantities):
    """Raise TrainingError naming the first quantity (tensor or number) that holds a NaN or inf."""
    for name, value in quantities.items():
        value = torch.as_tensor(value)
        if not torch.isfinite(value).all():
            bad = value[~torch.isfinite(value)].flatten()[0].item()
            raise TrainingError(f'{stage}: iteration {iteration}: {name} is {bad}; stopped, nothing saved')


def progress_bar(total, description, enabled=True):
    """A tqdm bar for a stage; silent in tests, with --quiet, and when stderr is not a terminal
    (a log file gets the one-line stage summaries, not hundreds of bar redraws)."""
    return tqdm(total=total, desc=description, disable=None if enabled else True, leave=False,
                dynamic_ncols=True)
