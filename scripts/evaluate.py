"""Exact gold metrics of a policy checkpoint."""
from toy_rlhf.cli import run_command

if __name__ == '__main__':
    run_command('evaluate')
