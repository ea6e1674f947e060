"""Metrics to a tracker: a run folder's .jsonl logs replayed into TensorBoard, wandb or trackio.

    replay('runs/default', 'tensorboard')    # -> runs/default/tensorboard/sft, .../ppo_beta1, ...

The .jsonl logs stay the single source of truth: a tracker only ever gets a replay of them, read from
the files after training (`toy-rlhf track RUN_DIR`, or `--track` at the end of a command). So training
never waits on a tracker, and a run trained elsewhere (a cluster's workers) is tracked the same way.

A stage is a log NAME.jsonl with its checkpoint NAME.pt beside it, in the run folder or below it (the
leaderboard keeps its cells in seed<S>/<preference>/); a replay gives each stage
- a tracker run of its own, named by its path in the run folder (ppo_beta1, seed0/first-digit/dpo_beta1);
- the settings stored in its checkpoint (its config, preference, method, the fingerprints of its
  inputs, the library versions) as the run's config; TensorBoard: a text table 'settings';
- every numeric value of every row as a scalar under the row's own key (loss, objective/kl, ...), at
  step = the row's 'samples' where it has one (an online method's responses sampled so far: the x axis
  of the project's learning curves, on which methods that sample differently per round line up by
  cost), else its 'iter' (SFT, the reward model, offline methods), else its index.

The trackers are optional extras, imported only here and only when asked; a missing one is one line
naming its extra. wandb runs offline (in RUN/wandb, `wandb sync` uploads them) unless WANDB_MODE says
otherwise, so no default ever asks for a login; trackio takes the same calls (`import trackio as wandb`)
and keeps its own store.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from toy_rlhf.checkpoint import load_checkpoint

TRACKERS = ('tensorboard', 'wandb', 'trackio')
EXTRA = 'pip install -e ".[{}]"'


class TrackingError(Exception):
    """A replay that cannot be made (no such run folder, a broken log, a tracker not installed); one line."""


@dataclass(frozen=True)
class Stage:
    name: str  # its path in the run folder, without the suffix: sft, seed0/first-digit/ppo_beta1
    settings: dict  # stored in its checkpoint (train_config)
    rows: list  # its log, one dict per row


def replay(run_dir, tracker, logdir=None):
    """Send every stage of the run folder to `tracker` (one of TRACKERS). logdir: where it writes
    (default: RUN/tensorboard for TensorBoard, RUN/wandb for wandb; trackio keeps its own store).
    Every log is read before anything is sent, so a broken one stops the replay before it starts."""
    run_dir = Path(run_dir)
    package = tracker_module(tracker)  # a missing package is said before the logs are read
    stages = read_stages(run_dir)
    where = Path(logdir) if logdir else run_dir / 'tensorboard' if tracker == 'tensorboard' else run_dir
    try:
        if tracker == 'tensorboard':
            to_tensorboard(package, stages, where)
        else:
            to_wandb_api(package, tracker, stages, run_dir.resolve().name, where)
    except OSError as error:  # a full disk or no permission under the tracker's folder
        raise TrackingError(f'cannot write the {tracker} logs under {where}: {error.strerror or error}') from None
    shown = 'its own store' if tracker == 'trackio' else where / 'wandb' if tracker == 'wandb' else where
    print(f'{run_dir}: {len(stages)} stages replayed into {tracker} ({shown})')


def tracker_module(tracker):
    """TensorBoard's SummaryWriter, or the wandb (or trackio) module; TrackingError if not installed."""
    try:
        if tracker == 'tensorboard':
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            return SummaryWriter
        return __import__(tracker)
    except ImportError:
        raise TrackingError(f'tracking to {tracker} needs the {tracker} package: {EXTRA.format(tracker)}') from None


def read_stages(run_dir):
    """Every stage of the run folder, its log and settings read and checked."""
    if not run_dir.is_dir():
        raise TrackingError(f'{run_dir}: no such run folder' if not run_dir.exists() else f'{run_dir}: not a folder')
    logs = sorted(log for log in run_dir.rglob('*.jsonl') if log.with_suffix('.pt').is_file())
    if not logs:
        raise TrackingError(f'{run_dir}: not a run folder (no stage in it: a NAME.jsonl log beside its '
                            'checkpoint NAME.pt)')
    return [Stage(log.relative_to(run_dir).with_suffix('').as_posix(),
                  load_checkpoint(log.with_suffix('.pt'))['train_config'], read_log(log)) for log in logs]


def read_log(path):
    """The rows of a .jsonl log. A line that is not a JSON object is refused, naming it: the project
    writes every log whole (and rewrites one from its checkpoint when a stage is reused), so a broken
    line is damage to report, not to skip."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TrackingError(f'cannot read {path}: {getattr(error, "strerror", None) or error}') from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError as error:
            row, problem = None, f'not JSON ({error.msg})'
        else:
            problem = 'not a JSON object'
        if not isinstance(row, dict):
            raise TrackingError(f'{path}, line {number}: {problem}; rerun the command that made it to '
                                'rewrite the log from its checkpoint')
        rows.append(row)
    return rows


def scalars(row):
    """The row's numbers, {key: value}: what a tracker plots (a bool or a text is not a curve)."""
    return {key: value for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def step_of(row, index):
    """The row's step: its samples (an online method), else its iteration, else its index in the log."""
    numbers = scalars(row)
    return int(numbers.get('samples', numbers.get('iter', index)))


def settings_table(settings):
    """The settings as a markdown table, nested dicts flattened to dotted keys (inputs.sft.pt)."""
    def flat(value, prefix=''):
        if isinstance(value, dict) and value:
            return [item for key, inner in value.items() for item in flat(inner, f'{prefix}{key}.')]
        return [(prefix[:-1], json.dumps(value))]
    lines = ['| setting | value |', '|---|---|'] + [f'| {key} | {value} |' for key, value in flat(settings)]
    return '\n'.join(lines)


def to_tensorboard(summary_writer, stages, logdir):
    """One TensorBoard run per stage, logdir/STAGE. A replay replaces the stage's earlier one (its event
    files are removed first), so replaying twice never doubles a curve; one cut short leaves a partial
    file that the next replay replaces."""
    for stage in stages:
        folder = logdir / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob('events.out.tfevents.*'):
            old.unlink()
        writer = summary_writer(log_dir=str(folder))
        try:
            writer.add_text('settings', settings_table(stage.settings))
            for index, row in enumerate(stage.rows):
                for key, value in scalars(row).items():
                    writer.add_scalar(key, value, global_step=step_of(row, index))
        finally:
            writer.close()


def to_wandb_api(package, tracker, stages, run_name, logdir):
    """One run per stage through the wandb API (wandb, or trackio, which takes the same calls), named
    RUN/STAGE, with the stage's settings as its config."""
    # wandb's own settings: offline unless the environment says otherwise, so no default asks for a
    # login; its files go under logdir. trackio has neither (older versions take no group either).
    own = {}
    if tracker == 'wandb':
        own = {'group': run_name, 'mode': os.environ.get('WANDB_MODE', 'offline'), 'dir': str(logdir)}
        logdir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        try:
            run = package.init(project=os.environ.get('WANDB_PROJECT', 'toy-rlhf'), name=f'{run_name}/{stage.name}',
                               config=stage.settings, **own)
        except Exception as error:  # the tracker's own refusal (a login, a server): its words, in one line
            raise TrackingError(f'{tracker} could not start a run for {stage.name}: '
                                f'{" ".join(str(error).split()) or type(error).__name__}') from None
        try:
            for index, row in enumerate(stage.rows):
                run.log(scalars(row), step=step_of(row, index))
        finally:
            run.finish()
