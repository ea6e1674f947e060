"""What `toy-rlhf` and scripts/*.py call: toy_rlhf.cli (or a study's own module), with the edges of the
process made quiet.

toy_rlhf.cli turns every failure inside a command into one line. Three moments lie outside it, and a
user meets each as a traceback unless it is caught here:
- start-up: importing the command line imports torch, seconds in which Ctrl-C is likely, and a
  KeyboardInterrupt raised inside torch's C++ import code can be swallowed or abort the process. So
  this module imports nothing heavy, and imports toy_rlhf.cli (or the module a script names) with
  SIGINT and SIGTERM blocked: a signal that arrives meanwhile waits, and is taken as soon as the
  import is done.
- a reader that left: `toy-rlhf --help | head -1` closes the pipe before the output is written.
  The process ends as a Unix tool that SIGPIPE kills: silently, with the status a shell reports
  for it, 141 (128 + SIGPIPE). Output that cannot be written otherwise (`> /dev/full`) is one line
  and status 2, as every other write error.
- interpreter exit: after the command, torch's and matplotlib's exit handlers run, and Ctrl-C (or
  SIGTERM, which toy_rlhf.cli turns into Ctrl-C) there would interrupt them.
Each ends at once with os._exit: nothing is left to save (finished checkpoints are whole and the run
folder is released), and a normal exit would flush into the closed pipe or rerun the handlers.
"""
import contextlib
import importlib
import os
import signal
import sys


def main():
    """The console script `toy-rlhf COMMAND [options]`."""
    with quiet_edges() as cli:
        cli.main()


def train_main():
    """`python scripts/train.py METHOD [options]`."""
    with quiet_edges() as cli:
        cli.train_main()


def run_command(name):
    """`python scripts/X.py [options]`: the command `name` of toy_rlhf.cli."""
    with quiet_edges() as cli:
        cli.run_command(name)


@contextlib.contextmanager
def quiet_edges(module='toy_rlhf.cli'):
    """The module, imported with SIGINT and SIGTERM held; the command run in the block and the
    interpreter's exit after it each end quietly however they are cut short."""
    stops = {signal.SIGINT, signal.SIGTERM}
    try:
        try:
            signal.signal(signal.SIGTERM, _stop)  # toy_rlhf.cli has its own for the command's run
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)
            try:
                imported = importlib.import_module(module)  # imports torch: when Ctrl-C is likeliest
            finally:
                # Ctrl-C unwinds the command (toy_rlhf.cli says so in one line); one that came during
                # the import is raised here, at the unblocking, and ends below.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            yield imported
        finally:
            sys.stdout.flush()  # here, where a closed pipe can be caught, not at interpreter exit
    except BrokenPipeError:
        os._exit(128 + signal.SIGPIPE)
    except KeyboardInterrupt:  # before toy_rlhf.cli has its own handler: while parsing
        _stop(signal.SIGINT, None)
    except OSError as error:  # the output itself cannot be written (a full disk behind stdout)
        _say(f'error: cannot write the output: {error.strerror or error}')
        os._exit(2)
    finally:
        for signum in stops:
            signal.signal(signum, _stop)


def _stop(signum, frame):
    """End now, with one line and the status a shell gives a process stopped by `signum`."""
    _say('interrupted' if signum == signal.SIGINT else 'terminated')
    os._exit(128 + signum)


def _say(line):
    """One line on stderr, written directly (Python's own stream may be what failed)."""
    try:
        os.write(2, f'{os.path.basename(sys.argv[0])}: {line}\n'.encode())
    except OSError:  # stderr, too, may be a closed pipe
        pass
