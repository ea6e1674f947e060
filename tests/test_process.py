"""The edges of a process, as a shell user meets them: output into a pipe whose reader has left or onto a
full disk, Ctrl-C or SIGTERM while Python is still importing torch, and Ctrl-C while the interpreter
exits. Each ends quietly: no traceback, and the status a shell expects (141 for a closed pipe, 130 for
Ctrl-C, 143 for SIGTERM, 2 for output that cannot be written).

`toy-rlhf` runs here as pip's console-script wrapper runs it: the entry point setup.py names, called
in a fresh interpreter (an installed `toy-rlhf` may belong to another checkout).
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / 'scripts'
ENVIRONMENT = {**os.environ, 'OMP_NUM_THREADS': '1'}


def toy_rlhf(*interpreter_flags, first=''):
    """The command line of `toy-rlhf` (with Python's own flags, and Python code to run `first`)."""
    module, function = re.search(r"'toy-rlhf = ([\w.]+):(\w+)'", (ROOT / 'setup.py').read_text()).groups()
    code = f'{first}import sys; from {module} import {function}; sys.exit({function}())'
    return [sys.executable, *interpreter_flags, '-c', code]


def script(name):
    """What toy_rlhf() is for `python scripts/NAME`."""
    return lambda *interpreter_flags: [sys.executable, *interpreter_flags, str(SCRIPTS / name)]


@pytest.mark.parametrize('arguments', [['--help'], ['sft', '--iters', '1', '--batch-size', '2', '--quiet']],
                         ids=['help', 'a run'])
def test_output_into_a_closed_pipe_ends_quietly(arguments, tmp_path):
    process = subprocess.Popen(toy_rlhf() + arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path, env=ENVIRONMENT)
    # The reader leaves before the first line is written, as `| head -1` does before a later one: the
    # process is still importing torch.
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) in (0, 128 + signal.SIGPIPE, -signal.SIGPIPE), stderr
    assert stderr == ''


def test_output_onto_a_full_disk_is_one_line_and_status_two(tmp_path):
    with open('/dev/full', 'w') as full:
        result = subprocess.run(toy_rlhf() + ['--help'], stdout=full, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path, env=ENVIRONMENT, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.endswith('error: cannot write the output: No space left on device')


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_during_start_up_is_one_line_and_the_signals_status(signum, tmp_path):
    # Signals at three moments from the start of torch's import (found as in the test below) to
    # parsing and training. Before the fix a Ctrl-C inside torch's import was sometimes swallowed (the
    # run went on) or aborted the process from C++, and SIGTERM there ended it without a word.
    for delay in (0.0, 0.5, 1.6):
        process = subprocess.Popen(toy_rlhf('-X', 'importtime') + ['sft', '--iters', '1000', '--quiet', '--run-dir',
                                                                   'run'], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENVIRONMENT,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for line in process.stderr:
            if re.search(r'\|\s+torch\.', line):
                break
        time.sleep(delay)
        process.send_signal(signum)
        stderr = process.stderr.read()
        process.wait(timeout=60)
        ours = [line for line in stderr.splitlines() if not line.startswith('import time:')]
        assert process.returncode == 128 + signum, (delay, stderr[-2000:])
        assert len(ours) == 1 and 'Traceback' not in stderr, (delay, ours)


@pytest.mark.parametrize('command', [toy_rlhf, script('train.py'), script('run_all.py')],
                         ids=['toy-rlhf', 'scripts/train.py', 'scripts/run_all.py'])
def test_ctrl_c_while_torch_is_imported_ends_with_status_130_and_no_traceback(command, tmp_path):
    # -X importtime writes a line to stderr as each module finishes importing: a line for a module
    # inside torch means `import torch` has begun and not ended, the moment to press Ctrl-C.
    process = subprocess.Popen(command('-X', 'importtime') + ['--help'], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENVIRONMENT)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if re.search(r'\|\s+torch\.', line):
            process.send_signal(signal.SIGINT)
            break
    stderr = ''.join(lines) + process.stderr.read()
    stdout = process.stdout.read()
    process.wait(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
    assert stdout == ''  # stopped before --help was answered: the signal came during the import


def test_ctrl_c_during_interpreter_exit_ends_with_status_130_and_no_traceback(tmp_path):
    # Registered before toy-rlhf starts, this exit handler runs last, after torch's own.
    ctrl_c_at_exit = ('import atexit, os, signal, time; '
                      'atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5))); ')
    result = subprocess.run(toy_rlhf(first=ctrl_c_at_exit) + ['--help'], capture_output=True, text=True,
                            cwd=tmp_path, env=ENVIRONMENT, timeout=60)
    assert result.returncode == 130, result.stderr
    assert 'Traceback' not in result.stderr
    assert 'commands:' in result.stdout  # the command's own work was done and its output kept


def test_no_script_imports_torch_before_it_can_answer_ctrl_c():
    # What a script imports at its top runs outside any handler; torch must load inside one.
    code = ('import runpy, sys\n'
            'for path in sys.argv[1:]:\n'
            '    runpy.run_path(path, run_name="not_main")\n'
            'print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "toy_rlhf")))\n')
    result = subprocess.run([sys.executable, '-c', code, *map(str, sorted(SCRIPTS.glob('*.py')))],
                            capture_output=True, text=True, env=ENVIRONMENT, timeout=60, check=True)
    assert result.stdout.strip() == "['toy_rlhf', 'toy_rlhf.entry']"
