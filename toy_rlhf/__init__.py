"""toy-rlhf: SFT, a reward model and PPO with a KL penalty on a digit language known exactly."""
import os

# Threads that finish their share of a parallel loop sleep instead of spinning while they wait for
# the others. On an idle 2-core machine that costs ~5%; beside one busy process it keeps two threads
# from fighting it for a core (1.7x slower here, 11x on another machine). OpenMP reads this once,
# when torch loads its runtime, so it is set here, before anything in toy_rlhf imports torch; a
# value the user set wins. The measurements are in the README (Reproducibility and speed).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
