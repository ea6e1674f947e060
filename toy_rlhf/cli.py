"""Command-line interface: `toy-rlhf <command>` and the thin scripts in scripts/ share these parsers.

Every failure a user can cause (a bad flag, a missing or broken checkpoint, an unwritable run folder,
a full disk, a run folder another run holds, a NaN during training) ends with one line on stderr and
exit status 2, never a traceback. SIGTERM stops a command the way Ctrl-C does. What lies outside a
command (Ctrl-C while torch is imported or the interpreter exits, output into a closed pipe) is
toy_rlhf.entry's, which `toy-rlhf` and the scripts call.
"""
import argparse
import concurrent.futures
import contextlib
import re
import signal
import sys
from pathlib import Path

import torch

from toy_rlhf.checkpoint import CheckpointError
from toy_rlhf.commands import commands
from toy_rlhf.executors import ExecutorConfig, ExecutorError, check_executor
from toy_rlhf.files import WriteError
from toy_rlhf.methods import METHODS
from toy_rlhf.preferences import PreferenceError
from toy_rlhf.run_dir import PLOTS, RunDirError, open_run_dir
from toy_rlhf.tracking import TRACKERS, TrackingError, replay, tracker_module
from toy_rlhf.training import TrainingError
from toy_rlhf.usage import UsageError, check_preference, threads


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), exit status 2."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def add_common_arguments(parser, with_run, run='default'):
    if with_run:
        where = parser.add_mutually_exclusive_group()
        where.add_argument('--run', default=run, metavar='NAME',
                           help=f'run name: checkpoints and logs go to runs/NAME (default: {run})')
        where.add_argument('--run-dir', default=None, metavar='PATH',
                           help='or any folder for the checkpoints and logs, instead of runs/NAME')
        parser.add_argument('--track', choices=TRACKERS, default=None,
                            help="once the command is done, replay the run folder's logs into this tracker, as "
                                 '`toy-rlhf track RUN_DIR --to TRACKER` does: tensorboard (into RUN/tensorboard), '
                                 'wandb (offline, into RUN/wandb) or trackio; each an optional extra, pip install '
                                 '-e ".[tensorboard]" (default: none)')
    parser.add_argument('--threads', type=threads, default=None,
                        help='CPU threads for torch (default: all cores torch sees)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def build_parser(command, prog):
    spec = commands()[command]
    parser = Parser(prog=prog, description=f'{spec.summary[0].upper()}{spec.summary[1:]}. {spec.description}')
    add_common_arguments(parser, with_run=spec.writes_run_dir, run=spec.default_run)
    spec.add_arguments(parser)
    return parser


def prepare(args, writes_run_dir):
    """Check the settings argparse cannot check, and set up torch accordingly."""
    if getattr(args, 'device', None) == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if getattr(args, 'device', None) == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda: no CUDA device is available here; use --device cpu')
    for name, value in vars(args).items():
        if name.rpartition('.')[2] == 'preference' and value:
            check_preference(value)
    if getattr(args, 'track', None):
        tracker_module(args.track)  # not installed: said now, not after training
    if getattr(args, 'executor', None) == 'dask':  # dask not installed, or no scheduler at --address: the same
        check_executor(ExecutorConfig('dask', address=getattr(args, 'address', 'local')))
    if args.threads:
        torch.set_num_threads(args.threads)
    if writes_run_dir and args.run_dir is None:
        if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9._-]*', args.run) or '..' in args.run:
            raise UsageError(f'--run {args.run!r}: a run is a plain name (letters, digits, . _ -), '
                             'its files go to runs/NAME (--run-dir PATH takes any folder)')
        args.run_dir = Path('runs') / args.run
    elif writes_run_dir:
        if not args.run_dir:  # Path('') is the current folder: a quoting mistake, not a choice
            raise UsageError("--run-dir '': an empty path; name a folder (--run-dir . for this one)")
        args.run_dir = Path(args.run_dir)
    if hasattr(args, 'plots_dir'):
        if args.plots_dir == '':
            raise UsageError("--plots-dir '': an empty path; name a folder, or leave the flag out for RUN/plots")
        if args.plots_dir:  # a folder the user named: refuse it now, not after training
            args.plots_dir = Path(args.plots_dir)
            _check_writable(args.plots_dir)
        else:
            args.plots_dir = args.run_dir / PLOTS
    args.progress = not args.quiet


def _check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / '.write-test'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as error:
        raise UsageError(f'cannot write to folder {folder}: {error.strerror}') from None


# How torch's CPU allocator words a failed allocation (a size no machine holds: --pairs 10^9, say).
OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory|bad_alloc")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the process is, so that it unwinds exactly as Ctrl-C does."""


def _terminate(signum, frame):
    raise Terminated()


def run_command(command, argv=None, prog=None):
    """Parse argv for `command` and run it (see running)."""
    with running(command, argv, prog) as args:
        commands()[command].run(args)


@contextlib.contextmanager
def running(command, argv=None, prog=None):
    """Parse argv for `command` and hold its run folder while the block runs it with the parsed flags
    (yielded); then replay the run into --track's tracker. Every user-caused failure, in the block
    too, ends as one line, exit 2. A study's own script runs the study in the block (scripts/run_all.py)."""
    spec = commands()[command]
    parser = build_parser(command, prog or f'scripts/{spec.script}')
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each stage's summary line shows up as it finishes
    signal.signal(signal.SIGTERM, _terminate)
    try:
        prepare(args, spec.writes_run_dir)
        with open_run_dir(args.run_dir) if spec.writes_run_dir else contextlib.nullcontext():
            yield args
            if getattr(args, 'track', None):  # the whole run folder, from its logs, once they are all written
                replay(args.run_dir, args.track)
    except (UsageError, CheckpointError, TrainingError, WriteError, RunDirError, PreferenceError,
            ExecutorError, TrackingError) as error:
        print(f'{parser.prog}: error: {error}', file=sys.stderr)
        sys.exit(2)
    except concurrent.futures.BrokenExecutor:  # a RuntimeError too: before the next clause
        print(f'{parser.prog}: error: a worker process died (killed, or out of memory) before its run ended; nothing '
              'is half-written, and the same command again reuses every checkpoint written (fewer --workers if memory '
              'is short)', file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and not OUT_OF_MEMORY.search(str(error)):
            raise  # a bug, not a setting: its traceback is what a report needs
        print(f'{parser.prog}: error: out of memory; nothing half-written. Choose smaller sizes (pairs, batch '
              'size, prompts per round, samples per prompt)', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        print(f'{parser.prog}: {"terminated" if isinstance(stop, Terminated) else "interrupted"}; finished '
              'checkpoints are kept, nothing half-written', file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT))


def usage():
    """`toy-rlhf --help`: every command with its one line."""
    lines = ['usage: toy-rlhf COMMAND [options]   (toy-rlhf COMMAND --help: its options)', '', 'commands:',
             name_table({name: spec.summary for name, spec in commands().items()})]
    return '\n'.join(lines)


def name_table(summaries):
    """One line per {name: summary}, the summaries in one column however long a registered name is."""
    width = max(map(len, summaries))
    return '\n'.join(f'  {name:<{width}}  {summary}' for name, summary in summaries.items())


def train_main(argv=None):
    """`python scripts/train.py METHOD [options]`: any registered training method."""
    argv = sys.argv[1:] if argv is None else argv
    names = [name for name, method in METHODS.items() if method.train is not None]
    if not argv or argv[0] not in names:
        if argv and argv[0] in ('-h', '--help'):
            print('usage: scripts/train.py METHOD [options]   (scripts/train.py METHOD --help: its options)\n\n'
                  'methods:\n' + name_table({name: METHODS[name].summary for name in names}))
            sys.exit(0)
        problem = 'no method given' if not argv else f'unknown method {argv[0]!r}'
        print(f'scripts/train.py: error: {problem}; methods: {", ".join(names)} (see --help)', file=sys.stderr)
        sys.exit(2)
    run_command(argv[0], argv[1:], prog=f'scripts/train.py {argv[0]}')


def main(argv=None):
    """`toy-rlhf COMMAND [options]`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ('-h', '--help'):
        print(usage())
        sys.exit(0)
    if not argv or argv[0] not in commands():
        problem = 'no command given' if not argv else f'unknown command {argv[0]!r}'
        print(f'toy-rlhf: error: {problem}; commands: {", ".join(commands())} (toy-rlhf --help)',
              file=sys.stderr)
        sys.exit(2)
    run_command(argv[0], argv[1:], prog=f'toy-rlhf {argv[0]}')
