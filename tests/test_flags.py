"""A config that holds other configs: their fields are flags --NAME.FIELD, and a flag given replaces
only its own field of the nested config the command starts from."""
import argparse
from dataclasses import dataclass, field, replace

from toy_rlhf.flags import PositiveInt, Seed, add_config_flags, config_from_args


@dataclass
class StageConfig:
    iters: PositiveInt = 50  # training rounds
    batch_size: PositiveInt = 64  # sentences per step
    seed: Seed = 0  # random seed


@dataclass
class StudyConfig:
    SET_BY_STUDY = ('seed',)
    seed: Seed = 0  # random seed of every stage
    stage: StageConfig = field(default_factory=StageConfig)


def study_parser():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, StudyConfig)
    return parser


def test_a_nested_configs_fields_are_flags_named_after_it_but_those_the_study_sets():
    flags = {flag for action in study_parser()._actions for flag in action.option_strings}
    assert {'--seed', '--stage.iters', '--stage.batch-size'} <= flags
    assert '--stage.seed' not in flags and '--stage' not in flags


def test_a_nested_flag_replaces_only_its_own_field_of_the_nested_base():
    base = StudyConfig(stage=StageConfig(iters=6, batch_size=8))
    args = study_parser().parse_args(['--stage.iters', '7', '--seed', '3'])
    assert config_from_args(args, StudyConfig, base=base) == replace(base, seed=3, stage=StageConfig(iters=7, batch_size=8))
    assert config_from_args(study_parser().parse_args([]), StudyConfig) == StudyConfig()
