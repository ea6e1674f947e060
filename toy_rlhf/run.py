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
import hashlib
import pickle
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from toy_rlhf.checkpoint import load_checkpoint, load_model
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.methods import METHODS
from toy_rlhf.metrics import EVALUATION_PROMPTS, evaluate_policy
from toy_rlhf.executors import submit_by_value
from toy_rlhf.files import atomic_write, fingerprint
from toy_rlhf.optimal import ExactTables, exact_tables
from toy_rlhf.pipeline import (check_made_from, current_checkpoint, ensure_stage, provenance, repair_log, reward_stage, run_preference,
                               save_stage, sft_stage, stage_named)
from toy_rlhf.preferences import PreferenceError, resolve_preference
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
                         if name not in ('beta', 'seed') and getattr(defaults, name) != value)
        return cls(method, config.beta, getattr(config, 'seed', 0), settings, label)

    def config(self):
        """The method's config of this variant."""
        config = replace(METHODS[self.method].config(), beta=self.beta, **dict(self.settings))
        return replace(config, seed=self.seed) if hasattr(config, 'seed') else config

    @property
    def name(self):
        return METHODS[self.method].stem(self.config())

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
        self._log_probs = {}  # (variant name, prompts): response log-probs computed where the variant trained

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
        """The run's preference: its reward model's; in a run without one (DPO and IPO need none), the
        one named."""
        if self.reward_path.exists():
            return run_preference(self.folder, self.named_preference)
        if not self.named_preference:
            raise PreferenceError(f'{self.folder} has no reward model to say which preference it is for; name one')
        return resolve_preference(self.named_preference)

    @functools.cached_property
    def gold_margin(self):
        """The labeler's margin of the run's pairs: the gold reward of every gap closed under gold."""
        return self.reward_settings.get('gold_margin', RewardConfig.gold_margin)

    @functools.cached_property
    def sft_policy(self):
        return load_model(self.sft_path, 'policy')

    @functools.cached_property
    def reward_model(self):
        check_made_from(self.reward_path, self.sft_path)
        return load_model(self.reward_path, 'reward')

    def tables(self, prompts, computed=None):
        """The exact tables (toy_rlhf.optimal.ExactTables) of prompts (P, 4): computed once per prompt
        set (here, unless `computed` holds them, made in a worker), and kept on disk (tables_<hash of
        the prompts>.pt) with the fingerprints of the SFT policy and reward model they were computed
        from, so that no later study recomputes them."""
        key = _prompt_key(prompts)
        if key not in self._tables:
            self._tables[key] = stored_tables(self.folder, self.sft_path, self.reward_path, prompts, self.preference,
                                              lambda: computed or exact_tables(self.sft_policy, self.reward_model,
                                                                               prompts, self.preference))
        return self._tables[key]

    def path(self, variant):
        return self.folder / f'{variant.name}.pt'

    def inputs(self, variant):
        """The checkpoints a variant trains from: the SFT policy, and the reward model if it uses one."""
        return (self.sft_path, self.reward_path) if METHODS[variant.method].needs_reward_model else (self.sft_path,)

    def train(self, variants, executor=None, prompts=None, then=None):
        """Train every variant whose method trains, reusing the checkpoints made with the same settings
        from the same inputs (unless the Run is fresh). Each is trained by train_variant, here or, given
        an executor (a concurrent.futures.Executor: toy_rlhf.executors), in its workers with one thread
        each; the inputs travel to the worker by value and the results come back, so a worker needs no
        shared folder, and only this process writes, each checkpoint as soon as its variant is done.
        With prompts (P, 4), a variant trained now also has its log-probs of all 10^4 responses of each
        computed where it trained, for response_log_probs. then(variant), if given, is called as each
        variant is saved or found reused, so that a study can measure it (and let go of its log-probs)
        before the next comes. Returns {variant name: {'seconds', 'reused'}}."""
        timings, futures = self.submit(variants, executor, prompts, then)
        for future in concurrent.futures.as_completed(futures):
            timings[futures[future].name] = self.save(futures[future], future.result())
            if then:
                then(futures[future])
        return timings

    def submit(self, variants, executor=None, prompts=None, then=None):
        """train's first half: the reused checkpoints noted, the others trained and saved here (no
        executor) or submitted to the executor's workers; then(variant) on each saved here or reused.
        Returns (timings so far, {future: variant}): save(variant, future.result()) each future as it
        completes."""
        timings, jobs, reused = {}, {}, []
        for variant in variants:
            if METHODS[variant.method].train is None or variant.name in timings:
                continue
            job = self._job(variant)  # loads (and so checks) its inputs first
            checkpoint = None if self.fresh else self.trained(variant)
            if checkpoint is None:
                jobs[variant] = job
                continue
            print(f'{variant.name}: reusing {self.path(variant)} (made with the same settings)')
            repair_log(self.path(variant).with_suffix('.jsonl'), checkpoint['history'])
            timings[variant.name] = {'seconds': 0.0, 'reused': True}
            reused.append(variant)
        futures = {}
        if executor is None:  # here, one after another
            for variant, job in jobs.items():
                timings[variant.name] = self.save(variant, train_variant(*job, progress=self.progress, prompts=prompts))
                if then:
                    then(variant)
        else:
            futures = {submit_by_value(executor, train_variant, *job, threads=1, prompts=prompts): variant
                       for variant, job in jobs.items()}
        if then:
            for variant in reused:  # once the others are on their way
                then(variant)
        return timings, futures

    def _job(self, variant):
        """train_variant's arguments for a variant: everything it trains from, by value."""
        sft_policy = self.sft_policy
        reward_model = self.reward_model if METHODS[variant.method].needs_reward_model else None
        return variant.method, variant.config(), self.preference.name, sft_policy, reward_model

    def trained(self, variant):
        """The variant's checkpoint if it is in the folder and was made with its settings from this run's
        inputs (by fingerprint), else None."""
        return current_checkpoint(self.path(variant), provenance(variant.config(), self.inputs(variant),
                                                                 self.preference.name))

    def save(self, variant, trained):
        """Write a trained variant's checkpoint (trained: what train_variant returns) and say so in one
        line; keep its response log-probs for response_log_probs. Returns its timing."""
        policy, history, metrics, log_probs = trained
        if log_probs is not None:
            self._log_probs[variant.name, _prompt_key(log_probs[0])] = log_probs[1]
        method = METHODS[variant.method]
        save_stage(self.folder, variant.name, policy, 'policy', variant.config(), metrics, history,
                   self.inputs(variant), method.name, self.preference.name)
        print(f"{method.label} beta={variant.beta:g}: preference {metrics['preference_rate']:.2%}, fidelity "
              f"{metrics['fidelity']:.2%}, gold {metrics['gold_rate']:.2%}, KL to reference "
              f"{metrics['kl_to_reference']:.3f} nats; {metrics['seconds']:.1f} s -> {self.path(variant)}")
        return {'seconds': metrics['seconds'], 'reused': False}

    def policy(self, variant):
        return load_model(self.path(variant), 'policy')

    def response_log_probs(self, variant, prompts):
        """A trained variant's log-probs of all 10^4 responses of each prompt (P, 4): (P, 10^4), those its
        worker computed when it trained on these prompts (handed over once), else from its checkpoint."""
        log_probs = self._log_probs.pop((variant.name, _prompt_key(prompts)), None)
        return all_response_log_probs(self.policy(variant), prompts) if log_probs is None else log_probs

    def checkpoint(self, variant):
        return load_checkpoint(self.path(variant), 'policy')


def _prompt_key(prompts):
    return tuple(map(tuple, prompts.tolist()))


def stored_tables(folder, sft_path, reward_path, prompts, preference, compute):
    """The ExactTables of prompts (P, 4) for the SFT policy and reward model at these paths, read from
    folder/tables_<hash of the prompts>.pt when that file was computed from the same two files (by
    fingerprint), else compute() (-> ExactTables) written there."""
    made_from = {'sft.pt': fingerprint(sft_path), 'reward.pt': fingerprint(reward_path), 'prompts': prompts.tolist()}
    path = Path(folder) / f"tables_{hashlib.sha256(str(made_from['prompts']).encode()).hexdigest()[:12]}.pt"
    try:
        stored = torch.load(path, weights_only=True)  # plain tensors and lists only
        if stored['made_from'] == made_from:
            return ExactTables(prompts, stored['log_ref'], stored['rewards'].double(), preference)
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError):
        pass  # none yet, or not ours as it should be: computed again, and rewritten
    tables = compute()
    # The reward model scores in float32: stored so, its float64 table is the same numbers.
    atomic_write(path, lambda file: torch.save({'made_from': made_from, 'log_ref': tables.log_ref,
                                                 'rewards': tables.rewards.float()}, file))
    return tables


def train_variant(method, config, preference, sft_policy, reward_model=None, progress=False, threads=None,
                  prompts=None):
    """Fine-tune sft_policy with `method` (a registry name) at `config` for `preference` (a name),
    against reward_model if the method uses one, and measure the result exactly against sft_policy.
    A pure function of its arguments: the same ones give the same numbers in any process on the same
    thread count. Returns (policy, history, metrics, log_probs): log_probs (prompts, the policy's
    log-probs of all 10^4 responses of each) where prompts (P, 4) are given, computed here so that the
    worker that trained the policy, not the process that measures it, pays for the pass; else None."""
    if threads:
        torch.set_num_threads(threads)
    preference = resolve_preference(preference)
    models = {'reward_model': reward_model} if METHODS[method].needs_reward_model else {}
    start = time.perf_counter()
    with stage_named(METHODS[method].stem(config)):
        policy, history = METHODS[method].train(sft_policy, config=config, preference=preference, progress=progress,
                                                **models)
        metrics = evaluate_policy(policy, sft_policy, EVALUATION_PROMPTS, getattr(config, 'seed', 0), preference)
    seconds = time.perf_counter() - start
    log_probs = None if prompts is None else (prompts, all_response_log_probs(policy, prompts))
    return policy, history, {**metrics, 'seconds': seconds}, log_probs


def train_measured(method, config, preference, sft_policy, reward_model, measure, progress=True, threads=None):
    """Train `method` (a registry name) at `config` for `preference` (a name) from sft_policy against
    reward_model, measure(rounds, actor) after each round (a study's exact measurement, which draws
    no random numbers and counts its own time in measure.seconds). A pure function of its arguments, so
    that a worker can run it: returns (history, training seconds, the measurement's left out)."""
    if threads:
        torch.set_num_threads(threads)
    started, measured = time.perf_counter(), measure.seconds
    _, history = METHODS[method].train(sft_policy, reward_model=reward_model, config=config,
                                       preference=resolve_preference(preference), progress=progress, measure=measure)
    return history, time.perf_counter() - started - (measure.seconds - measured)
