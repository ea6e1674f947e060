"""Exact gold metrics of a policy checkpoint."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('evaluate')
