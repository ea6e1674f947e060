"""The registry of training methods: each method is one module here plus one entry below.

Everything that runs, names, evaluates or draws a method (the stages, `run_all`, the sweep, the
comparison, the credit study, the benchmark, the figures, checkpoint names and the command line)
reads this registry; nothing else names a method. To add one: write its module (a config dataclass
whose fields are its flags, its math as pure functions, one `train` function) and register it here.

The contract a method keeps, so that every study shows it with no other edit:
- `train(sft_policy, config=..., preference=..., progress=..., [reward_model=...], [measure=...])`
  returns (policy, history), history a list of dicts of numbers, one per round or logged step;
  `preference` is the run's (a toy_rlhf.preferences.Preference: its gold reward labels the pairs
  and is what the log's gold rate follows), never a setting of the method;
- an online method (`online=True`) samples its own responses, takes `measure`, calls
  measure(rounds done, policy) after every round and adds what it returns to that round's row, and
  logs the rollout's metrics of `rollout.rollout_row` (ONLINE_LOG below) in every row;
- an offline method logs how many labelled pairs it has used as 'pairs';
- its config has a `beta`, and a `seed` if it draws random numbers.
"""
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from toy_rlhf.methods import (best_of_n, distill, dpo, entropy, exact, grpo, ipo, kto, nash_md, online_dpo, ppo,
                             reinforce_pp, rloo, sppo)


@dataclass(frozen=True)
class Method:
    name: str  # registry key, command name (`toy-rlhf NAME`), checkpoint stem (NAME_beta1.pt)
    label: str  # in tables, legends and reports
    summary: str  # one line: what it does, for --help and the README
    config: type  # its settings, a dataclass with a `beta` (and a `seed` if it samples): every field is a flag
    # train(sft_policy, config=..., preference=..., progress=..., [reward_model=...]) -> (policy, history). None for a
    # method that trains nothing (best-of-n): it gives its exact distribution through `exact_policy`.
    train: Optional[Callable]
    needs_reward_model: bool  # False: it learns from the labelled pairs, or from nothing
    color: str  # matplotlib colour, the same in every figure
    marker: str  # matplotlib marker of its point on the frontier
    # target(tables, config) -> log-probs (P, 10^4) of the exact distribution the method converges to
    # (toy_rlhf.optimal.ExactTables), or None where none is known for the tables' preference; no
    # target function: pi* of the reward model at config.beta.
    target: Optional[Callable] = None
    target_label: str = 'pi* (reward model)'
    # exact_policy(tables, config) -> log-probs (P, 10^4) of a method without a network.
    exact_policy: Optional[Callable] = None
    online: bool = True  # samples its own responses (learning curves against samples, not pairs)
    # Named settings worth a row of their own where a study compares variants of methods (the credit
    # study trains each): (label, ((field, value), ...), colour) triples.
    presets: tuple = ()
    # A short schedule that already learns, in a few seconds: ((field, value), ...) over the defaults.
    # The tests train every method with it (tests/test_every_method.py).
    quick: tuple = ()
    # A yardstick rather than a method people train (the exact optimiser): the studies that compare or
    # rank methods leave it out unless named (--methods); the collapse study measures against it.
    reference: bool = False

    @property
    def trains_online_on_a_reward_model(self):
        """It trains, sampling its own responses (so it takes `measure`), against a reward model: what
        the credit and over-optimisation studies train."""
        return self.online and self.train is not None and self.needs_reward_model

    def target_name(self, config):
        """What target(tables, config) is, in words: target_label, or the entropy-regularised optimum
        where config's entropy bonus moves the target (entropy.py)."""
        return entropy.target_name(config) or self.target_label

    def stem(self, config):
        """The checkpoint file stem of a run with `config` (one of self.config): ppo_beta1 with the
        method's default settings, ppo_beta1_seed2 on another seed, and a short hash of the other
        settings that differ (ppo_beta1_seed2_3f2a9c1d), so that two runs with different settings
        never share a file."""
        defaults = self.config(beta=config.beta)
        differ = {name: value for name, value in asdict(config).items()
                  if name != 'seed' and getattr(defaults, name) != value}
        seed = getattr(config, 'seed', None)
        stem = f'{self.name}_beta{config.beta:g}'
        if seed != getattr(defaults, 'seed', None):
            stem += f'_seed{seed}'
        if differ:
            stem += '_' + hashlib.sha256(json.dumps(differ, sort_keys=True).encode()).hexdigest()[:8]
        return stem


METHODS = {}
# What every row of an online method's history holds (rollout.rollout_row): the studies read these.
ONLINE_LOG = ('samples', 'objective/scores', 'objective/kl', 'objective/rlhf_reward', 'gold/preference_rate')


def register(method):
    """Add a method to the registry (a test registers a dummy one this way); returns it."""
    if method.name in METHODS:
        raise ValueError(f'a method named {method.name!r} is already registered')
    METHODS[method.name] = method
    return method


def unregister(name):
    METHODS.pop(name)


def method_of_stem(stem):
    """The method whose checkpoints are named like `stem` (ppo_beta1 -> PPO), or None."""
    name, separator, _ = stem.rpartition('_beta')
    return METHODS.get(name) if separator else None


register(Method(
    name='ppo', label='PPO', config=ppo.PPOConfig, train=ppo.train_ppo, needs_reward_model=True,
    summary='PPO with a per-token KL penalty in the reward, leave-one-out baseline (or --critic)',
    color='#2ca02c', marker='o', target=entropy.with_entropy_bonus(None),
    presets=(('PPO, critic, GAE lambda 0.95', (('critic', True), ('gae_lambda', 0.95)), '#1f77b4'),
             ('PPO, critic, GAE lambda 1', (('critic', True), ('gae_lambda', 1.0)), '#17becf')),
    # A constant step in the quick schedule: 25 rounds annealed travel less far (from the tests' SFT
    # policy, KL to it at beta=0 1.38 nats against 1.77, at beta=1 1.23 against 1.28; seed 0), too
    # little to tell apart where the objectives pull (the tests of beta 0's drift and the entropy tax).
    quick=(('iters', 25), ('prompts_per_iter', 64), ('anneal_lr', False))))
register(Method(
    name='dpo', label='DPO', config=dpo.DPOConfig, train=dpo.train_dpo, needs_reward_model=False,
    summary='direct preference optimisation on the labelled pairs, no reward model',
    color='#1f77b4', marker='s', target=dpo.gold_optimum, target_label='pi* (gold reward)', online=False,
    quick=(('iters', 100), ('pairs', 4000))))
register(Method(
    name='rloo', label='RLOO', config=rloo.RLOOConfig, train=rloo.train_rloo, needs_reward_model=True,
    summary='REINFORCE with a leave-one-out baseline, the KL in the sequence reward, the sequence ratio clipped',
    color='#9467bd', marker='D', target=entropy.with_entropy_bonus(None),
    quick=(('iters', 12),)))
register(Method(
    name='reinforce_pp', label='REINFORCE++', config=reinforce_pp.ReinforcePPConfig,
    train=reinforce_pp.train_reinforce_pp, needs_reward_model=True,
    summary='PPO without a baseline: per-token KL-penalised returns whitened over the batch, clipped per token',
    color='#8c564b', marker='v',
    quick=(('iters', 12),)))
register(Method(
    name='grpo', label='GRPO', config=grpo.GRPOConfig, train=grpo.train_grpo, needs_reward_model=True,
    summary='GRPO as TRL ships it: group-normalised advantages, k3 KL in the loss (--scale-rewards, --kl: the fixes)',
    color='#d62728', marker='^', target=entropy.with_entropy_bonus(grpo.fixed_point, closed_form=False),
    target_label="GRPO's fixed point",
    # The two fixes that bring its fixed point back to pi*: no division by the group's std (Dr. GRPO)
    # and the k3 term multiplied by the ratio to the rollout policy (DeepSeek-V3.2).
    presets=(('GRPO, unscaled + bias-corrected k3', (('scale_rewards', 'none'), ('kl', 'bias-corrected-k3')),
              '#e377c2'),),
    quick=(('iters', 20), ('prompts_per_iter', 64))))
register(Method(
    name='online_dpo', label='online DPO', config=online_dpo.OnlineDPOConfig, train=online_dpo.train_online_dpo,
    needs_reward_model=True,
    summary='DPO on pairs the current policy samples, labelled by the reward model (Bradley-Terry or --labels hard)',
    color='#17becf', marker='P',
    # A constant step, as PPO's quick schedule: 15 rounds annealed raise the tests' preference rate
    # from 0.30 to 0.61, constant to 0.83-0.85.
    quick=(('iters', 15), ('prompts_per_iter', 64), ('anneal_lr', False))))
register(Method(
    name='ipo', label='IPO', config=ipo.IPOConfig, train=ipo.train_ipo, needs_reward_model=False,
    summary='identity preference optimisation: a squared loss on the labelled pairs, with a finite optimum',
    color='#bcbd22', marker='X', target=ipo.ipo_target, target_label='pi_IPO (gold labels)', online=False,
    quick=(('beta', 0.25), ('iters', 100), ('pairs', 4000))))
register(Method(
    name='best_of_n', label='Best-of-n', config=best_of_n.BestOfNConfig, train=None, needs_reward_model=True,
    summary='the best of n reference samples under the reward model, exact by enumeration (no training)',
    color='#ff7f0e', marker='*', exact_policy=best_of_n.exact_policy, online=False))
register(Method(
    name='exact', label='exact optimiser', config=exact.ExactConfig, train=exact.train_exact, needs_reward_model=True,
    summary='a reference, not a method: exact gradients of the exact objective over all 10^4 responses, nothing sampled',
    color='#7f7f7f', marker='h', online=False, reference=True,
    quick=(('iters', 15), ('prompts_per_iter', 2), ('prompt_pool', 4), ('learning_rate', 3e-3))))
register(Method(
    name='distill', label='On-policy distillation', config=distill.DistillConfig, train=distill.train_distill,
    needs_reward_model=True,
    summary='the student samples, the loss is the per-token KL to an exact teacher (pi* or best-of-n: BOND)',
    color='#c49c94', marker='p', target=distill.target, target_label='the exact teacher',
    quick=(('iters', 3), ('prompts_per_iter', 4), ('samples_per_prompt', 16))))
register(Method(
    name='kto', label='KTO', config=kto.KTOConfig, train=kto.train_kto, needs_reward_model=False,
    summary="Kahneman-Tversky optimisation on the pairs taken apart (chosen desirable, rejected not), TRL's defaults",
    color='#aec7e8', marker='d', target=kto.target, target_label='none known', online=False,
    quick=(('iters', 100), ('pairs', 4000))))
register(Method(
    name='nash_md', label='Nash-MD', config=nash_md.NashMDConfig, train=nash_md.train_nash_md, needs_reward_model=True,
    summary="Nash-MD as TRL's: the policy's response against one from its geometric mixture with the reference, BT-judged",
    color='#393b79', marker='>', target=nash_md.target, target_label='pi_tau (Nash equilibrium)',
    quick=(('iters', 20), ('prompts_per_iter', 64), ('learning_rate', 1e-3))))
register(Method(
    name='sppo', label='SPPO', config=sppo.SPPOConfig, train=sppo.train_sppo, needs_reward_model=True,
    summary='self-play preference optimisation: each iterate regressed on multiplicative weights of BT win rates',
    color='#637939', marker='<', target=sppo.target, target_label='the exact multiplicative-weights iterate',
    # Four rounds per iterate fit each iterate from the tests' SFT policy (sampled targets, 250 steps)
    # only at the larger step (tests/test_nash.py).
    quick=(('iters', 12), ('rounds_per_iterate', 4), ('learning_rate', 1e-3))))
