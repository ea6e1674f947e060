"""Every registered method from the same SFT policy and reward model, each measured exactly against the optimum it aims at (writes runs/<run>/methods.md, plots/methods.png)."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('compare')
