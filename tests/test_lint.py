"""The code passes the project's linter (ruff, configured in ruff.toml): no unused import, undefined
name or known bug pattern lands unnoticed."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_linter_finds_nothing():
    # ruff comes with the test extra (pip install -e ".[test]").
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '--output-format', 'concise',
                             'mingpt', 'toy_rlhf', 'tests', 'scripts', 'setup.py'],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
