"""The whole pipeline in one command: SFT, reward model, PPO at beta=1 and beta=0, evaluation, figures, report."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('all')
