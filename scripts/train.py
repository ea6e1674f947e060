"""Train the SFT policy with any registered method: `python scripts/train.py METHOD [options]` (--help lists them)."""
from toy_rlhf.entry import train_main

if __name__ == '__main__':
    train_main()
