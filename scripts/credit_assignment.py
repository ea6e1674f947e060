"""Credit assignment, measured exactly: credit_assignment.png and runs/<run>/credit_assignment.md."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('credit')
