"""PPO for several betas (and DPO) against the exact optimum: frontier.png and runs/<run>/sweep.md."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('sweep')
