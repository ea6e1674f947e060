"""DPO on the labelled pairs, no reward model (writes runs/<run>/dpo_beta<B>.pt and .jsonl)."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('dpo')
