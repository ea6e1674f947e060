"""The wheel `pip install .` builds holds the whole package: every module under mingpt/ and toy_rlhf/,
subpackages included, and no other module. An editable install reads the source tree and cannot
show a module missing from the wheel; only the wheel itself can."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ('mingpt', 'toy_rlhf')


def source_modules():
    """Every .py file under the packages' folders, as paths in a wheel: what the wheel must hold."""
    return [path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob('*.py')
            if '__pycache__' not in path.parts]


def build_wheel(tmp_path):
    """Build the wheel as pip does, offline. From a copy: setuptools writes build/ and *.egg-info beside
    setup.py, which must not land in the checkout (or be read back from an earlier build)."""
    source = tmp_path / 'source'
    source.mkdir()
    for path in ROOT.iterdir():  # setup.py and the files it may read (README, configuration)
        if path.is_file():
            shutil.copy2(path, source)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns('__pycache__'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(source), '--no-deps', '--no-build-isolation',
                    '--no-index', '--quiet', '--wheel-dir', str(tmp_path / 'dist')],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, 'PIP_DISABLE_PIP_VERSION_CHECK': '1'})
    (wheel,) = (tmp_path / 'dist').glob('*.whl')
    return wheel


def test_the_wheel_holds_every_module_of_the_source_tree_and_no_other(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        modules = [name for name in wheel.namelist() if name.endswith('.py')]
    expected = source_modules()
    assert [module for module in expected if module not in modules] == []  # missing from the wheel
    assert [module for module in modules if module not in expected] == []  # not in mingpt/ or toy_rlhf/
