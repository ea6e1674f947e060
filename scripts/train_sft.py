"""Supervised fine-tuning: teach a GPT the digit language (writes runs/<run>/sft.pt and sft.jsonl)."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('sft')
