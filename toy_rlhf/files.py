"""Files written atomically (a temporary file beside the target, then a rename), and read back."""
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it to `path`: an interrupted
    write never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(descriptor, 'wb') as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path, text):
    atomic_write(path, lambda file: file.write(text.encode()))


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + '\n')


def write_jsonl(path, rows):
    """One JSON object per line."""
    write_text(path, ''.join(json.dumps(row, sort_keys=True) + '\n' for row in rows))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
