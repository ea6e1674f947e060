"""toy-rlhf: SFT, a reward model and PPO with a KL penalty on a digit language known exactly."""
