"""Seeding and a small attribute-style config, as in minGPT's utils."""
import random

import numpy as np
import torch


def set_seed(seed):
    """Seed python, numpy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


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
