"""The README and docs/results.md show only what exists: every command line they show parses with
its command's own parser, every image and file they link or name is in the repository, the methods
the README lists are the registry's, and the README keeps the install-and-test line CI runs.

A command line is a `python scripts/X.py ...`, `scripts/X.py ...` or `toy-rlhf CMD ...` in a fenced
bash block or an inline code span. The pages write a few placeholders where a reader puts a value of
their own; PLACEHOLDERS below gives each a value its flag accepts. Notation: `a|b|c` in one word means
one of them, `[...]` an optional part (with `|` between alternatives); every choice is parsed.
"""
import contextlib
import io
import itertools
import re
import shlex
from pathlib import Path

import pytest

from toy_rlhf import cli
from toy_rlhf.commands import commands
from toy_rlhf.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
PAGES = (README, ROOT / 'docs' / 'results.md')

# Upper-case words the pages use as placeholders, each replaced (as a whole word) by a value the flag
# after which it appears accepts. Placeholders inside a word (runs/RUN/ppo_beta1.pt, h-pref-NAME, seedS)
# stay as they are: those flags take any string, and checking a name is the command's run, not its parse.
PLACEHOLDERS = {'RUN': 'default', 'NAME': 'digit-sum', 'S': '1', 'B': '1', 'N': '2',
                'CHECKPOINT': 'runs/default/ppo_beta1.pt', 'tcp://HOST:PORT': 'tcp://127.0.0.1:8786'}
# `scripts/train.py NAME`: its first word is a method; a placeholder there stands for this one.
METHOD_PLACEHOLDER = 'ppo'
# Commands named by a placeholder (`toy-rlhf COMMAND`, `toy-rlhf NAME`) or elided (`python scripts/...`)
# stand for every command, and are skipped.
SKIPPED = ('COMMAND', 'NAME', 'METHOD', '...')
START = re.compile(r'(?:^|\s)(?:python\s+)?(?:(scripts/)(\S+?\.py|\.\.\.)|(toy-rlhf)(?=\s|$))')
SHELL_ENDS = {'&&', '||', ';', '|', '#'}
SCRIPTS = {spec.script: name for name, spec in commands().items()}


def code_snippets(text):
    """(line number, text) of each fenced bash line (comments cut) and each inline code span."""
    snippets, prose, fence = [], [], None
    for number, line in enumerate(text.split('\n'), 1):
        if line.lstrip().startswith('```'):
            fence = None if fence is not None else line.strip()[3:]
            prose.append('')
            continue
        prose.append(line if fence is None else '')  # a code block is not prose: no inline spans
        if fence in ('bash', 'sh', 'shell'):  # a Python or plain block shows no commands
            snippets.append((number, re.sub(r'\s#.*', '', line)))
    joined = '\n'.join(prose)
    for span in re.finditer(r'`([^`]+)`', joined):
        snippets.append((joined.count('\n', 0, span.start()) + 1, ' '.join(span.group(1).split())))
    return snippets


def command_lines(path):
    """(where, shown text, command name or None when skipped, argv choices) of each command shown."""
    found = []
    for number, snippet in code_snippets(path.read_text()):
        for start in START.finditer(snippet):
            words, depth = [], 0
            for word in shlex.split(snippet[start.end():]):
                if word in SHELL_ENDS and not depth:  # a `|` inside [...] separates alternatives
                    break
                depth += word.count('[') - word.count(']')
                words.append(word)
            where = f'{path.name}:{number}'
            if start.group(3):  # toy-rlhf
                if not words or words[0] in ('--help', '-h'):
                    found.append((where, snippet, '--help', [words[1:]]))
                    continue
                name, words = words[0], words[1:]
            else:
                script = start.group(2)
                if script == '...':
                    continue
                name = SCRIPTS.get(script, script)
                if script == 'train.py':
                    if not words:
                        continue
                    name = METHOD_PLACEHOLDER if words[0] in SKIPPED else words[0]
                    words = words[1:]
            if name in SKIPPED:
                continue
            found.append((where, snippet, name, choices(words)))
    return found


def choices(words):
    """Every argv the notation allows: `a|b` in a word is one of them, `[...]` an optional part."""
    text = ' '.join(words)
    parts = re.split(r'(\[[^\]]*\])', text)
    options = []
    for part in parts:
        if part.startswith('['):
            inner = [alternative.split() for alternative in part[1:-1].split(' | ')]
            options.append([[]] + inner)
        else:
            per_word = [word.split('|') for word in part.split()]
            options.append([list(combination) for combination in itertools.product(*per_word)])
    argvs = []
    for combination in itertools.product(*options):
        argv = [word for piece in combination for word in piece]
        argvs.append([PLACEHOLDERS.get(word, word) for word in argv])
    return argvs


def parse_error(name, argv):
    """None if `name` parses argv, else argparse's message."""
    parser = cli.build_parser(name, f'toy-rlhf {name}')
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as stop:
            return None if stop.code == 0 else stderr.getvalue().strip() or f'exit status {stop.code}'
    return None


SHOWN = [line for page in PAGES for line in command_lines(page)]


def test_the_pages_show_commands_to_check():
    # If the extraction broke, every check below would pass on nothing.
    names = {name for _, _, name, _ in SHOWN}
    assert {'all', 'compare', 'sweep', 'credit', 'overopt', 'evaluate', 'leaderboard'} <= names


@pytest.mark.parametrize('where, shown, name, argvs', SHOWN, ids=[f'{w} {n}' for w, _, n, _ in SHOWN])
def test_every_command_shown_exists_and_parses(where, shown, name, argvs):
    if name == '--help':
        assert argvs == [[]], f'{where}: `{shown}`: toy-rlhf --help takes nothing more'
        return
    assert name in commands(), f'{where}: `{shown}`: no command {name!r} (commands: {", ".join(commands())})'
    for argv in argvs:
        error = parse_error(name, argv)
        assert error is None, f'{where}: `{shown}` as {argv}: {error}'


def test_every_script_a_page_names_exists():
    for page in PAGES:
        for script in re.findall(r'scripts/(\w+\.py)', page.read_text()):
            assert (ROOT / 'scripts' / script).exists(), f'{page.name}: scripts/{script} does not exist'


def anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r'(?ms)^```.*?^```', '', page.read_text())
    return {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-')
            for heading in re.findall(r'(?m)^#+ (.+)$', text)}


def test_every_linked_image_file_and_heading_exists():
    for page in PAGES:
        for target in re.findall(r'\]\(([^)\s]+)\)', page.read_text()):
            if re.match(r'[a-z]+:', target):
                continue
            name, _, anchor = target.partition('#')
            path = (page.parent / name).resolve() if name else page
            assert path.exists(), f'{page.name}: links to {target}, which does not exist'
            if anchor:
                assert anchor in anchors(path), f'{page.name}: links to {target}, a heading {path.name} lacks'


def test_every_source_path_a_page_names_exists():
    # Paths in code spans: a file that moved (toy_rlhf/ppo.py went to toy_rlhf/methods/) fails here.
    for page in PAGES:
        for path in re.findall(r'`((?:mingpt|toy_rlhf|scripts|tests|plots|docs)/[\w/.]*)`', page.read_text()):
            assert (ROOT / path).exists(), f'{page.name}: names {path}, which does not exist'


def test_the_readme_lists_every_registered_method_with_its_summary():
    text = README.read_text()
    for method in METHODS.values():
        assert f'- `{method.name}`: {method.summary}\n' in text, f'README: no line for the method {method.name!r}'


def test_the_readme_shows_the_install_and_test_line_ci_runs():
    ci_line = (ROOT / '.ci' / 'run').read_text().strip().split('\n')[-1]
    assert ci_line == 'pip install -e ".[test]" && pytest'
    assert any(line.startswith(ci_line + ' ') or line == ci_line for line in README.read_text().split('\n')[:40])
