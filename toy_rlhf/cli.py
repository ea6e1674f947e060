"""Command-line interface: `toy-rlhf <command>` and the thin scripts in scripts/ share these parsers.

Every failure a user can cause (a bad flag, a missing or broken checkpoint, an unwritable run folder,
a NaN during training) ends with one line on stderr and exit status 2, never a traceback.
"""
import argparse
import sys
from pathlib import Path

import torch

from toy_rlhf import pipeline
from toy_rlhf.checkpoint import CheckpointError
from toy_rlhf.training import TrainingError


class UsageError(Exception):
    """A bad setting that argparse cannot see (an unavailable device, an unwritable folder)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), exit status 2."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def positive_int(text):
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def positive_float(text):
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


def non_negative_float(text):
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'must be a number >= 0, got {text}')
    return value


def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a{"n integer" if kind is int else " number"}: {text!r}') from None
    if value != value or value in (float('inf'), float('-inf')):
        raise argparse.ArgumentTypeError(f'must be finite, got {text}')
    return value


def add_common_arguments(parser):
    parser.add_argument('--run', default='default', metavar='NAME',
                        help='run name: checkpoints and logs go to runs/NAME (default: default)')
    parser.add_argument('--seed', type=int, default=0, help='random seed; same seed, same numbers (default: 0)')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='cpu',
                        help='where to train; auto picks cuda when available (default: cpu, '
                             'fastest for models this small)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='CPU threads for torch (default: all cores torch sees)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def add_sft_arguments(parser):
    defaults = pipeline.SFTConfig()
    parser.add_argument('--iters', type=positive_int, default=defaults.iters,
                        help=f'optimizer steps (default: {defaults.iters})')
    parser.add_argument('--batch-size', type=positive_int, default=defaults.batch_size,
                        help=f'sentences per step (default: {defaults.batch_size})')
    parser.add_argument('--lr', type=positive_float, default=defaults.learning_rate,
                        help=f'peak learning rate, cosine-decayed to 0 (default: {defaults.learning_rate})')
    parser.add_argument('--model-type', choices=('gpt-nano', 'gpt-micro', 'gpt-mini'),
                        default=defaults.model_type, help=f'model size (default: {defaults.model_type})')


def sft_config(args):
    return pipeline.SFTConfig(iters=args.iters, batch_size=args.batch_size, learning_rate=args.lr,
                              model_type=args.model_type, seed=args.seed, device=args.device)


COMMANDS = {
    # name: (script, description, add_arguments, run)
    'sft': ('train_sft.py', 'Supervised fine-tuning: teach a GPT the digit language.',
            add_sft_arguments, lambda args: pipeline.sft_stage(args.run_dir, sft_config(args), args.progress)),
}


def build_parser(command, prog):
    _, description, add_arguments, _ = COMMANDS[command]
    parser = Parser(prog=prog, description=description,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    add_arguments(parser)
    return parser


def prepare(args):
    """Check the settings argparse cannot check, and set up torch accordingly."""
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda: no CUDA device is available here; use --device cpu')
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run_dir = Path('runs') / args.run
    try:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        probe = args.run_dir / '.write-test'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as error:
        raise UsageError(f'cannot write to run folder {args.run_dir}: {error.strerror}') from None
    args.progress = not args.quiet


def run_command(command, argv=None, prog=None):
    """Parse argv for `command`, run it, and turn every user-caused failure into one line, exit 2."""
    script = COMMANDS[command][0]
    parser = build_parser(command, prog or f'scripts/{script}')
    args = parser.parse_args(argv)
    try:
        prepare(args)
        COMMANDS[command][3](args)
    except (UsageError, CheckpointError, TrainingError) as error:
        print(f'{parser.prog}: error: {error}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'{parser.prog}: interrupted; finished checkpoints are kept, nothing half-written',
              file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    """`toy-rlhf COMMAND [options]`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = ', '.join(COMMANDS)
        print(f'usage: toy-rlhf {{{names}}} [options]  (toy-rlhf COMMAND --help for its options)',
              file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ('-h', '--help') else 2)
    run_command(argv[0], argv[1:], prog=f'toy-rlhf {argv[0]}')
