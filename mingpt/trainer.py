"""A minimal training loop for any model that returns (logits, loss), as in minGPT."""
import time
import warnings
from collections import defaultdict

import torch
from torch.utils.data import DataLoader, RandomSampler

from mingpt.utils import CfgNode


class Trainer:
    """Trains `model` on batches drawn with replacement from `train_dataset` until `max_iters`.

    Callbacks registered for 'on_batch_end' are called as fn(trainer) after every step and can
    read trainer.iter_num, trainer.iter_dt (seconds of the last step) and trainer.loss. With
    max_iters None, training goes on until interrupted: Ctrl-C, or a callback that raises.
    """

    @staticmethod
    def get_default_config():
        C = CfgNode()
        C.device = 'auto'  # 'auto' picks cuda when available, else cpu
        C.num_workers = 4  # DataLoader worker processes
        C.max_iters = None  # None trains until interrupted
        C.batch_size = 64
        C.learning_rate = 3e-4
        C.betas = (0.9, 0.95)
        C.weight_decay = 0.1  # applied to Linear weights only
        C.grad_norm_clip = 1.0
        return C

    def __init__(self, config, model, train_dataset):
        self.config = config
        self.model = model
        self.train_dataset = train_dataset
        self.optimizer = None
        self.callbacks = defaultdict(list)
        if config.device == 'auto':
            self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        else:
            self.device = config.device
        self.model = self.model.to(self.device)
        self.iter_num = 0
        self.iter_time = 0.0
        self.iter_dt = 0.0
        self.loss = None

    def add_callback(self, onevent, callback):
        self.callbacks[onevent].append(callback)

    def set_callback(self, onevent, callback):
        self.callbacks[onevent] = [callback]

    def trigger_callbacks(self, onevent):
        for callback in self.callbacks.get(onevent, []):
            callback(self)

    def run(self):
        config, model = self.config, self.model
        self.optimizer = model.configure_optimizers(config)
        # An effectively endless stream of indices drawn with replacement.
        sampler = RandomSampler(self.train_dataset, replacement=True, num_samples=int(1e10))
        with warnings.catch_warnings():
            # torch warns whenever num_workers exceeds the CPUs, as minGPT's default of 4 does on
            # any small machine. Each worker pauses once it has two batches waiting, so they take
            # the CPUs only for as long as loading needs; num_workers is the user's choice, honoured.
            warnings.filterwarnings('ignore', message='This DataLoader will create', category=UserWarning)
            loader = DataLoader(self.train_dataset, sampler=sampler, batch_size=config.batch_size,
                                num_workers=config.num_workers, pin_memory=self.device == 'cuda')
            batches = iter(loader)
        model.train()
        self.iter_num = 0
        self.iter_time = time.time()
        try:
            while config.max_iters is None or self.iter_num < config.max_iters:
                x, y = next(batches)
                x, y = x.to(self.device), y.to(self.device)
                _, self.loss = model(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                self.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_norm_clip)
                self.optimizer.step()

                self.trigger_callbacks('on_batch_end')
                self.iter_num += 1
                now = time.time()
                self.iter_dt = now - self.iter_time
                self.iter_time = now
        finally:
            # Dropping the last reference to the iterator stops its worker processes now. When
            # training ends by an exception, its traceback keeps this frame alive (a notebook keeps
            # it indefinitely), and the workers with it, unless the name is gone from the frame.
            del batches
