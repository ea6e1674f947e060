"""The whole story in one call: SFT -> reward model -> PPO for each beta -> evaluation -> figures -> report
(`toy-rlhf all`, scripts/run_all.py).

A stage whose checkpoint was made with the same settings from the same input checkpoints is reused;
everything after a retrained stage is retrained (its inputs changed). Evaluation, figures and the
report are always made afresh from the checkpoints, with fixed seeds, so two runs with the same
settings write the same metrics.json byte for byte. The report's text is main_report.py's and the
seven figures are main_figures.py's; what a figure shows is computed here, so no drawing code runs a
model.

scripts/run_all.py parses the flags with `flags()` and calls run_all itself: from the script to PPO's
loss is run_all -> Run.train -> train_variant -> (the registry) ppo.train_ppo -> ppo.update ->
ratios.policy_loss.
"""
import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from toy_rlhf.checkpoint import load_checkpoint, load_model
from toy_rlhf.files import write_json
from toy_rlhf.flags import Device, Digit, NonNegativeFloat, Seed, config_from_args
from toy_rlhf.language import DIGITS, PROMPT_LENGTH, entropy_floor, join, next_token_distribution, sample_prompts
from toy_rlhf.methods.ppo import PPOConfig
from toy_rlhf.metrics import (EVALUATION_PROMPTS, PREFERENCE_TARGET, aligned_next_tokens, evaluate_policy,
                              samples_to_preference, true_distributions)
from toy_rlhf.pipeline import ensure_stage, machine, reward_stage, sft_stage, versions
from toy_rlhf.policy import next_token_log_probs
from toy_rlhf.preferences import DEFAULT_PREFERENCE, best_reachable, resolve_preference
from toy_rlhf.reward import RewardConfig, first_digit_rewards
from toy_rlhf.run import Run, Variant
from toy_rlhf.sft import SFTConfig
from toy_rlhf.studies.main_figures import (plot_attention, plot_first_token, plot_kl_by_position,
                                           plot_next_token_probs, plot_ppo_curves, plot_reward_model, plot_sft_loss)
from toy_rlhf.studies.main_report import report_text
from toy_rlhf.studies.output import write_study
from toy_rlhf.usage import check_betas, working_preference

REFERENCE = 'reference (SFT)'


@dataclass
class RunAllConfig:
    SET_BY_STUDY = ('seed', 'device', 'beta', 'preference')  # the stages' settings that the fields below set
    betas: tuple[NonNegativeFloat, ...] = (1.0, 0.0)  # compared KL strengths; the first is the "aligned" one
    seed: Seed = 0  # random seed of every stage: the same seed gives the same numbers
    quick: bool = False  # a much smaller schedule, for smoke tests
    fresh: bool = False  # retrain every stage even if its checkpoint was made with the same settings
    prompt: tuple[Digit, Digit, Digit, Digit] = (5, 7, 1, 5)  # the prompt of the per-sentence figures
    response: tuple[Digit, Digit, Digit, Digit] = (6, 2, 7, 3)  # the response of the per-sentence figures
    device: Device = 'cpu'  # where SFT and the reward model train (PPO and evaluation run on the CPU)
    # first-digit, last-digit, digit-sum, distinct or module:function; where the preference has a recipe
    # for PPO (preferences.py), it replaces PPO's defaults (--ppo.* flags still win; report.md lists them)
    preference: str = DEFAULT_PREFERENCE
    # The stages' own settings (flags --sft.iters, --reward.pairs, --ppo.learning-rate, ...); seed,
    # device, preference and beta come from the fields above.
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


def quick_schedule(config):
    """config with the stages' schedules cut to a smoke test's (seconds instead of a minute)."""
    return replace(config, quick=True, sft=replace(config.sft, iters=60, warmup_iters=10),
                   reward=replace(config.reward, iters=60, pairs=1000, held_out_pairs=500),
                   ppo=replace(config.ppo, iters=6, prompts_per_iter=32, warm_start_prompts=64))


def config_from_flags(args):
    """The study's config from the flags of `toy-rlhf all` (parsed args): the run's own preference
    unless --fresh retrains for another, PPO's defaults with that preference's recipe over them (if
    it has one), the quick schedule, then the flags given over all of it; the betas checked."""
    config = config_from_args(args, RunAllConfig)
    check_betas('--betas', config.betas)
    if not config.fresh:  # a run has one preference, its reward model's
        config = replace(config, preference=working_preference(args, 'preference', config.preference))
    recipe = resolve_preference(config.preference).method_defaults('ppo', PPOConfig)
    base = replace(config, ppo=recipe)
    return config_from_args(args, RunAllConfig, base=quick_schedule(base) if config.quick else base)


@contextlib.contextmanager
def flags(argv=None):
    """The flags of `toy-rlhf all` parsed from argv, as (args, config), while the run folder is held;
    every failure in the block is one line, exit 2, as for any command (toy_rlhf.cli.running)."""
    from toy_rlhf.cli import running  # here, not above: the command line imports every study, this one too
    with running('all', argv) as args:
        yield args, config_from_flags(args)


def run_from_flags(args):
    """`toy-rlhf all`: run_all with the parsed flags."""
    return run_all(args.run_dir, args.plots_dir, config_from_flags(args), args.progress)


def stage_configs(config):
    """The study's variants: the settings of each training stage, SFT, the reward model and PPO at each beta."""
    sft = replace(config.sft, seed=config.seed, device=config.device)
    reward = replace(config.reward, seed=config.seed, device=config.device, preference=config.preference)
    ppo = replace(config.ppo, seed=config.seed)
    return {'sft': sft, 'reward': reward, 'ppo': {beta: replace(ppo, beta=beta) for beta in config.betas}}


def run_all(run_dir, plots_dir, config, progress=True):
    """Run every stage into run_dir, draw the figures into plots_dir, write report.md,
    metrics.json and timings.json into run_dir. Returns the metrics."""
    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    configs = stage_configs(config)
    # The reward model starts from the SFT policy, and PPO from both: new inputs mean a new run.
    timings = {'sft': ensure_stage(run_dir, 'sft', configs['sft'], (), sft_stage, config.fresh, progress),
               'reward': ensure_stage(run_dir, 'reward', configs['reward'], (run_dir / 'sft.pt',), reward_stage,
                                      config.fresh, progress)}
    run = Run(run_dir, config.preference, config.fresh, progress)
    # The story told here is PPO's; every method's is studies/methods.py.
    variants = {beta: Variant.of(ppo, 'ppo') for beta, ppo in configs['ppo'].items()}
    timings.update(run.train(variants.values()))

    start = time.perf_counter()
    models = {REFERENCE: run.sft_policy}
    histories = {}
    for beta, variant in variants.items():
        models[f'beta={beta:g}'] = run.policy(variant)
        histories[f'beta={beta:g}'] = run.checkpoint(variant)['history']
    metrics = measure(run_dir, models, histories, config)
    timings['evaluation'] = {'seconds': time.perf_counter() - start}

    start = time.perf_counter()
    drawn = draw(run_dir, plots_dir, models, histories, config, metrics)
    timings['figures'] = {'seconds': time.perf_counter() - start}
    timings['total'] = {'seconds': sum(stage['seconds'] for stage in timings.values())}

    settings = {'seed': config.seed, 'betas': list(config.betas), 'quick': config.quick,
                'preference': config.preference,
                'stages': {'sft': asdict(configs['sft']), 'reward': asdict(configs['reward']),
                           **{variants[beta].name: asdict(ppo) for beta, ppo in configs['ppo'].items()}},
                'versions': versions(), 'machine': machine()}
    write_json(run_dir / 'timings.json', timings)
    report = write_study(run_dir, 'report', report_text(settings, metrics, timings, drawn, run_dir),
                         {'settings': settings, **metrics}, record_name='metrics')
    print(f"Report: {report}; figures in {plots_dir}/; total {timings['total']['seconds']:.1f} s")
    return metrics


def measure(run_dir, models, histories, config):
    """The quality numbers of every stage, all recomputed from the checkpoints with fixed seeds."""
    sft = load_checkpoint(run_dir / 'sft.pt')['metrics']
    reward = load_checkpoint(run_dir / 'reward.pt')['metrics']
    reference = models[REFERENCE]
    preference = resolve_preference(config.preference)
    return {
        'sft': {'language_kl': sft['language_kl'], 'entropy_floor': entropy_floor()},
        'reward': {'pairwise_accuracy': reward['pairwise_accuracy'], 'rank_rate': reward['rank_rate']},
        'policies': {label: evaluate_policy(model, reference, EVALUATION_PROMPTS, config.seed, preference)
                     for label, model in models.items()},
        'ppo_samples_to_99_percent_preference': {label: samples_to_preference(history, PREFERENCE_TARGET)
                                                 for label, history in histories.items()},
    }


# ---------------------------------------------------------------------------------------------
# What the figures show, computed from the models (the drawing code in main_figures.py runs none).

def first_digit_scores(reward_model, prompt, response, preference):
    """The reward model's score of the sentence with each of the ten digits in place of the response's
    first one, and which of these variants reach the preference's best gold level for the prompt.

    prompt, response: (4,) long. Returns {'prompt', 'response' (lists), 'rewards' (10,) array, 'best'
    (10 bools), 'preferred': the preferred first digit for a preference on the first digit, else None}."""
    with torch.no_grad():
        rewards = first_digit_rewards(reward_model.eval(), prompt[None], response[None])[0]  # (10,)
    variants = response.repeat(DIGITS, 1)
    variants[:, 0] = torch.arange(DIGITS)
    best = preference.reward(prompt.expand(DIGITS, -1), variants) >= best_reachable(preference, prompt[None])
    preferred = preference.first_token(prompt[None]).item() if preference.asks_for_a_first_digit else None
    return {'prompt': prompt.tolist(), 'response': response.tolist(), 'rewards': rewards.numpy(),
            'best': best.tolist(), 'preferred': preferred}


def next_token_probabilities(models, prompt, response, preference):
    """Each model's next-token probabilities at the 4 output steps of one sentence, teacher forced; the
    exact language's; and at each step where the aligned language (the language conditioned on the
    preference's best reachable level) differs from the language, the tokens it allows.

    models: ordered dict label -> policy GPT; prompt, response: (4,) long. Returns {'sentence' (9
    tokens), 'models': {label: (4, V) array}, 'language': (4, V) array, 'starred': 4 lists of tokens}."""
    sentence = join(prompt[None], response[None])  # (1, 9)
    with torch.no_grad():
        probabilities = {label: next_token_log_probs(model.eval(), sentence).exp()[0].numpy()  # (4, V)
                         for label, model in models.items()}
    language = true_distributions(sentence)[0]  # (4, V)
    aligned = aligned_next_tokens(preference, prompt[None], response[None])[0]  # (4, V)
    starred = [torch.nonzero(aligned[step]).flatten().tolist() if not torch.equal(aligned[step], language[step])
               else [] for step in range(len(language))]
    return {'sentence': sentence[0].tolist(), 'models': probabilities, 'language': language.numpy(),
            'starred': starred}


def attention_from_sep(models, prompt, response):
    """Each model's attention weights of the query at SEP (position 4, where the first output digit
    is predicted) over keys 0..4, every layer and head; the input is the sentence's first 8 tokens
    (block_size). Returns {'tokens' (8), 'models': {label: (n_layer, n_head, 5) array}}."""
    idx = join(prompt[None], response[None])[:, :-1]  # (1, 8)
    query = PROMPT_LENGTH  # SEP
    with torch.no_grad():
        weights = {label: model.eval().attention_maps(idx)[:, 0, :, query, :query + 1].numpy()  # (L, H, 5)
                   for label, model in models.items()}
    return {'tokens': idx[0].tolist(), 'models': weights}


def preferred_first_digit_probabilities(models, preference, seed, n_prompts=2000):
    """The probability each model, and the exact language, puts on the first digit `preference` asks
    for after prompt + SEP, over n_prompts prompts drawn with `seed`: {'language': curve,
    'models': {label: curve}}, each curve {'probabilities': sorted highest first, 'mean'}."""
    prompts = sample_prompts(n_prompts, torch.Generator().manual_seed(seed))  # (N, 4)
    context = join(prompts)  # (N, 5)
    preferred = preference.first_token(prompts).unsqueeze(1)  # (N, 1)
    with torch.no_grad():
        probabilities = {label: model.eval()(context)[0][:, -1].softmax(dim=-1).gather(1, preferred)[:, 0]
                         for label, model in models.items()}  # (N,)
    language = next_token_distribution(context).gather(1, preferred)[:, 0]

    def curve(probability):
        return {'probabilities': probability.sort(descending=True).values.numpy(), 'mean': probability.mean().item()}
    return {'language': curve(language), 'models': {label: curve(p) for label, p in probabilities.items()}}


def draw(run_dir, plots_dir, models, histories, config, metrics):
    """The figures; returns their paths by name. The first-digit probabilities are drawn for a
    preference on the first digit only."""
    prompt, response = torch.tensor(config.prompt), torch.tensor(config.response)
    preference = resolve_preference(config.preference)
    rate_label = 'P(first digit is the preferred one)' if preference.asks_for_a_first_digit \
        else 'P(the best gold level reachable)'
    reward_scores = first_digit_scores(load_model(run_dir / 'reward.pt', 'reward'), prompt, response, preference)
    drawn = {
        'sft_loss': plot_sft_loss(load_checkpoint(run_dir / 'sft.pt')['history'], entropy_floor(),
                                  plots_dir / 'sft_loss.png'),
        'reward_model': plot_reward_model(load_checkpoint(run_dir / 'reward.pt')['history'], reward_scores,
                                          plots_dir / 'reward_model.png'),
        'ppo_curves': plot_ppo_curves(histories, metrics['ppo_samples_to_99_percent_preference'],
                                      plots_dir / 'ppo_curves.png', rate_label=rate_label),
        'next_token_probs': plot_next_token_probs(next_token_probabilities(models, prompt, response, preference),
                                                  plots_dir / 'next_token_probs.png'),
        'kl_by_position': plot_kl_by_position(metrics['policies'], plots_dir / 'kl_by_position.png'),
        'attention': plot_attention(attention_from_sep(models, prompt, response), plots_dir / 'attention.png'),
    }
    if preference.asks_for_a_first_digit:
        drawn['first_token'] = plot_first_token(preferred_first_digit_probabilities(models, preference,
                                                                                        config.seed),
                                                plots_dir / 'first_token.png')
    return drawn
