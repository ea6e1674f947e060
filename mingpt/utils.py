"""Seeding, logging a run's settings, and a small attribute-style config, as in minGPT's utils."""
import ast
import json
import os
import random
import sys

import numpy as np
import torch


def set_seed(seed):
    """Seed python, numpy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def setup_logging(config):
    """Create config.system.work_dir and record the run there: the command line in args.txt and
    every setting in config.json."""
    system = getattr(config, 'system', None)
    if not isinstance(system, CfgNode) or 'work_dir' not in system.__dict__:
        raise ValueError('setup_logging needs the folder to write to in config.system.work_dir')
    os.makedirs(system.work_dir, exist_ok=True)
    with open(os.path.join(system.work_dir, 'args.txt'), 'w') as file:
        file.write(' '.join(sys.argv))
    with open(os.path.join(system.work_dir, 'config.json'), 'w') as file:
        # default=str: a setting JSON has no type for (a Path, say) is recorded as text instead of
        # stopping the run.
        json.dump(config.to_dict(), file, indent=4, default=str)


class CfgNode:
    """A namespace of settings: `cfg.lr = 3e-4`, `cfg.model.n_layer`, nested nodes allowed."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __str__(self):
        return '\n'.join(self._lines(indent=0))

    def __repr__(self):
        return f'CfgNode({self.to_dict()!r})'

    def _lines(self, indent):
        lines = []
        for key, value in self.__dict__.items():
            if isinstance(value, CfgNode):
                lines.append(' ' * indent + f'{key}:')
                lines.extend(value._lines(indent + 4))
            else:
                lines.append(' ' * indent + f'{key}: {value!r}')
        return lines

    def to_dict(self):
        """A plain (nested) dict of the settings."""
        return {key: value.to_dict() if isinstance(value, CfgNode) else value
                for key, value in self.__dict__.items()}

    def merge_from_dict(self, settings):
        """Overwrite settings from a dict; nested dicts update nested nodes."""
        for key, value in settings.items():
            current = self.__dict__.get(key)
            if isinstance(current, CfgNode) and isinstance(value, dict):
                current.merge_from_dict(value)
            else:
                self.__dict__[key] = value

    def merge_from_args(self, args):
        """Overwrite settings from command-line arguments such as `--model.n_layer=4`.

        A value that is a Python literal (a number, tuple, True, None, a quoted string) is parsed as
        one; any other value is kept as text, so `--system.work_dir=./out` needs no quotes. Only
        existing settings can be set: a misspelt name would otherwise add a setting that nothing reads.
        """
        for arg in args:
            name, equals, text = arg.partition('=')
            if not name.startswith('--') or not equals:
                raise ValueError(f'argument {arg!r} is not of the form --name=value')
            *groups, leaf = name[2:].split('.')
            node = self
            for depth, key in enumerate(groups):
                node = node.__dict__.get(key)
                if not isinstance(node, CfgNode):
                    group = '.'.join(groups[:depth + 1])
                    raise ValueError(f'argument {arg!r}: there is no group of settings {group!r}')
            # __dict__ rather than hasattr, which would also accept method names such as to_dict.
            if leaf not in node.__dict__:
                raise ValueError(f'argument {arg!r}: there is no setting {name[2:]!r}')
            if isinstance(node.__dict__[leaf], CfgNode):
                raise ValueError(f'argument {arg!r}: {name[2:]!r} is a group of settings; set one '
                                 f'of them (--{name[2:]}.NAME=value)')
            node.__dict__[leaf] = _parsed(text)


def _parsed(text):
    """The Python literal that text spells, or text itself if it spells none."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):  # SyntaxError: text such as ./out or two words
        return text
