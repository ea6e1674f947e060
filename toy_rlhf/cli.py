"""Command-line interface: `toy-rlhf <command>` and the thin scripts in scripts/ share these parsers.

Every failure a user can cause (a bad flag, a missing or broken checkpoint, an unwritable run folder,
a NaN during training) ends with one line on stderr and exit status 2, never a traceback.
"""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from toy_rlhf import pipeline
from toy_rlhf.benchmark import benchmark, format_report
from toy_rlhf.checkpoint import CheckpointError
from toy_rlhf.run_all import RunAllConfig, run_all
from toy_rlhf.sweep import SweepConfig, compare_critic, sweep
from toy_rlhf.training import TrainingError


class UsageError(Exception):
    """A bad setting that argparse cannot see (an unavailable device, an unwritable folder)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), exit status 2."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def number_type(kind, accepts, description):
    """An argparse type: text parsed as `kind` (int or float), finite, and accepted by `accepts`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {description}, got {text!r}') from None
        if value != value or abs(value) == float('inf') or not accepts(value):
            raise argparse.ArgumentTypeError(f'must be {description}, got {text}')
        return value
    return parse


positive_int = number_type(int, lambda value: value > 0, 'a positive integer')
positive_float = number_type(float, lambda value: value > 0, 'a positive number')
non_negative_float = number_type(float, lambda value: value >= 0, 'a number >= 0')
at_least_two = number_type(int, lambda value: value >= 2, 'an integer >= 2')
unit_interval = number_type(float, lambda value: 0 <= value <= 1, 'a number between 0 and 1')
digit = number_type(int, lambda value: 0 <= value <= 9, 'a digit 0-9')
seed = number_type(int, lambda value: 0 <= value < 2 ** 32, 'an integer from 0 to 2^32 - 1')


def add_common_arguments(parser, with_run):
    if with_run:
        parser.add_argument('--run', default='default', metavar='NAME',
                            help='run name: checkpoints and logs go to runs/NAME (default: default)')
    parser.add_argument('--seed', type=seed, default=0, help='random seed; same seed, same numbers (default: 0)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='CPU threads for torch (default: all cores torch sees)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def _add_device(parser):
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='cpu',
                        help='where SFT and the reward model train; auto picks cuda when available '
                             '(default: cpu, fastest for models this small; PPO and evaluation run on the CPU)')


def _flag(parser, name, config, field, kind, help_text, **extra):
    """A flag whose default and destination are a config dataclass field."""
    default = getattr(config, field)
    parser.add_argument(name, dest=field, type=kind, default=default, metavar=name.lstrip('-').upper(),
                        help=f'{help_text} (default: {default})', **extra)


def add_sft_arguments(parser):
    config = pipeline.SFTConfig()
    _flag(parser, '--iters', config, 'iters', positive_int, 'optimizer steps')
    _flag(parser, '--batch-size', config, 'batch_size', positive_int, 'sentences per step')
    _flag(parser, '--lr', config, 'learning_rate', positive_float, 'peak learning rate, cosine-decayed to 0')
    _add_model_type(parser, config)
    _add_device(parser)


def add_reward_arguments(parser):
    config = pipeline.RewardConfig()
    _add_preference_training(parser, config)
    _add_device(parser)


def _add_preference_training(parser, config):
    """The flags of a stage that trains on labelled pairs (reward model, DPO)."""
    _flag(parser, '--pairs', config, 'pairs', positive_int, 'labelled preference pairs to train on')
    _flag(parser, '--iters', config, 'iters', positive_int, 'optimizer steps')
    _flag(parser, '--batch-size', config, 'batch_size', positive_int, 'pairs per step')
    _flag(parser, '--lr', config, 'learning_rate', positive_float, 'peak learning rate, cosine-decayed to 0')
    _flag(parser, '--gold-margin', config, 'gold_margin', positive_float,
          'gold reward of the preferred first digit; the labeler picks a response with probability '
          'sigmoid(reward difference), so smaller means noisier labels')


def add_ppo_arguments(parser):
    config = pipeline.PPOConfig()
    _flag(parser, '--beta', config, 'beta', non_negative_float,
          'KL penalty strength; 0 removes the leash to the SFT model')
    _flag(parser, '--iters', config, 'iters', positive_int, 'rollout-and-update iterations')
    _flag(parser, '--prompts', config, 'prompts_per_iter', positive_int, 'prompts per rollout')
    _flag(parser, '--samples-per-prompt', config, 'samples_per_prompt', at_least_two,
          'responses per prompt (each is baselined by the others)')
    _flag(parser, '--epochs', config, 'epochs', positive_int, 'passes of the PPO update over a rollout')
    _flag(parser, '--minibatches', config, 'minibatches', positive_int, 'minibatches per epoch')
    _flag(parser, '--lr', config, 'learning_rate', positive_float, 'Adam learning rate')
    _flag(parser, '--clip', config, 'clip_epsilon', positive_float, 'PPO ratio clip epsilon')
    parser.add_argument('--critic', action='store_true',
                        help='learn a value function and use GAE instead of the leave-one-out baseline')
    _flag(parser, '--gae-lambda', config, 'gae_lambda', unit_interval, 'GAE lambda (with --critic)')


def add_dpo_arguments(parser):
    config = pipeline.DPOConfig()
    _flag(parser, '--beta', config, 'beta', positive_float, 'KL strength of the objective DPO solves')
    _add_preference_training(parser, config)


def add_evaluate_arguments(parser):
    parser.add_argument('checkpoint', help='policy checkpoint to evaluate, e.g. runs/default/ppo_beta1.pt')
    parser.add_argument('--reference', default=None,
                        help='reference policy for the KL (default: sft.pt beside the checkpoint)')
    parser.add_argument('--prompts', type=positive_int, default=pipeline.EVALUATION_PROMPTS,
                        help=f'prompts to evaluate on (default: {pipeline.EVALUATION_PROMPTS})')
    parser.add_argument('--optimal', type=positive_int, nargs='?', const=100, default=None, metavar='N',
                        help="also compare with the exact optimum of the policy's objective at its own beta, "
                             'over all 10^4 responses of N prompts (default N: 100; needs reward.pt '
                             'beside the checkpoint)')
    parser.add_argument('--json', action='store_true', help='print the metrics as JSON')


def add_all_arguments(parser):
    parser.add_argument('--betas', type=non_negative_float, nargs='+', default=[1.0, 0.0], metavar='BETA',
                        help='KL strengths to compare; the first is the aligned one (default: 1 0)')
    parser.add_argument('--plots-dir', default='plots', metavar='DIR',
                        help='where the figures go (default: plots)')
    parser.add_argument('--fresh', action='store_true',
                        help='retrain every stage even if its checkpoint was made with the same settings')
    parser.add_argument('--quick', action='store_true', help='a much smaller schedule, for smoke tests')
    parser.add_argument('--prompt', type=digit, nargs=4, default=[5, 7, 1, 5], metavar='D',
                        help='prompt of the per-sentence figures (default: 5 7 1 5)')
    parser.add_argument('--response', type=digit, nargs=4, default=[6, 2, 7, 3], metavar='D',
                        help='response of the per-sentence figures (default: 6 2 7 3)')
    _add_device(parser)


def run_everything(args):
    if len(set(args.betas)) != len(args.betas):
        raise UsageError(f'--betas: each beta once, got {" ".join(f"{b:g}" for b in args.betas)}')
    _check_writable(Path(args.plots_dir))
    config = RunAllConfig(betas=tuple(args.betas), seed=args.seed, quick=args.quick, fresh=args.fresh,
                          prompt=tuple(args.prompt), response=tuple(args.response), device=args.device)
    run_all(args.run_dir, args.plots_dir, config, args.progress)


def add_sweep_arguments(parser):
    config = SweepConfig()
    parser.add_argument('--betas', type=non_negative_float, nargs='+', default=list(config.betas), metavar='BETA',
                        help=f"PPO betas (default: {' '.join(f'{b:g}' for b in config.betas)})")
    parser.add_argument('--dpo-betas', type=non_negative_float, nargs='*', default=list(config.dpo_betas),
                        metavar='BETA', help=f"DPO betas, none to skip DPO (default: "
                                             f"{' '.join(f'{b:g}' for b in config.dpo_betas)})")
    parser.add_argument('--prompts', type=positive_int, default=config.prompts,
                        help=f'prompts of the exact evaluation, all 10^4 responses each (default: {config.prompts})')
    parser.add_argument('--plots-dir', default='plots', metavar='DIR', help='where frontier.png goes (default: plots)')
    parser.add_argument('--fresh', action='store_true', help='retrain policies whose checkpoints are current')
    parser.add_argument('--critic-seeds', type=seed, nargs='*', default=[], metavar='SEED',
                        help='also compare PPO with and without --critic on these seeds and draw '
                             'ppo_variants.png (default: none)')


def run_sweep(args):
    if any(beta == 0 for beta in args.dpo_betas):
        raise UsageError('--dpo-betas: DPO needs beta > 0')
    _check_writable(Path(args.plots_dir))
    config = SweepConfig(betas=tuple(args.betas), dpo_betas=tuple(args.dpo_betas), prompts=args.prompts,
                         seed=args.seed, fresh=args.fresh)
    sweep(args.run_dir, args.plots_dir, config, args.progress)
    if args.critic_seeds:
        compare_critic(args.run_dir, Path(args.plots_dir), tuple(args.critic_seeds), progress=args.progress)


def add_benchmark_arguments(parser):
    parser.add_argument('--repeats', type=positive_int, default=3,
                        help='fresh runs of the whole pipeline to take medians over (default: 3)')
    parser.add_argument('--quick', action='store_true', help='benchmark the smoke-test schedule')
    parser.add_argument('--json', action='store_true', help='print the figures as JSON')


def run_benchmark(args):
    passed_on = ['--seed', str(args.seed)] + (['--threads', str(args.threads)] if args.threads else []) \
        + (['--quick'] if args.quick else [])
    result = benchmark(args.repeats, passed_on)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def _add_model_type(parser, config):
    parser.add_argument('--model-type', dest='model_type', choices=('gpt-nano', 'gpt-micro', 'gpt-mini'),
                        default=config.model_type, help=f'model size (default: {config.model_type})')


def config_from(args, config_class):
    """A config dataclass filled from the parsed flags of the same names (the rest defaults)."""
    names = {field.name for field in fields(config_class)}
    return config_class(**{name: value for name, value in vars(args).items() if name in names})


def evaluate(args):
    path = Path(args.checkpoint)
    reference = Path(args.reference) if args.reference else path.parent / 'sft.pt'
    metrics = pipeline.evaluate_checkpoint(path, reference, args.prompts, args.seed)
    if args.optimal:
        optimum = pipeline.optimum_gap(path, reference, path.parent / 'reward.pt', args.optimal, args.seed)
        metrics.update({f'optimum/{name}': value for name, value in optimum.items()})
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
        return
    print(f'{path} against {reference}, {args.prompts} prompts (seed {args.seed}):')
    for name, value in metrics.items():
        print(f'  {name:<32} {value:.4f}')


WRITES_RUN_DIR = {'sft', 'reward', 'ppo', 'dpo', 'all', 'sweep'}
COMMANDS = {
    # name: (script, description, add_arguments, run)
    'sft': ('train_sft.py', 'Supervised fine-tuning: teach a GPT the digit language; writes '
            'runs/RUN/sft.pt and sft.jsonl.', add_sft_arguments,
            lambda args: pipeline.sft_stage(args.run_dir, config_from(args, pipeline.SFTConfig), args.progress)),
    'reward': ('train_reward.py', 'Train the reward model on labelled preference pairs, starting from '
               'the SFT policy; needs runs/RUN/sft.pt; writes runs/RUN/reward.pt and reward.jsonl.',
               add_reward_arguments,
               lambda args: pipeline.reward_stage(args.run_dir, config_from(args, pipeline.RewardConfig),
                                                  args.progress)),
    'ppo': ('train_ppo.py', 'Fine-tune the SFT policy against the reward model with PPO and a KL penalty '
            'of strength beta; needs runs/RUN/sft.pt and reward.pt; writes runs/RUN/ppo_beta<B>.pt and '
            '.jsonl.', add_ppo_arguments,
            lambda args: pipeline.ppo_stage(args.run_dir, config_from(args, pipeline.PPOConfig), args.progress)),
    'dpo': ('train_dpo.py', 'Direct preference optimisation: fine-tune the SFT policy on the labelled '
            'pairs themselves, no reward model; needs runs/RUN/sft.pt; writes runs/RUN/dpo_beta<B>.pt '
            'and .jsonl.', add_dpo_arguments,
            lambda args: pipeline.dpo_stage(args.run_dir, config_from(args, pipeline.DPOConfig), args.progress)),
    'all': ('run_all.py', 'The whole pipeline: SFT, reward model, PPO for each beta, exact evaluation, '
            'six figures and runs/RUN/report.md. Stages whose checkpoints were made with the same '
            'settings are reused.', add_all_arguments, run_everything),
    'sweep': ('sweep_beta.py', 'Train PPO for several betas (and DPO) from the run\'s SFT policy and '
              'reward model, evaluate each exactly against the closed-form optimum over all 10^4 '
              'responses, draw frontier.png, write runs/RUN/sweep.md.', add_sweep_arguments, run_sweep),
    'benchmark': ('benchmark.py', 'Time the default pipeline over several fresh runs in a temporary '
                  'folder: median seconds and samples per second per stage, peak memory, and the '
                  'quality figures of the same runs.', add_benchmark_arguments, run_benchmark),
    'evaluate': ('evaluate.py', 'Exact gold metrics of a policy checkpoint: preference rate, '
                 'fidelity, gold rate, KL to the reference and to the aligned language.',
                 add_evaluate_arguments, evaluate),
}


def build_parser(command, prog):
    _, description, add_arguments, _ = COMMANDS[command]
    parser = Parser(prog=prog, description=description)
    add_common_arguments(parser, with_run=command in WRITES_RUN_DIR)
    add_arguments(parser)
    return parser


def prepare(command, args):
    """Check the settings argparse cannot check, and set up torch accordingly."""
    if getattr(args, 'device', None) == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if getattr(args, 'device', None) == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda: no CUDA device is available here; use --device cpu')
    if args.threads:
        torch.set_num_threads(args.threads)
    if command in WRITES_RUN_DIR:
        args.run_dir = Path('runs') / args.run
        _check_writable(args.run_dir)
    args.progress = not args.quiet


def _check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / '.write-test'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as error:
        raise UsageError(f'cannot write to folder {folder}: {error.strerror}') from None


def run_command(command, argv=None, prog=None):
    """Parse argv for `command`, run it, and turn every user-caused failure into one line, exit 2."""
    script = COMMANDS[command][0]
    parser = build_parser(command, prog or f'scripts/{script}')
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each stage's summary line shows up as it finishes
    try:
        prepare(command, args)
        COMMANDS[command][3](args)
    except (UsageError, CheckpointError, TrainingError) as error:
        print(f'{parser.prog}: error: {error}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'{parser.prog}: interrupted; finished checkpoints are kept, nothing half-written',
              file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    """`toy-rlhf COMMAND [options]`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = ', '.join(COMMANDS)
        print(f'usage: toy-rlhf {{{names}}} [options]  (toy-rlhf COMMAND --help for its options)',
              file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ('-h', '--help') else 2)
    run_command(argv[0], argv[1:], prog=f'toy-rlhf {argv[0]}')
