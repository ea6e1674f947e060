"""Replay a finished run's .jsonl logs into TensorBoard, wandb or trackio."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('track')
