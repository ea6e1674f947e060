"""Checkpoints: plain dicts of tensors and settings, written atomically, read without unpickling code.

    {format_version, kind ('policy' | 'reward'), model_config, train_config, metrics, history, state_dict}

The training history (the rows of the stage's .jsonl log) travels inside the checkpoint, so a log and
its checkpoint can never disagree: the .jsonl beside it is a readable copy, rewritten from the
checkpoint when missing or different. Parameters carry minGPT's names (transformer.h.0.attn.c_attn.weight,
lm_head.weight, ...). Only the current format is read; an older one is answered with the command
that makes it again.

Writing goes to a temporary file in the same folder that is then renamed over the final name, so an
interrupted write never leaves a half-written checkpoint under the final name. Reading uses
torch.load(weights_only=True), which refuses any pickle that would run code, then checks the type of
every field and that every weight is finite.
"""
import dataclasses
import warnings
from pathlib import Path

import torch

from mingpt.model import GPT
from toy_rlhf.files import atomic_write
from toy_rlhf.flags import value_fits
from toy_rlhf.language import SEQUENCE_LENGTH, VOCAB_SIZE
from toy_rlhf.methods import METHODS, method_of_stem
from toy_rlhf.reward import RewardConfig
from toy_rlhf.sft import SFTConfig

FORMAT_VERSION = 3
KINDS = ('policy', 'reward')
# What each kind of model must be able to read: (vocab_size, smallest block_size, output_size).
EXPECTED_SHAPE = {'policy': (VOCAB_SIZE, SEQUENCE_LENGTH - 1, VOCAB_SIZE),
                  'reward': (VOCAB_SIZE + 1, SEQUENCE_LENGTH + 1, 1)}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file and what to run."""


def save_checkpoint(path, model, kind, train_config, metrics, history=()):
    """Write `model` and its provenance to `path` atomically. train_config and metrics: plain dicts;
    history: the training log, a list of plain dicts."""
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    payload = {
        'format_version': FORMAT_VERSION,
        'kind': kind,
        'model_config': model.config.to_dict(),
        'train_config': dict(train_config),
        'metrics': dict(metrics),
        'history': [dict(row) for row in history],
        'state_dict': {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path, kind=None):
    """The checkpoint dict at `path`, checked to be complete and (if given) of `kind`."""
    path = Path(path)
    run = how_to_make(path, kind)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint; run `{run}` first')
    try:
        # torch warns about what it is unpickling (a pickle protocol it did not write, ...) before it
        # refuses it; the user gets our one line, not torch's paragraph.
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:
        raise CheckpointError(f'{path}: not a readable checkpoint (truncated, corrupt or not made '
                              f'by toy-rlhf); run `{run}` to make it again') from None
    problem = _malformed(checkpoint)
    if problem:
        raise CheckpointError(f'{path}: not a toy-rlhf checkpoint ({problem}); run `{run}` to make one')
    if checkpoint['format_version'] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {checkpoint['format_version']}, this "
                              f'version reads {FORMAT_VERSION}; run `{run}` to make it again')
    if kind is not None and checkpoint['kind'] != kind:
        raise CheckpointError(f"{path}: a {checkpoint['kind']} checkpoint where a {kind} "
                              f'checkpoint is needed; run `{run}` to make one')
    broken = [name for name, tensor in checkpoint['state_dict'].items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise CheckpointError(f'{path}: weights that are NaN or infinite ({broken[0]}); '
                              f'run `{run}` to make it again')
    return checkpoint


def load_model(path, kind=None, device='cpu'):
    """The GPT stored at `path` (in eval mode, on `device`), checked to be of `kind` if given and to
    fit the language (vocabulary and context length of its kind)."""
    checkpoint = load_checkpoint(path, kind)
    config = GPT.get_default_config()
    config.merge_from_dict(checkpoint['model_config'])
    config.model_type = None  # the sizes are stored explicitly
    run = how_to_make(path, checkpoint['kind'])
    vocab_size, min_block_size, output_size = EXPECTED_SHAPE[checkpoint['kind']]
    if (config.vocab_size, config.output_size or config.vocab_size) != (vocab_size, output_size) \
            or not isinstance(config.block_size, int) or config.block_size < min_block_size:
        raise CheckpointError(f"{path}: a {checkpoint['kind']} model with vocabulary "
                              f'{config.vocab_size} and block size {config.block_size} does not fit '
                              f'this language (needs {vocab_size} and >= {min_block_size}); run `{run}`')
    try:
        model = GPT(config)
        model.load_state_dict(checkpoint['state_dict'])
    except (ValueError, RuntimeError, TypeError, KeyError, AttributeError):
        raise CheckpointError(f'{path}: the weights do not match the stored model settings; '
                              f'run `{run}` to make it again') from None
    return model.to(device).eval()


def _malformed(checkpoint):
    """What is wrong with the fields of a loaded checkpoint, in a few words; '' if nothing."""
    fields = {'format_version': int, 'kind': str, 'model_config': dict, 'train_config': dict,
              'metrics': dict, 'state_dict': dict}
    if not isinstance(checkpoint, dict):
        return f'a {type(checkpoint).__name__}, not a dict'
    for name, kind in fields.items():
        if name not in checkpoint:
            return f'no {name}'
        if not isinstance(checkpoint[name], kind) or isinstance(checkpoint[name], bool):
            return f'{name} is a {type(checkpoint[name]).__name__}, not a {kind.__name__}'
    if checkpoint['kind'] not in KINDS:
        return f"kind {checkpoint['kind']!r}"
    if not all(isinstance(name, str) and isinstance(tensor, torch.Tensor)
               for name, tensor in checkpoint['state_dict'].items()):
        return 'state_dict is not a dict of named tensors'
    if checkpoint['format_version'] == FORMAT_VERSION and not (isinstance(checkpoint.get('history'), list) and all(
            isinstance(row, dict) for row in checkpoint['history'])):
        return 'history is not a list of dicts'
    return _settings_problem(checkpoint['train_config']) or _metrics_problem(checkpoint['metrics'])


def _settings_problem(settings):
    """What is wrong with a checkpoint's stored settings ('' if nothing). A setting that a config of
    the project has (beta, seed, preference, ...) must be a value its flag would accept; the
    provenance entries must be what save_stage writes; anything else, plain data."""
    types = setting_types()
    for name, value in settings.items():
        if not isinstance(name, str):
            return f'a setting named {name!r}'
        if name in ('inputs', 'versions'):
            fits = isinstance(value, dict) and all(isinstance(item, str) for pair in value.items() for item in pair)
        elif name == 'preference_fingerprint':
            fits = value is None or isinstance(value, str)
        elif name in types:
            fits = any(value_fits(hint, value) for hint in types[name])
        else:
            fits = _plain(value)
        if not fits:
            return f'its setting {name} is {value!r}'
    return ''


def _metrics_problem(metrics):
    """What is wrong with a checkpoint's stored metrics ('' if nothing): each a number or a list of them."""
    for name, value in metrics.items():
        numbers = value if isinstance(value, list) else [value]
        if not isinstance(name, str) or not all(value_fits(float, number) for number in numbers):
            return f'its metric {name} is {value!r}'
    return ''


def _plain(value):
    """Whether value is plain data: None, a bool, number or string, or a list, tuple or dict of them."""
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def setting_types():
    """{setting name: the annotations it has in the configs of SFT, the reward model and every
    registered method (read when asked: a method registered later counts)}: what a stored setting of
    that name may hold."""
    types = {}
    for config in (SFTConfig, RewardConfig, *(method.config for method in METHODS.values())):
        for field in dataclasses.fields(config()):
            types.setdefault(field.name, []).append(field.type)
    return types


def how_to_make(path, kind=None):
    """The command that makes a checkpoint of `kind` at `path`, guessed from the file name where
    the name fits the kind (for error messages). The installed command, `toy-rlhf`, which every
    install has (an installed package has no scripts/ folder)."""
    name = Path(path).name
    run_dir = Path(path).parent
    run = f' --run {run_dir.name}' if run_dir.parent.name == 'runs' and run_dir.name != 'default' else ''
    if kind == 'reward' or (kind is None and name == 'reward.pt'):
        return f'toy-rlhf reward{run}'
    if name == 'sft.pt':
        return f'toy-rlhf sft{run}'
    method = method_of_stem(Path(name).stem) if name.endswith('.pt') else None
    if method is not None:  # a stem like ppo_beta1, ppo_beta0.1_seed2 or ppo_beta1_3f2a9c1d
        beta, *rest = Path(name).stem.rpartition('_beta')[2].split('_')
        seed = ''.join(f' --{part[:4]} {part[4:]}' for part in rest if part.startswith('seed'))
        return f'toy-rlhf {method.name} --beta {beta}{seed}{run}'
    return f'toy-rlhf all{run}'
