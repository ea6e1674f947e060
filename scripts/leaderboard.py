"""Every method on every preference over seeds, each measured exactly against its optimum (writes runs/leaderboard/leaderboard.md, .json and .png)."""
from toy_rlhf.entry import run_command

if __name__ == '__main__':
    run_command('leaderboard')
