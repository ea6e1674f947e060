from setuptools import find_packages, setup

setup(
    name='toy-rlhf',
    version='0.1.0',
    description='RLHF (SFT, a reward model, PPO with a KL penalty) on a toy digit language known exactly',
    # Every package under mingpt/ and toy_rlhf/, so that a new subpackage ships without an edit here
    # (tests/ and scripts/ are not part of the install).
    packages=find_packages(include=['mingpt', 'mingpt.*', 'toy_rlhf', 'toy_rlhf.*']),
    python_requires='>=3.10',
    install_requires=['torch>=2.1', 'numpy', 'matplotlib', 'tqdm'],
    # setuptools: tests/test_packaging.py builds the wheel offline, without build isolation (70.1 builds
    # wheels without the `wheel` package). ruff: the linter tests/test_lint.py runs. pytest-xdist: the
    # suite runs as one single-threaded process per core (pytest.ini), which on 2 cores took 0.77x the
    # wall time of one process on two threads (300 s against 388 s, side by side): most tests are small
    # tensors, bound by per-op overhead that a second thread does not share.
    extras_require={'test': ['pytest', 'pytest-xdist', 'setuptools>=70.1', 'ruff'],
                    # --executor dask (toy_rlhf.executors): a LocalCluster here or a scheduler elsewhere.
                    'dask': ['dask', 'distributed'],
                    # --track / toy-rlhf track (toy_rlhf.tracking): the logs replayed into a tracker.
                    'tensorboard': ['tensorboard'], 'wandb': ['wandb'], 'trackio': ['trackio']},
    entry_points={'console_scripts': ['toy-rlhf = toy_rlhf.entry:main']},
)
