"""One policy measured exactly against the optimum it aims at: a row of the methods study, and of
`toy-rlhf evaluate --optimal`.

Over all 10^4 responses of the evaluation prompts: J against J*, the KL from pi* and from the
method's own exact target (where that differs from pi*), the gap closed under the reward model and
under the gold reward, the gold metrics, and what a trained policy consumed.
"""
import math
from dataclasses import fields
from pathlib import Path

import torch

from toy_rlhf.checkpoint import CheckpointError, load_checkpoint, load_model
from toy_rlhf.language import sample_prompts
from toy_rlhf.methods import METHODS, method_of_stem
from toy_rlhf.metrics import samples_to_preference
from toy_rlhf.enumeration import all_response_log_probs
from toy_rlhf.optimal import (compare_to_optimum, exact_tables, expected_reward, objective, optimal_log_probs,
                              optimal_value, response_kl)
from toy_rlhf.pipeline import check_trained_from, checkpoint_preference
from toy_rlhf.reward import RewardConfig
from toy_rlhf.run import stored_tables


NO_TARGET = 'none known for this preference'  # a row's own target where the method knows none


def exact_row(label, method, config, log_pi, tables, gold_margin):
    """A policy's exact numbers against the optimum at config.beta, from its log-probs of every
    response (P, 10^4) and the shared tables (toy_rlhf.optimal.ExactTables): compare_to_optimum's
    keys, the KL from pi* and from the method's own target, and the gap closed under the gold reward
    (at the run's labeler margin, gold_margin)."""
    beta = config.beta
    optimum = optimal_log_probs(tables.log_ref, tables.rewards, beta)
    target = method.target(tables, config) if method.target is not None else optimum
    known = target is not None  # a method may know no exact target for this preference
    row = {'label': label, 'method': method.name,
           **compare_to_optimum(log_pi, tables.log_ref, tables.rewards, tables.prompts, beta, tables.preference),
           'kl_to_optimum': finite_or_none(response_kl(log_pi, optimum).mean().item()),
           'target': method.target_name(config) if known else NO_TARGET,
           'kl_to_target': finite_or_none(response_kl(log_pi, target).mean().item()) if known else None,
           'gold_gap_closed': gap_closed(log_pi, tables.log_ref, tables.gold(gold_margin), beta)}
    if method.target is not None and known:  # where the method's own target lies, for the figure
        row['target_reward'] = expected_reward(target, tables.rewards).mean().item()
        row['target_kl_total'] = response_kl(target, tables.log_ref).mean().item()
    return row


def variant_row(run, variant, tables):
    """exact_row of a variant of the run (trained, or a method's exact distribution), with what a
    trained one consumed and how long it trained."""
    if METHODS[variant.method].train is None:
        return measured_row(variant, None, None, tables, run.gold_margin)
    return measured_row(variant, run.response_log_probs(variant, tables.prompts), run.checkpoint(variant), tables,
                        run.gold_margin)


def row_job(variant, policy, checkpoint, tables, gold_margin, progress=True, threads=None):
    """variant_row from its inputs by value, for a worker (toy_rlhf.executors.start): the trained
    policy and its checkpoint's 'history' and 'metrics' (both None for a method whose policy is
    exact, best-of-n). A pure function: the same inputs give the same row in any process on the same
    thread count. progress: unused (no bars)."""
    if threads:
        torch.set_num_threads(threads)
    log_pi = None if policy is None else all_response_log_probs(policy, tables.prompts)
    return measured_row(variant, log_pi, checkpoint, tables, gold_margin)


def measured_row(variant, log_pi, checkpoint, tables, gold_margin):
    """variant_row's numbers from the policy's log-probs (P, 10^4) and its checkpoint's history and
    metrics; the method's exact policy where log_pi is None."""
    method, config = METHODS[variant.method], variant.config()
    if log_pi is None:
        return exact_row(variant.describe(), method, config, method.exact_policy(tables, config), tables, gold_margin)
    row = exact_row(variant.describe(), method, config, log_pi, tables, gold_margin)
    return {**row, **consumed(method, checkpoint['history']), 'seconds': checkpoint['metrics']['seconds']}


def finite_or_none(kl):
    """A KL as JSON can hold it: None where it is infinite (at beta = 0, pi* puts no mass where a
    policy still does); tables show that as inf."""
    return kl if math.isfinite(kl) else None


def gap_closed(log_pi, log_ref, rewards, beta):
    """(J - J_ref) / (J* - J_ref) of a policy under `rewards`: 1 at the optimum, 0 for the reference;
    None where there is no gap to close (a reward no policy can improve on the reference)."""
    J = objective(log_pi, log_ref, rewards, beta).mean().item()
    J_ref = objective(log_ref, log_ref, rewards, beta).mean().item()
    J_star = optimal_value(log_ref, rewards, beta).mean().item()
    return (J - J_ref) / (J_star - J_ref) if J_star > J_ref else None


def checkpoint_row(policy_path, reference_path, reward_path, n_prompts, seed, check_inputs=True, named=None):
    """exact_row of the policy at policy_path, by the method that made it (its settings and beta read
    from the checkpoint), over all 10^4 responses of n_prompts prompts drawn with seed: against pi* and
    the method's own target. Refuses a reference or reward model it was not trained from, unless
    check_inputs is False."""
    settings = load_checkpoint(policy_path, 'policy')['train_config']
    method = METHODS.get(settings.get('method')) or method_of_stem(Path(policy_path).stem)
    if method is None or 'beta' not in settings:
        raise CheckpointError(f'{policy_path}: not made by a training method (no method or beta stored); '
                              'run `toy-rlhf METHOD` to make one')
    if check_inputs:
        check_trained_from(policy_path, {'sft.pt': reference_path, 'reward.pt': reward_path})
    reward_settings = load_checkpoint(reward_path, 'reward')['train_config']
    preference = checkpoint_preference(reward_path, reward_settings, named, not check_inputs)
    config = method.config(**{field.name: settings[field.name] for field in fields(method.config)
                              if field.name in settings})
    prompts = sample_prompts(n_prompts, torch.Generator().manual_seed(seed))
    # Kept beside the reward model, as a Run keeps them: a second evaluation on these prompts reads them.
    tables = stored_tables(Path(reward_path).parent, reference_path, reward_path, prompts, preference,
                           lambda: exact_tables(load_model(reference_path, 'policy'), load_model(reward_path, 'reward'),
                                                prompts, preference))
    log_pi = all_response_log_probs(load_model(policy_path, 'policy'), prompts)
    return exact_row(Path(policy_path).stem, method, config, log_pi, tables,
                     reward_settings.get('gold_margin', RewardConfig.gold_margin))


def consumed(method, history):
    """What a run consumed: rollout samples (online) or labelled pairs (offline), and the samples
    until its rollout's exact preference rate first reached the target (online only)."""
    last = history[-1]
    if method.online:
        return {'samples': last['samples'], 'samples_to_target': samples_to_preference(history)}
    return {'pairs': last['pairs']}
