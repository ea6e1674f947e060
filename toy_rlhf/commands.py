"""The commands: what each one does, its flags and its run, and the table `toy-rlhf` dispatches on.

A config dataclass's fields are its command's flags (toy_rlhf.flags). One command per training
stage, one per registered method (read from the registry when the table is built, so a new method
is a new command), and one per study. toy_rlhf.cli parses, prepares and runs them.
"""
import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from toy_rlhf import pipeline
from toy_rlhf.benchmark import benchmark, format_report
from toy_rlhf.flags import add_config_flags, config_from_args
from toy_rlhf.methods import METHODS
from toy_rlhf.metrics import EVALUATION_PROMPTS
from toy_rlhf.optimal import EXACT_PROMPTS
from toy_rlhf.preferences import DEFAULT_PREFERENCE, resolve_preference
from toy_rlhf.reward import RewardConfig
from toy_rlhf.run import Run, Variant
from toy_rlhf.sft import SFTConfig
from toy_rlhf.studies.against_optimum import checkpoint_row
from toy_rlhf.studies.collapse import CollapseConfig, collapse
from toy_rlhf.studies.tau import TauConfig, tau_study
from toy_rlhf.studies.off_policy import KNOBS, STUDIED_METHODS, OffPolicyStudyConfig, off_policy
from toy_rlhf.studies.credit import CreditConfig, credit_assignment
from toy_rlhf.studies.leaderboard import LeaderboardConfig, leaderboard
from toy_rlhf.studies.main import RunAllConfig, run_from_flags
from toy_rlhf.studies.methods import CompareConfig, SweepConfig, compare, sweep
from toy_rlhf.studies.overoptimisation import OverOptConfig, overoptimisation
from toy_rlhf.tracking import TRACKERS, replay
from toy_rlhf.usage import (UsageError, check_betas, check_methods, check_preference, exact_prompts,
                            non_negative_int, positive_int, sampled_prompts, seed, working_preference)


def add_plots_dir(parser, figures):
    parser.add_argument('--plots-dir', default=None, metavar='DIR',
                        help=f"where {figures} go (default: the run's own folder, runs/RUN/plots; "
                             '--plots-dir plots rewrites the figures the README shows)')


# ---------------------------------------------------------------------------------------------
# The commands: flags and what runs. A config dataclass's fields are its command's flags.

def train_command(config_class, stage):
    """(add_arguments, run) of a command that trains one stage from the flags of config_class."""
    def run(args):
        stage(args.run_dir, config_from_args(args, config_class), args.progress)
    return (lambda parser: add_config_flags(parser, config_class)), run


def method_command(method):
    """(add_arguments, run) of the command that trains `method` (a registry entry) as a Variant of the
    run: reused if a checkpoint made with the same settings from the same inputs exists."""
    def add_arguments(parser):
        add_config_flags(parser, method.config)
        parser.add_argument('--preference', default=None, metavar='NAME',
                            help="the run's preference, its reward model's (a different one is refused); in a run "
                                 f'without a reward model, the gold the pairs are labelled by (default: {DEFAULT_PREFERENCE}). '
                                 "A preference's recipe for this method, if it has one, replaces some defaults above "
                                 '(the log names every setting); flags given still win')
        parser.add_argument('--fresh', action='store_true',
                            help='retrain even where a checkpoint made with the same settings exists')

    def run(args):
        preference = working_preference(args, 'preference', DEFAULT_PREFERENCE)
        defaults = resolve_preference(preference).method_defaults(method.name, method.config)
        variant = Variant.of(config_from_args(args, method.config, base=defaults), method.name)
        Run(args.run_dir, preference, args.fresh, args.progress).train([variant])
    return add_arguments, run


def add_all_arguments(parser):
    add_config_flags(parser, RunAllConfig)
    add_plots_dir(parser, 'the figures')


def add_sweep_arguments(parser):
    add_config_flags(parser, SweepConfig)
    add_plots_dir(parser, 'frontier.png')
    add_method_flags(parser, METHODS)


def run_sweep(args):
    config = config_from_args(args, SweepConfig)
    check_betas('--betas', config.betas)
    check_methods(config.methods)
    sweep(args.run_dir, args.plots_dir, config, method_configs(args, config.methods), args.progress)


def study_command(config_class, study, figure):
    """(add_arguments, run) of a study whose flags are config_class's and --plots-dir (for `figure`):
    study(run_dir, plots_dir, config, progress)."""
    def add_arguments(parser):
        add_config_flags(parser, config_class)
        add_plots_dir(parser, figure)

    def run(args):
        study(args.run_dir, args.plots_dir, config_from_args(args, config_class), args.progress)
    return add_arguments, run


def add_off_policy_arguments(parser):
    add_config_flags(parser, OffPolicyStudyConfig)
    add_plots_dir(parser, 'off_policy.png')


def run_off_policy(args):
    config = config_from_args(args, OffPolicyStudyConfig)
    for flag, given, known in (('--knobs', config.knobs, [entry[0] for entry in KNOBS]),
                               ('--methods', config.methods, STUDIED_METHODS)):
        unknown = [name for name in given if name not in known]
        if unknown or not given:
            raise UsageError(f'{flag}: {"unsupported " + repr(unknown[0]) if unknown else "none given"}; '
                             f'supported: {", ".join(known)}')
    check_betas('--seeds', config.seeds)
    off_policy(args.run_dir, args.plots_dir, config, args.progress)


def add_compare_arguments(parser):
    add_config_flags(parser, CompareConfig)
    add_plots_dir(parser, 'methods.png')
    add_method_flags(parser, METHODS)


def add_method_flags(parser, names):
    """--METHOD.FIELD for every setting of each named method; a study sets their beta and seed, and
    the preference is the run's (its reward model's)."""
    for name in names:
        add_config_flags(parser, METHODS[name].config, prefix=name, skip=('seed', 'beta', 'preference'))


def method_configs(args, names):
    """{name: config} of each named method, from its --METHOD.* flags."""
    return {name: config_from_args(args, METHODS[name].config, prefix=name) for name in names}


def run_compare(args):
    config = config_from_args(args, CompareConfig)
    check_betas('--betas', config.betas)
    check_methods(config.methods)
    compare(args.run_dir, args.plots_dir, config, method_configs(args, METHODS), args.progress)


def run_leaderboard(args):
    config = config_from_args(args, LeaderboardConfig)
    check_betas('--betas', config.betas)
    check_betas('--seeds', config.seeds)
    check_methods(config.methods, usable=lambda method: method.train or method.exact_policy)
    for name in config.preferences:
        check_preference(name)
    leaderboard(args.run_dir, config, args.progress)


def add_overopt_arguments(parser):
    add_config_flags(parser, OverOptConfig)
    add_plots_dir(parser, 'overoptimisation.png')
    add_method_flags(parser, [name for name, method in METHODS.items() if method.trains_online_on_a_reward_model])


def run_overopt(args):
    config = config_from_args(args, OverOptConfig)
    # The proxies learn, and are judged by, the run's preference.
    preference = working_preference(args, 'reward.preference', config.reward.preference)
    config = replace(config, reward=replace(config.reward, preference=preference))
    check_methods([config.method], usable=lambda method: method.trains_online_on_a_reward_model, flag='--method')
    for flag, values in (('--pairs', config.pairs), ('--gold-margin', config.gold_margin), ('--betas', config.betas)):
        check_betas(flag, values)
    overoptimisation(args.run_dir, args.plots_dir, config, method_configs(args, [config.method])[config.method],
                     progress=args.progress)


def add_benchmark_arguments(parser):
    parser.add_argument('--repeats', type=positive_int, default=3,
                        help='fresh runs of the whole pipeline to take medians over (default: 3)')
    parser.add_argument('--quick', action='store_true', help='benchmark the smoke-test schedule')
    parser.add_argument('--seed', type=seed, default=0, help='random seed of the runs (default: 0)')
    parser.add_argument('--json', action='store_true', help='print the figures as JSON')
    parser.add_argument('--notebook-iters', type=non_negative_int, default=0, metavar='N',
                        help="after each run, time this many iterations of the blog notebook's SFT stage "
                             "(minGPT's Trainer, gpt-nano, batch 64, learning rate 5e-4), scale them to its "
                             "5,000 and print the pipeline's time as a ratio of it; 0: off (default: 0)")


def run_benchmark(args):
    passed_on = ['--seed', str(args.seed)] + (['--threads', str(args.threads)] if args.threads else []) \
        + (['--quick'] if args.quick else [])
    result = benchmark(args.repeats, passed_on, args.notebook_iters)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def add_evaluate_arguments(parser):
    parser.add_argument('checkpoint', help='policy checkpoint to evaluate, e.g. runs/default/ppo_beta1.pt')
    parser.add_argument('--reference', default=None,
                        help='reference policy for the KL (default: sft.pt beside the checkpoint)')
    parser.add_argument('--prompts', type=sampled_prompts, default=EVALUATION_PROMPTS,
                        help=f'prompts to evaluate on (default: {EVALUATION_PROMPTS})')
    parser.add_argument('--optimal', action='store_true',
                        help="also compare with the exact optimum of the policy's objective at its own beta, "
                             'over all 10^4 responses of --optimal-prompts prompts (needs reward.pt beside the checkpoint)')
    parser.add_argument('--optimal-prompts', type=exact_prompts, default=EXACT_PROMPTS, metavar='N',
                        help=f'prompts of the comparison with the optimum (default: {EXACT_PROMPTS})')
    parser.add_argument('--other-inputs', action='store_true',
                        help='measure against a reference (or reward model) other than the one the policy was '
                             'trained from (default: refused, by the fingerprints stored in the policy)')
    parser.add_argument('--preference', default=argparse.SUPPRESS, metavar='NAME',
                        help='the preference the policy was trained for, needed only for a user-defined one '
                             '(module:function): a module named in a checkpoint is imported only when you name it')
    parser.add_argument('--seed', type=seed, default=0, help='seed of the evaluation prompts (default: 0)')
    parser.add_argument('--json', action='store_true', help='print the metrics as JSON')


def evaluate(args):
    path = Path(args.checkpoint)
    reference = Path(args.reference) if args.reference else path.parent / 'sft.pt'
    check = not args.other_inputs
    named = getattr(args, 'preference', None)
    metrics = pipeline.evaluate_checkpoint(path, reference, args.prompts, args.seed, check, named)
    if args.optimal:
        optimum = checkpoint_row(path, reference, path.parent / 'reward.pt', args.optimal_prompts, args.seed,
                                 check, named)
        metrics.update({f'optimum/{name}': value for name, value in optimum.items()})
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
        return
    print(f'{path} against {reference}, {args.prompts} prompts (seed {args.seed}):')
    for name, value in metrics.items():
        shown = ' '.join(f'{item:.4f}' for item in value) if isinstance(value, list) \
            else 'n/a' if value is None else value if isinstance(value, str) else f'{value:.4f}'
        print(f'  {name:<32} {shown}')


def add_track_arguments(parser):
    parser.add_argument('run_folder', metavar='RUN_DIR', help='a run folder, e.g. runs/default (any folder a command '
                        'wrote into, with --run or --run-dir); every NAME.jsonl log beside its checkpoint NAME.pt is replayed')
    parser.add_argument('--to', choices=TRACKERS, default='tensorboard',
                        help='the tracker: tensorboard, wandb (offline unless WANDB_MODE says otherwise; WANDB_PROJECT '
                             'names the project, default toy-rlhf) or trackio; each an optional extra, pip install -e '
                             '".[tensorboard]" (default: tensorboard)')
    parser.add_argument('--logdir', default=None, metavar='DIR',
                        help='where the tracker writes: tensorboard into DIR (default: RUN_DIR/tensorboard; a replay '
                             "replaces a stage's earlier one there), wandb into DIR/wandb (default DIR: RUN_DIR); "
                             'trackio keeps its own store')


def run_track(args):
    replay(args.run_folder, args.to, args.logdir)


@dataclass(frozen=True)
class Command:
    script: str  # its thin entry point in scripts/
    summary: str  # one line, for `toy-rlhf --help`
    description: str  # what it reads and writes, for its own --help
    add_arguments: Callable
    run: Callable
    writes_run_dir: bool = True
    default_run: str = 'default'  # the run folder's name when --run is not given (runs/RUN)


def commands():
    """{name: Command}: the fixed commands, and one per registered training method (read from the
    registry when called, so a new method is a new command)."""
    table = {
        'sft': Command('train_sft.py', 'supervised fine-tuning: teach a GPT the digit language',
                       'Writes runs/RUN/sft.pt and sft.jsonl.', *train_command(SFTConfig, pipeline.sft_stage)),
        'reward': Command('train_reward.py', 'train the reward model on labelled preference pairs',
                          'Starts from the SFT policy; needs runs/RUN/sft.pt; writes runs/RUN/reward.pt and reward.jsonl.',
                          *train_command(RewardConfig, pipeline.reward_stage)),
    }
    for method in METHODS.values():
        if method.train is not None:
            needs = 'sft.pt and reward.pt' if method.needs_reward_model else 'sft.pt'
            table[method.name] = Command(f'train_{method.name}.py', method.summary,
                                         f'Needs runs/RUN/{needs}; writes runs/RUN/{method.name}_beta<B>.pt and .jsonl '
                                         '(with _seed<S> and a hash of other non-default settings in the name).',
                                         *method_command(method))
    table.update(study_commands())
    table.update({
        'benchmark': Command('benchmark.py', 'time the default pipeline over fresh runs',
                             'Median seconds and samples per second per stage, peak memory, and the quality '
                             'figures of the same runs, in a temporary folder.', add_benchmark_arguments,
                             run_benchmark, writes_run_dir=False),
        'evaluate': Command('evaluate.py', 'exact gold metrics of a policy checkpoint',
                            'Preference rate, fidelity, gold rate, KL to the reference and to the aligned language; '
                            '--optimal adds the gap to the exact optimum.', add_evaluate_arguments, evaluate,
                            writes_run_dir=False),
        'track': Command('track.py', "replay a run's logs into TensorBoard or wandb",
                         "Every stage's .jsonl log, row by row, with the settings stored in its checkpoint; the logs "
                         'stay the source of truth, the tracker gets a copy (toy_rlhf.tracking says what goes where).',
                         add_track_arguments, run_track, writes_run_dir=False),
    })
    return table


def study_commands():
    """{name: Command} of the studies, each from the run's SFT policy and reward model (or its own)."""
    return {
        'all': Command('run_all.py', 'the whole pipeline: SFT, reward model, PPO per beta, figures, report',
                       'Exact evaluation, the figures and runs/RUN/report.md. Stages whose checkpoints were made '
                       'with the same settings are reused; --sft.*, --reward.* and --ppo.* set any stage setting.',
                       add_all_arguments, run_from_flags),
        'sweep': Command('sweep_beta.py', 'PPO and DPO (or any methods) at several betas against the exact optimum',
                         "From the run's SFT policy and reward model; each policy evaluated exactly over all 10^4 "
                         'responses; draws frontier.png, writes runs/RUN/sweep.md.', add_sweep_arguments, run_sweep),
        'compare': Command('compare_methods.py', 'every registered method against pi* and its own exact target',
                           "From the run's SFT policy and reward model; draws methods.png, writes runs/RUN/methods.md; "
                           '--METHOD.* set any method setting.', add_compare_arguments, run_compare),
        'credit': Command('credit_assignment.py', 'credit assignment: PPO with a baseline or a critic, RLOO, GRPO',
                          "From the run's SFT policy and reward model, every variant on every seed, measured exactly every "
                          'few rounds: samples to the target rate, gap closed, KL per position; draws '
                          'credit_assignment.png, writes runs/RUN/credit_assignment.md and .json.',
                          *study_command(CreditConfig, credit_assignment, 'credit_assignment.png')),
        'collapse': Command('collapse.py', 'the collapse and the ceiling: sampled methods against exact-optimiser paths',
                            "From the run's SFT policy and reward model: mass on the top response, response entropy and "
                            'the KL beyond what pi* pays, against rounds, for each method and each exact path; the '
                            'ceiling (the best exact path) and each method\'s optimiser gap; draws collapse.png, writes '
                            'runs/RUN/collapse.md and .json.', *study_command(CollapseConfig, collapse, 'collapse.png')),
        'tau': Command('tau_vs_beta.py', "the preference game's equilibrium pi_tau against pi*: tau is not beta",
                       "From the run's SFT policy and reward model: pi*_beta and pi_tau over one grid of strengths (KL to "
                       'the reference, score, preference rate), and Nash-MD trained at its default tau placed between '
                       'them; draws tau.png, writes runs/RUN/tau.md and .json.', *study_command(TauConfig, tau_study, 'tau.png')),
        'leaderboard': Command('leaderboard.py', 'every method on every preference over seeds, measured exactly',
                               'An SFT policy per seed, a reward model per preference and seed, every method that trains '
                               'or has an exact policy at each beta; checkpoints and measured rows reused; writes '
                               'runs/RUN/leaderboard.md, .json and .png (RUN: leaderboard), and decomposition.png: the gap '
                               "split by the exact optimiser's checkpoints found in each cell's folder (the ceiling).",
                               lambda parser: add_config_flags(parser, LeaderboardConfig), run_leaderboard,
                               default_run='leaderboard'),
        'off-policy': Command('off_policy.py', 'PPO, RLOO and GRPO (and the other sampling methods) off-policy on '
                              'purpose: ratio variants and sampler corrections against each one\'s target',
                              "From the run's SFT policy and reward model (an empty folder gets the default ones), each "
                              "method on every seed as epochs, staleness and the sampler's temperature grow, each "
                              'policy measured exactly; checkpoints reused; draws off_policy.png, writes '
                              'runs/RUN/off_policy.md and .json (RUN: off_policy).', add_off_policy_arguments,
                              run_off_policy, default_run='off_policy'),
        'overopt': Command('overoptimisation.py', 'reward over-optimisation: proxy against gold along sqrt(KL), exactly',
                           "Proxy reward models on --pairs labelled pairs (and --gold-margin label noise) from the run's "
                           'SFT policy; pi*_beta, best-of-n and snapshots of an online method (--method, PPO by default) '
                           "evaluated exactly; Gao et al.'s forms fitted; draws overoptimisation.png, writes "
                           'runs/RUN/overoptimisation.md and .json.',
                           add_overopt_arguments, run_overopt),
    }
