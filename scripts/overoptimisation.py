"""Reward over-optimisation, measured exactly: overoptimisation.png and runs/<run>/overoptimisation.md."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('overopt')
