"""PPO with a KL penalty of strength --beta against the reward model (writes runs/<run>/ppo_beta<B>.pt and .jsonl)."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('ppo')
