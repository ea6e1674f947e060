"""What a command checks in its flags beyond what argparse can, and the preference it works with.

Below the command table (toy_rlhf.commands) so that a study's own entry point (scripts/run_all.py
calls toy_rlhf.studies.main directly) checks its flags the same way `toy-rlhf` does. A check fails
with UsageError, which the command line turns into one line and exit status 2.
"""
from pathlib import Path

from toy_rlhf import pipeline
from toy_rlhf.flags import Bounds, ExactPrompts, SampledPrompts, Threads
from toy_rlhf.methods import METHODS
from toy_rlhf.preferences import PreferenceError, resolve_preference


class UsageError(Exception):
    """A bad setting that argparse cannot see (an unavailable device, an unwritable folder)."""


positive_int = Bounds(low=1, description='a positive integer').parse(int)
non_negative_int = Bounds(low=0, description='an integer >= 0').parse(int)
threads, sampled_prompts, exact_prompts = (hint.__metadata__[0].parse(int)  # their Bounds
                                           for hint in (Threads, SampledPrompts, ExactPrompts))
seed = Bounds(low=0, high=2 ** 32 - 1, description='an integer from 0 to 2^32 - 1').parse(int)


def check_betas(flag, betas):
    """Each value once: two betas (or pair counts, margins) that print alike (0.1 and 0.1000001) would
    share one checkpoint name."""
    names = [f'{beta:g}' for beta in betas]
    if len(set(names)) != len(names):
        raise UsageError(f'{flag}: each value once (values that print alike share a checkpoint), got {" ".join(names)}')


def check_methods(names, usable=lambda method: True, flag='--methods'):
    """Refuse a name that is not registered, or names a method `usable(method)` says this command
    cannot use."""
    unknown = [name for name in names if name not in METHODS or not usable(METHODS[name])]
    if unknown:
        choices = ', '.join(name for name, method in METHODS.items() if usable(method))
        raise UsageError(f'{flag}: unknown method {unknown[0]!r}; registered: {choices}')


def check_preference(name):
    """Refuse a --preference that is neither a built-in nor a working module:function, before training."""
    try:
        resolve_preference(name)
    except PreferenceError as error:
        raise UsageError(str(error)) from None


def working_preference(args, flag, default):
    """The name of the preference a command works with: the run's, its reward model's (a different
    one given with `flag` is refused); in a run without a reward model, the one given, or `default`
    (the command's own, passed in: nothing here assumes one)."""
    named = getattr(args, flag, None)
    if Path(args.run_dir, 'reward.pt').exists():
        return pipeline.run_preference(args.run_dir, named).name
    return named or default
