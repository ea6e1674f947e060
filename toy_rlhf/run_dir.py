"""A run's folder, held by one process at a time.

A command that writes into runs/NAME opens it with `open_run_dir`, which
- locks it: a lock file, `.toy-rlhf.lock` (a name no one else's file has), held with an exclusive
  flock while the command runs. A second
  command on the same folder is refused with one line naming the process that holds it. The kernel
  drops a flock when its process dies, however it dies, so a lock file left by a killed run is not
  held by anyone and the next run takes it over (POSIX: Linux and macOS);
- removes the temporary files a killed run left behind (atomic writes that never got renamed) in the
  folders the project writes (the run folder and its plots/), and nothing else;
- removes the folders it created if the command fails before writing anything into them, so a
  mistake leaves no empty run folders behind.
"""
import contextlib
import fcntl
import os
from pathlib import Path

from toy_rlhf.files import is_temporary

LOCK = '.toy-rlhf.lock'
PLOTS = 'plots'  # the run's figures, unless --plots-dir names another folder


class RunDirError(Exception):
    """A run folder that cannot be used (held by another process, or not writable); one line."""


@contextlib.contextmanager
def open_run_dir(run_dir):
    """Create run_dir if needed, lock it for this process and clean it; yields its Path."""
    run_dir = Path(run_dir)
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _acquire(run_dir / LOCK)
    except OSError as error:  # a full disk or no permission: leave nothing behind, the lock file neither
        with contextlib.suppress(OSError):
            (run_dir / LOCK).unlink(missing_ok=True)
        _remove_if_empty(created)
        raise RunDirError(f'cannot write to folder {run_dir}: {error.strerror}') from None
    except RunDirError:
        _remove_if_empty(created)
        raise
    try:
        remove_stale_temporaries(run_dir)
        yield run_dir
    finally:
        (run_dir / LOCK).unlink(missing_ok=True)
        os.close(lock)  # releases the flock
        _remove_if_empty(created)


def _acquire(path):
    """Hold an exclusive flock on the lock file at path and write our process id into it; returns
    its descriptor. Refuses with RunDirError if a live process holds it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(descriptor, 64).decode(errors='replace').strip() or 'unknown'
            os.close(descriptor)
            raise RunDirError(f'{path.parent} is in use by another run (process {owner}); wait for it '
                              'to finish, or choose another --run') from None
        # The holder we waited on may have removed the file as it finished: then our lock is on a
        # file no one else can see, so start again on the file under the name.
        if path.exists() and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)
    previous = os.read(descriptor, 64).decode(errors='replace').strip()
    if previous:
        print(f'{path.parent}: taking over the lock of process {previous}, which is no longer running')
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f'{os.getpid()}\n'.encode(), 0)
    return descriptor


def remove_stale_temporaries(run_dir):
    """Remove the temporary files of atomic writes that were never renamed (a killed run's) from
    run_dir and its plots folder. Only safe while holding the folder's lock: no one else is writing
    there. Nothing else is touched: a user's own dot-files, and deeper folders, are theirs."""
    for folder in (Path(run_dir), Path(run_dir) / PLOTS):
        for path in folder.glob('.*'):
            if is_temporary(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                print(f'{path}: removed (a temporary file left by an interrupted run)')


def _remove_if_empty(folders):
    """Remove each of folders (deepest first) that exists and is empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
