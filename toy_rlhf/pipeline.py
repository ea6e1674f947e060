"""The stages as the command line runs them: train, measure, save, summarise in one line.

Each stage writes its checkpoint (atomically) only after training finished and its numbers were
checked to be finite, so an interrupted or broken stage leaves every earlier checkpoint as it was.
The training history travels inside the checkpoint; the .jsonl log beside it is a readable copy,
written after the checkpoint and rewritten from it whenever the stage is reused, so the log of a
checkpoint is always that checkpoint's own.
"""
import contextlib
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy
import torch

from toy_rlhf.checkpoint import CheckpointError, how_to_make, load_checkpoint, load_model, save_checkpoint
from toy_rlhf.files import fingerprint, jsonl_text, write_text
from toy_rlhf.language import entropy_floor
from toy_rlhf.metrics import EVALUATION_PROMPTS, evaluate_policy, language_kl
from toy_rlhf.preferences import PREFERENCES, PreferenceError, resolve_preference
from toy_rlhf.reward import pairwise_accuracy, preference_pairs, rank_rate, train_reward
from toy_rlhf.sft import train_sft
from toy_rlhf.training import TrainingError


def versions():
    """The library versions a result was made with, stored beside it."""
    return {'python': platform.python_version(), 'torch': str(torch.__version__),
            'numpy': numpy.__version__}


def machine():
    """What a run's numbers depend on besides its settings: torch's thread count (the order of
    floating-point sums) and the processor."""
    model = next((line.split(':', 1)[1].strip() for line in _cpuinfo().splitlines()
                  if line.startswith('model name')), None)
    return {'threads': torch.get_num_threads(), 'processor': model or platform.processor() or platform.machine()}


def _cpuinfo():
    try:
        return Path('/proc/cpuinfo').read_text()
    except OSError:  # not Linux
        return ''


def provenance(config, inputs=(), preference=None):
    """What a stage's result was made from: its settings, the preference it was trained for (a name:
    the config's own, or `preference`, the run's, for a method), the fingerprints of its input
    checkpoints and, for a user-defined preference, of the file that defines it."""
    settings = {**asdict(config), **({'preference': preference} if preference else {})}
    origin = {'inputs': {Path(path).name: fingerprint(path) for path in inputs}}
    name = settings.get('preference')
    if name and name not in PREFERENCES:
        origin['preference_fingerprint'] = resolve_preference(name).source_fingerprint
    return {**settings, **origin}


def save_stage(run_dir, name, model, kind, config, metrics, history, inputs=(), method=None, preference=None):
    """Write a stage's checkpoint (with its provenance, the training method's registry name if it is
    a method's, and its history), then its .jsonl log. Refuses (TrainingError) metrics that are NaN or
    infinite: nothing is saved."""
    run_dir = Path(run_dir)
    broken = [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    if broken:
        raise TrainingError(f'{name}: its {broken[0]} is {metrics[broken[0]]}; stopped, nothing saved')
    made_by = {'method': method} if method else {}
    save_checkpoint(run_dir / f'{name}.pt', model, kind, {**provenance(config, inputs, preference), **made_by,
                                                          'versions': versions()}, metrics, history)
    write_text(run_dir / f'{name}.jsonl', jsonl_text(history))


def current_checkpoint(path, made_from):
    """The checkpoint at path if it was made as `made_from` says (a provenance); otherwise None."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        return None
    stored = checkpoint['train_config']
    same = all(stored.get(key) == value for key, value in made_from.items())
    return checkpoint if same else None


def repair_log(path, history):
    """Rewrite the .jsonl log at path from the history in its checkpoint if it is missing or differs
    (a run killed between writing the checkpoint and its log, or a log edited by hand)."""
    text = jsonl_text(history)
    try:
        intact = Path(path).read_text() == text
    except (OSError, UnicodeDecodeError):
        intact = False
    if not intact:
        write_text(path, text)
        print(f'{path}: rewritten from the history in its checkpoint')


def ensure_stage(run_dir, name, config, inputs, make, fresh=False, progress=True):
    """Make run_dir/name.pt with make(run_dir, config, progress) unless one made with the same
    settings from the same input checkpoints exists (or `fresh`); returns {'seconds', 'reused'}."""
    start = time.perf_counter()
    reused = reused_stage(run_dir, name, config, inputs, fresh)
    if not reused:
        make(run_dir, config, progress)
    return {'seconds': time.perf_counter() - start, 'reused': reused}


def reused_stage(run_dir, name, config, inputs, fresh=False):
    """Whether run_dir/name.pt was made with the same settings from the same input checkpoints (never
    if `fresh`); if so, say so in one line and rewrite its log from it."""
    path = Path(run_dir) / f'{name}.pt'
    checkpoint = None if fresh else current_checkpoint(path, provenance(config, inputs))
    if checkpoint is not None:
        print(f'{name}: reusing {path} (made with the same settings)')
        repair_log(path.with_suffix('.jsonl'), checkpoint['history'])
    return checkpoint is not None


@contextlib.contextmanager
def stage_named(name):
    """A user-defined preference that fails inside a stage is reported with the stage's name."""
    try:
        yield
    except PreferenceError as error:
        raise PreferenceError(f'{name}: {error}') from None


def sft_stage(run_dir, config, progress=True):
    """Train the SFT policy, measure it, write sft.pt and sft.jsonl; returns its metrics."""
    start = time.perf_counter()
    model, history = train_sft(config, progress)
    metrics = {'language_kl': language_kl(model, seed=config.seed), 'final_loss': history[-1]['loss'],
               'entropy_floor': entropy_floor(), 'seconds': time.perf_counter() - start}
    save_stage(run_dir, 'sft', model, 'policy', config, metrics, history)
    print(f"SFT: KL(true || model) {metrics['language_kl']:.4f} nats per token; loss "
          f"{metrics['final_loss']:.4f} (floor {metrics['entropy_floor']:.4f}); "
          f"{metrics['seconds']:.1f} s -> {Path(run_dir) / 'sft.pt'}")
    return metrics


def reward_stage(run_dir, config, progress=True, name='reward'):
    """Train the reward model from the run's SFT policy, measure it on fresh pairs and prompts, write
    <name>.pt and <name>.jsonl (reward.pt unless a study trains several); returns its metrics."""
    sft_policy = load_model(Path(run_dir) / 'sft.pt', 'policy')
    return save_reward_stage(run_dir, config, name, train_reward_stage(sft_policy, config, name, progress))


def train_reward_stage(sft_policy, config, name='reward', progress=True):
    """reward_stage's training and measuring, without the files: (model, metrics, history). A pure
    function of its arguments, so that a worker process can run it."""
    start = time.perf_counter()
    with stage_named(name):
        held_out = preference_pairs(config, config.held_out_pairs, config.seed + 1, sft_policy)
        if not held_out.decisive.any():
            raise PreferenceError(f'--preference {config.preference}: every held-out pair is a tie (it rewards '
                                  'every response alike), so there is no preference to learn')
        model, history = train_reward(sft_policy, config, progress)
        metrics = {'pairwise_accuracy': pairwise_accuracy(model, held_out),
                   'rank_rate': rank_rate(model, seed=config.seed + 2, preference=resolve_preference(config.preference)),
                   'seconds': time.perf_counter() - start}
    return model, metrics, history


def save_reward_stage(run_dir, config, name, trained):
    """Write what train_reward_stage returned as run_dir/<name>.pt and .jsonl; say so in one line.
    Returns its metrics."""
    model, metrics, history = trained
    save_stage(run_dir, name, model, 'reward', config, metrics, history, inputs=(Path(run_dir) / 'sft.pt',))
    print(f"Reward model: held-out pairwise accuracy {metrics['pairwise_accuracy']:.2%}, rank rate "
          f"{metrics['rank_rate']:.2%}; {metrics['seconds']:.1f} s -> {Path(run_dir) / name}.pt")
    return metrics


def checkpoint_preference(path, settings, named=None, changed_file_ok=False):
    """The preference the checkpoint at `path` (its stored settings) was trained for.

    A file never makes us import code: a user-defined preference (module:function) stored in a
    checkpoint is imported only when the user named the same one (`named`, from --preference), and
    refused if its file changed since (unless changed_file_ok). A `named` preference other than the
    stored one is refused: a policy and its reward model, or a measurement, for two preferences
    would mix two truths without a word.
    """
    # Checkpoints made before preferences existed were all trained for the first digit.
    stored = settings.get('preference', 'first-digit')
    if named and named != stored:
        raise PreferenceError(f'{path} was trained for the preference {stored}, not {named}: leave out '
                              f'--preference, or train for {named} in another run (--run NAME --preference {named})')
    if stored in PREFERENCES:
        return PREFERENCES[stored]
    if named != stored:
        raise PreferenceError(f'{path} was trained for the user-defined preference {stored}; give --preference '
                              f'{stored} to use it (a module named in a file is imported only when you name it)')
    preference = resolve_preference(stored)
    recorded = settings.get('preference_fingerprint')
    if recorded not in (None, preference.source_fingerprint) and not changed_file_ok:
        raise PreferenceError(f'--preference {stored}: its file changed since {path} was trained; train again '
                              'with it as it is now (evaluate: or add --other-inputs to measure anyway)')
    return preference


def run_preference(run_dir, named=None, changed_file_ok=False):
    """The preference a run's reward model was trained for (stored in reward.pt); see checkpoint_preference."""
    path = Path(run_dir) / 'reward.pt'
    return checkpoint_preference(path, load_checkpoint(path, 'reward')['train_config'], named, changed_file_ok)


def check_made_from(path, input_path):
    """Refuse a checkpoint (its path) made from another version of input_path (a stage retrained since,
    say sft.pt under reward.pt), by the fingerprint stored in its provenance."""
    stored = load_checkpoint(path)['train_config'].get('inputs', {})
    if input_path.name in stored and stored[input_path.name] != fingerprint(input_path):
        raise CheckpointError(f'{path}: made from another {input_path.name} than {input_path} (retrained since); '
                              f'make it again from this one: `{how_to_make(path)}`')


def check_trained_from(policy_path, inputs):
    """Refuse an input checkpoint (sft.pt or reward.pt: its path) other than the one the policy at
    policy_path was trained from, by the fingerprints stored in the policy's provenance."""
    stored = load_checkpoint(policy_path, 'policy')['train_config'].get('inputs', {})
    for name, path in inputs.items():
        if isinstance(stored, dict) and name in stored and stored[name] != fingerprint(path):
            raise CheckpointError(f'{path}: not the {name} that {policy_path} was trained from (its '
                                  f'fingerprint differs); give the one it was, or add --other-inputs '
                                  'to measure against this one anyway')


def evaluate_checkpoint(policy_path, reference_path, n_prompts=EVALUATION_PROMPTS, seed=0, check_inputs=True,
                        named=None):
    """The exact gold metrics of the policy at policy_path against the reference at reference_path
    (refused if the policy was trained from another reference, unless check_inputs is False), for the
    preference it was trained for (`named`: the one the user gave, see checkpoint_preference)."""
    policy = load_model(policy_path, 'policy')
    reference = load_model(reference_path, 'policy')
    if check_inputs:
        check_trained_from(policy_path, {'sft.pt': reference_path})
    settings = load_checkpoint(policy_path, 'policy')['train_config']
    return evaluate_policy(policy, reference, n_prompts, seed,
                           checkpoint_preference(policy_path, settings, named, not check_inputs))
