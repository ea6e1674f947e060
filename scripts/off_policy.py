"""PPO, RLOO and GRPO off-policy on purpose, against pi*: off_policy.png and runs/<run>/off_policy.md."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('off-policy')
