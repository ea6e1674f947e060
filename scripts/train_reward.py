"""Train the reward model on labelled preference pairs (writes runs/<run>/reward.pt and reward.jsonl)."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('reward')
