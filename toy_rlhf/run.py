"""A run, read once, and the Variant, the unit of work of every study.

    run = Run('runs/default')            # its SFT policy, reward model, preference and gold margin
    variant = Variant('ppo', beta=0.0)   # a method, its beta and seed, the settings that differ
    run.train([variant])                 # trained, or reused, into runs/default/ppo_beta0.pt
    run.tables(prompts)                  # log pi_ref and the reward of all 10^4 responses, once

The studies that train from a run's reward model (main, methods and its sweep, credit) get the run's
facts from a Run, so they are read one way: the preference and the gold margin are the reward
model's (stored in reward.pt), and a user-defined preference is imported only when the user named it
(toy_rlhf.pipeline.checkpoint_preference). The over-optimisation study trains proxies of its own.
"""
import concurrent.futures
import functools
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from toy_rlhf.checkpoint import load_checkpoint, load_model
from toy_rlhf.methods import METHODS
from toy_rlhf.optimal import exact_tables
from toy_rlhf.pipeline import ensure_method, ensure_stage, reward_stage, run_preference, sft_stage
from toy_rlhf.reward import RewardConfig
from toy_rlhf.sft import SFTConfig


@dataclass(frozen=True)
class Variant:
    """A method (registry name) at a beta and seed, with the settings of its config that differ from
    the defaults as (field, value) pairs. Its name is its checkpoint's stem (Method.stem)."""
    method: str
    beta: float = 1.0
    seed: int = 0
    settings: tuple = ()
    label: str = ''  # in tables and legends; '' for "METHOD beta=B"

    @classmethod
    def of(cls, config, method, label=''):
        """The variant that trains `method` (a registry name) with `config`, one of its configs."""
        defaults = METHODS[method].config()
        settings = tuple((name, value) for name, value in asdict(config).items()
                         if name not in ('beta', 'seed', 'preference') and getattr(defaults, name) != value)
        return cls(method, config.beta, getattr(config, 'seed', 0), settings, label)

    def config(self, preference):
        """The method's config of this variant, for `preference` (a name) where the method has one."""
        config = replace(METHODS[self.method].config(), beta=self.beta, **dict(self.settings))
        given = {'seed': self.seed, 'preference': preference}
        return replace(config, **{field.name: given[field.name] for field in fields(config) if field.name in given})

    @property
    def name(self):
        return METHODS[self.method].stem(self.config(preference=None))

    def describe(self):
        return self.label or f'{METHODS[self.method].label} beta={self.beta:g}'


class Run:
    """A run folder and the facts read from it, each read once: its SFT policy and reward model, the
    preference and gold margin the reward model was trained with, the exact tables of a set of
    prompts, and where each variant's checkpoint is."""

    def __init__(self, folder, preference=None, fresh=False, progress=True):
        self.folder = Path(folder)
        self.named_preference = preference or None  # --preference, for a user-defined one
        self.fresh, self.progress = fresh, progress
        self._tables = {}

    @property
    def sft_path(self):
        return self.folder / 'sft.pt'

    @property
    def reward_path(self):
        return self.folder / 'reward.pt'

    def build(self, seed=0):
        """Train the SFT policy and reward model (default settings, at `seed`) where the run has none, so
        that a study can start from an empty folder; say so in one line each."""
        if not self.sft_path.exists():
            print(f'{self.sft_path}: none yet; training the SFT policy first')
            ensure_stage(self.folder, 'sft', SFTConfig(seed=seed), (), sft_stage, progress=self.progress)
        if not self.reward_path.exists():
            print(f'{self.reward_path}: none yet; training the reward model first')
            config = RewardConfig(seed=seed, **({'preference': self.named_preference} if self.named_preference else {}))
            ensure_stage(self.folder, 'reward', config, (self.sft_path,), reward_stage, progress=self.progress)
        return self

    @functools.cached_property
    def reward_settings(self):
        return load_checkpoint(self.reward_path, 'reward')['train_config']

    @functools.cached_property
    def preference(self):
        return run_preference(self.folder, self.named_preference)

    @functools.cached_property
    def gold_margin(self):
        """The labeler's margin of the run's pairs: the gold reward of every gap closed under gold."""
        return self.reward_settings.get('gold_margin', RewardConfig.gold_margin)

    @functools.cached_property
    def sft_policy(self):
        return load_model(self.sft_path, 'policy')

    @functools.cached_property
    def reward_model(self):
        return load_model(self.reward_path, 'reward')

    def tables(self, prompts):
        """The exact tables (toy_rlhf.optimal.ExactTables) of prompts (P, 4), computed once per prompt set."""
        key = tuple(map(tuple, prompts.tolist()))
        if key not in self._tables:
            self._tables[key] = exact_tables(self.sft_policy, self.reward_model, prompts, self.preference)
        return self._tables[key]

    def config(self, variant):
        return variant.config(self.preference.name)

    def path(self, variant):
        return self.folder / f'{variant.name}.pt'

    def train(self, variants, workers=1):
        """Train every variant whose method trains, reusing current checkpoints; with workers > 1, in
        that many processes of one thread each (the same numbers as --threads 1 serially). Returns
        {variant name: {'seconds', 'reused'}}."""
        trained = [variant for variant in variants if METHODS[variant.method].train is not None]
        if workers > 1:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                timings = list(pool.map(_train_in_a_worker, [self] * len(trained), trained))
        else:
            timings = [self._ensure(variant, self.progress) for variant in trained]
        return {variant.name: timing for variant, timing in zip(trained, timings)}

    def _ensure(self, variant, progress):
        return ensure_method(self.folder, METHODS[variant.method], self.config(variant), self.fresh, progress)

    def policy(self, variant):
        return load_model(self.path(variant), 'policy')

    def checkpoint(self, variant):
        return load_checkpoint(self.path(variant), 'policy')

    def __getstate__(self):
        """What a worker process needs: the folder and settings, none of the loaded models."""
        return {'folder': self.folder, 'named_preference': self.named_preference, 'fresh': self.fresh,
                'progress': False, '_tables': {}}


def _train_in_a_worker(run, variant):
    """One variant in a worker process: one thread, so that runs at once do not fight over cores."""
    torch.set_num_threads(1)
    return run._ensure(variant, progress=False)
