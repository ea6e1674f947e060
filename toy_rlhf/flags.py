"""Command-line flags made from config dataclasses: each field is a flag of the same name, its
comment in the source is the flag's help, and its annotation says what values it takes.

    @dataclass
    class PPOConfig:
        iters: PositiveInt = 50  # rollout-and-update rounds     ->  --iters ITERS  rollout-and-update rounds (default: 50)

Written here rather than taken from a library (tyro does the same and more) because this is all the
project needs: about a hundred lines, no dependency, and the comments stay where a reader of the
config looks for them.
"""
import argparse
import inspect
import io
import math
import os
import re
import tokenize
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from typing import Annotated, Literal


@dataclass(frozen=True)
class Bounds:
    """The values a number may take: low <= value (or <, if low_open) and value <= high."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    description: str = 'a number'

    def parse(self, kind):
        """An argparse type: text -> a finite value of `kind` within the bounds."""
        def parse(text):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f'must be {self.description}, got {text!r}') from None
            if not self.contains(value):
                raise argparse.ArgumentTypeError(f'must be {self.description}, got {text}')
            return value + 0  # -0.0 is 0.0: one value, one checkpoint name
        return parse

    def contains(self, value):
        too_low = value <= self.low if self.low_open else value < self.low
        return math.isfinite(value) and not too_low and value <= self.high


PositiveInt = Annotated[int, Bounds(low=1, description='a positive integer')]
NonNegativeInt = Annotated[int, Bounds(low=0, description='an integer >= 0')]
GroupSize = Annotated[int, Bounds(low=2, description='an integer >= 2')]
PositiveFloat = Annotated[float, Bounds(low=0, low_open=True, description='a positive number')]
NonNegativeFloat = Annotated[float, Bounds(low=0, description='a number >= 0')]
Probability = Annotated[float, Bounds(low=0, high=1, description='a number between 0 and 1')]
Seed = Annotated[int, Bounds(low=0, high=2 ** 32 - 1, description='an integer from 0 to 2^32 - 1')]
Digit = Annotated[int, Bounds(low=0, high=9, description='a digit 0-9')]
Device = Literal['auto', 'cpu', 'cuda']
Threads = Annotated[int, Bounds(low=1, high=os.cpu_count() or 1,
                                description=f'an integer from 1 to {os.cpu_count() or 1} (the cores here)')]

# Sizes within half this machine's memory. Peak memory per item, measured (prompts on the costliest
# built-in preference, distinct): about 55 kB per prompt to sample and measure responses, about 3 MB
# per prompt to enumerate all 10^4 responses exactly, about 115 kB per sentence of an SFT step; the
# bounds allow a margin over each.
MEMORY_BUDGET = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2
MAX_SAMPLED_PROMPTS = MEMORY_BUDGET // 80_000
MAX_EXACT_PROMPTS = MEMORY_BUDGET // 4_000_000
MAX_BATCH = MEMORY_BUDGET // 150_000
SampledPrompts = Annotated[int, Bounds(low=1, high=MAX_SAMPLED_PROMPTS, description=(
    f'an integer from 1 to {MAX_SAMPLED_PROMPTS:,} (what half the memory here holds)'))]
ExactPrompts = Annotated[int, Bounds(low=1, high=MAX_EXACT_PROMPTS, description=(
    f'an integer from 1 to {MAX_EXACT_PROMPTS:,} (what half the memory here holds)'))]
BatchSize = Annotated[int, Bounds(low=1, high=MAX_BATCH, description=(
    f'an integer from 1 to {MAX_BATCH:,} (what half the memory here holds)'))]


def field_comments(config_class):
    """{field name: its comment}: the comment at the end of the field's line, or else the comment
    lines just above it. Fields of base classes included."""
    comments = {}
    for cls in reversed(config_class.__mro__[:-1]):  # base classes first, `object` left out
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        above = []
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith('#'):
                above.append(stripped.lstrip('# '))
                continue
            match = re.match(r'\s+(\w+)\s*:', line)
            if match:
                trailing = _trailing_comment(line)
                comments[match.group(1)] = trailing or ' '.join(above)
            above = []
    return comments


def _trailing_comment(line):
    """The comment at the end of a line of code ('' if none), found by the tokenizer so a '#' inside
    a string does not count."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip() + '\n').readline):
            if token.type == tokenize.COMMENT:
                return token.string.lstrip('# ')
    except (tokenize.TokenError, SyntaxError):
        pass
    return ''


def flag_name(field_name, prefix=''):
    """--learning-rate for learning_rate; --ppo.learning-rate with prefix 'ppo'."""
    return '--' + (f'{prefix}.' if prefix else '') + field_name.replace('_', '-')


def add_config_flags(parser, config_class, prefix='', skip=(), defaults=None):
    """Add a flag for every field of config_class (but those in `skip`) to parser.

    A flag the user does not give is left out of the parsed arguments (argparse.SUPPRESS), so
    config_from_args can start from any base config. `defaults` (a config instance) is what the help
    shows as the default; the class's own defaults otherwise.

    A field that is itself a config (a dataclass) gives its fields as flags --NAME.FIELD, in a group of
    their own (recursively: --NAME.INNER.FIELD), but for those the outer config sets in it itself, which
    the outer class names once in its class attribute SET_BY_STUDY (not a field: it has no annotation):

        @dataclass
        class RunAllConfig:
            SET_BY_STUDY = ('seed', 'device', 'beta', 'preference')
            seed: Seed = 0  # ...
            sft: SFTConfig = field(default_factory=SFTConfig)   ->  --sft.iters, ... but no --sft.seed
    """
    hints = typing.get_type_hints(config_class, include_extras=True)
    comments = field_comments(config_class)
    group = parser.add_argument_group(f'{prefix} settings' if prefix else 'settings')
    for field in fields(config_class):
        if field.name in skip:
            continue
        default = getattr(defaults, field.name) if defaults is not None else _default(field)
        if _is_config(hints[field.name]):
            add_config_flags(parser, hints[field.name], _destination(field.name, prefix),
                             skip=getattr(config_class, 'SET_BY_STUDY', ()), defaults=default)
            continue
        options = _argparse_options(hints[field.name], default)
        shown = ' '.join(f'{value:g}' if isinstance(value, float) else str(value) for value in default) \
            if isinstance(default, tuple) else default
        comment = comments.get(field.name, '')
        shown = '' if '(default:' in comment else f' (default: {shown})'  # a comment may say it in words
        group.add_argument(flag_name(field.name, prefix), dest=_destination(field.name, prefix),
                           default=argparse.SUPPRESS, help=comment + shown, **options)


def config_from_args(args, config_class, prefix='', base=None):
    """base (or config_class()) with the fields the user gave flags for replaced; a nested config is
    base's own with the fields given as --NAME.FIELD replaced, the same way."""
    base = base if base is not None else config_class()
    hints = typing.get_type_hints(config_class, include_extras=True)
    given = {}
    for field in fields(config_class):
        destination = _destination(field.name, prefix)
        if _is_config(hints[field.name]):
            given[field.name] = config_from_args(args, hints[field.name], destination, getattr(base, field.name))
        elif hasattr(args, destination):
            value = getattr(args, destination)
            given[field.name] = tuple(value) if isinstance(value, list) else value
    return replace(base, **given)


def value_fits(hint, value):
    """Whether `value` (read back from a file) is one that a field annotated `hint` takes: what its
    flag would accept, as a Python value rather than text."""
    origin, items = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(value_fits(items[0], item) for item in value)
        return len(value) == len(items) and all(value_fits(*pair) for pair in zip(items, value))
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in items)
    if origin is Annotated:
        return value_fits(items[0], value) and items[1].contains(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _default(field):
    return field.default_factory() if field.default is MISSING else field.default


def _is_config(hint):
    return isinstance(hint, type) and is_dataclass(hint)


def _destination(field_name, prefix):
    return f'{prefix}.{field_name}' if prefix else field_name


def _argparse_options(hint, default):
    """argparse keyword arguments for a field annotated `hint`."""
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        count = '+' if len(items) == 2 and items[1] is Ellipsis else len(items)
        return {**_argparse_options(items[0], None), 'nargs': count}
    if typing.get_origin(hint) is Literal:
        return {'choices': typing.get_args(hint)}
    if hint is bool:
        return {'action': argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is Annotated:
        kind, bounds = typing.get_args(hint)[:2]
        return {'type': bounds.parse(kind), 'metavar': 'N'}
    if hint in (int, float):
        return {'type': Bounds(description='a number').parse(hint), 'metavar': 'N'}
    return {'type': hint}
