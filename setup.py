from setuptools import setup

setup(
    name='toy-rlhf',
    version='0.1.0',
    description='RLHF (SFT, a reward model, PPO with a KL penalty) on a toy digit language known exactly',
    packages=['mingpt', 'toy_rlhf'],
    python_requires='>=3.10',
    install_requires=['torch>=2.1', 'numpy', 'matplotlib', 'tqdm'],
    extras_require={'test': ['pytest']},
    entry_points={'console_scripts': ['toy-rlhf = toy_rlhf.cli:main']},
)
