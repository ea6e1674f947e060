"""The collapse and the ceiling, measured exactly: collapse.png and runs/<run>/collapse.md."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('collapse')
