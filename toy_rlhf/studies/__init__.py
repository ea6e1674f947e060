"""The studies, one file each, every one of the same shape: its config (a dataclass whose fields are
its command's flags), its variants (what it trains), its measurement, the function that runs it into
a run folder, its table and its figure.

  main.py               the whole story: SFT, reward model, PPO per beta, report.md (`toy-rlhf all`)
  methods.py            every method against pi* (`compare`), and its preset the beta sweep (`sweep`)
  leaderboard.py        every method on every preference over seeds (`leaderboard`)
  credit.py             which token earned the reward: baselines and critics (`credit`)
  collapse.py           the collapse and the ceiling: sampled methods against exact paths (`collapse`)
  off_policy.py         ratio variants and sampler corrections as the data goes stale (`off-policy`)
  tau.py                the preference game's pi_tau against pi* (`tau`)
  overoptimisation.py   proxy reward against gold along sqrt(KL) (`overopt`)

What they share is in output.py (Markdown tables, NAME.md and NAME.json) and toy_rlhf.figures (the
look of every figure). A study's larger parts sit in companions named for what they hold:
main_report.py and main_figures.py (report.md's text and the main study's seven figures),
against_optimum.py (one policy's exact row against pi*, for the methods study and `evaluate`),
leaderboard_report.py (the leaderboard's tables and heat map), decomposition.py (the gap split into
ceiling, optimiser gap and reward-model gap), overoptimisation_curves.py and
overoptimisation_figure.py (the exact tables and curves, and Gao et al.'s fits; the figure).
"""
