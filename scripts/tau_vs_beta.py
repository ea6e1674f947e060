"""tau is not beta: pi_tau against pi* over one grid of strengths, exactly: tau.png and runs/<run>/tau.md."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('tau')
