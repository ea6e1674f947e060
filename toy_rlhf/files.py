"""Files written atomically (a temporary file beside the target, then a rename), and read back.

Every file the project writes goes through atomic_write: an interrupted or failed write (Ctrl-C,
SIGTERM, a full disk) leaves the previous file, or none, under the final name, never a half-written
one. A process killed outright (SIGKILL) can leave its temporary file behind; temporary files are
named `.NAME.toy-rlhf.XXXXXXXX.tmp` so that the next run in the folder can find and remove them, and
only them (`toy_rlhf.run_dir`).
"""
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

# A temporary file's name is '.' + the target's name + TEMPORARY_MARKER + mkstemp's 8 random
# characters + TEMPORARY_SUFFIX. The marker is what tells our leftovers from a user's own
# '.something.tmp', which a clean-up must never delete.
TEMPORARY_MARKER = '.toy-rlhf.'
TEMPORARY_SUFFIX = '.tmp'
TEMPORARY_NAME = re.compile(rf'\..+{re.escape(TEMPORARY_MARKER)}[a-z0-9_]{{8}}{re.escape(TEMPORARY_SUFFIX)}')


class WriteError(Exception):
    """A file that could not be written (disk full, no permission); the message is one line naming it."""


def is_temporary(name):
    """Whether a file called `name` is the temporary file of one of our atomic writes."""
    return TEMPORARY_NAME.fullmatch(name) is not None


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it to `path`. An OSError
    (ENOSPC, EACCES, ...), or any error caused by one, becomes a WriteError naming `path`, with
    nothing left behind."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}{TEMPORARY_MARKER}',
                                                 suffix=TEMPORARY_SUFFIX)
        with os.fdopen(descriptor, 'wb') as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        os_error = _os_error_behind(error)
        if os_error is not None:
            raise WriteError(f'cannot write {path}: {os_error.strerror or os_error}; free some space or '
                             'choose a folder you can write to, then run the command again') from None
        raise


def _os_error_behind(error):
    """The OSError that error is or was caused by, following the chain a traceback shows; None if none.
    Libraries wrap the OS's errors (torch.save turns ENOSPC into a RuntimeError). Ctrl-C and SIGTERM
    (BaseExceptions) are never write errors, whatever they interrupted."""
    seen = set()
    while isinstance(error, Exception) and id(error) not in seen:  # a chain can loop
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_text(path, text):
    atomic_write(path, lambda file: file.write(text.encode()))


def write_json(path, data):
    """Write data as strict JSON: a NaN or infinity, which other JSON readers reject, is refused with
    a WriteError naming the key that holds it."""
    key = _non_finite_key(data)
    if key is not None:
        raise WriteError(f'cannot write {path}: {key or "the value"} is NaN or infinite, which JSON '
                         'cannot hold')
    write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + '\n')


def _non_finite_key(data, key=''):
    """Where in data (nested dicts and lists) a NaN or infinite float is, as 'policies[0].gap_closed'
    ('' for data itself); None if nowhere."""
    if isinstance(data, float):
        return None if math.isfinite(data) else key
    if isinstance(data, dict):
        children = ((f'{key}.{name}' if key else str(name), value) for name, value in data.items())
    elif isinstance(data, (list, tuple)):
        children = ((f'{key}[{index}]', value) for index, value in enumerate(data))
    else:
        return None
    for child_key, value in children:
        found = _non_finite_key(value, child_key)
        if found is not None:
            return found
    return None


def jsonl_text(rows):
    """One JSON object per line."""
    return ''.join(json.dumps(row, sort_keys=True) + '\n' for row in rows)


def fingerprint(path):
    """A short hash of a file's bytes: which upstream file a result was made from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
