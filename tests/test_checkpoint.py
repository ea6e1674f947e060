"""Checkpoints: round trips, atomic writes, and one-line errors that say what to run."""
import errno
import math
import os
import pickle
import warnings

import pytest
import torch

from mingpt.model import GPT
from toy_rlhf import checkpoint
from toy_rlhf.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from toy_rlhf.files import WriteError
from toy_rlhf.policy import policy_config

# The models here are tiny: a second thread only adds overhead, and on a shared machine whose other
# core is busy it makes every step wait for it (tens of times slower).

REQUIRED_KEYS = {'format_version', 'kind', 'model_config', 'train_config', 'metrics', 'history', 'state_dict'}
TRAIN_CONFIG = {'learning_rate': 3e-4, 'betas': (0.9, 0.95), 'steps': 10}
METRICS = {'loss': 1.25, 'valid_fraction': 0.5}
HISTORY = [{'iteration': 0, 'loss': 2.5}, {'iteration': 1, 'loss': 2.25}]


def policy_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = policy_config()
    config.merge_from_dict(overrides)
    return GPT(config)


def reward_model(seed=0):
    torch.manual_seed(seed)
    config = GPT.get_default_config()
    config.model_type = 'gpt-nano'
    config.vocab_size, config.block_size, config.output_size = 12, 10, 1
    config.embd_pdrop = config.resid_pdrop = config.attn_pdrop = 0.0
    return GPT(config)


def logits_of(model, vocab_size, length):
    idx = torch.randint(vocab_size, (4, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(idx)[0]


def saved_policy(path, seed=0):
    save_checkpoint(path, policy_model(seed), 'policy', TRAIN_CONFIG, METRICS, HISTORY)
    return path


def assert_one_line_naming_file_and_fix(error, path):
    message = str(error.value)
    assert '\n' not in message
    assert str(path) in message
    assert 'run `toy-rlhf ' in message


# --- round trips ----------------------------------------------------------------------------------

def test_a_saved_policy_loads_with_identical_logits_in_eval_mode(tmp_path):
    model = policy_model()
    path = tmp_path / 'sft.pt'
    save_checkpoint(path, model, 'policy', TRAIN_CONFIG, METRICS)
    loaded = load_model(path, kind='policy')
    assert not loaded.training
    assert torch.equal(logits_of(loaded, 11, 8), logits_of(model, 11, 8))


def test_a_saved_reward_model_loads_with_identical_scores(tmp_path):
    model = reward_model()
    path = tmp_path / 'reward.pt'
    save_checkpoint(path, model, 'reward', TRAIN_CONFIG, METRICS)
    loaded = load_model(path, kind='reward')
    assert torch.equal(logits_of(loaded, 12, 10), logits_of(model, 12, 10))


def test_a_checkpoint_is_a_plain_dict_of_settings_and_tensors(tmp_path):
    model = policy_model()
    path = tmp_path / 'sft.pt'
    save_checkpoint(path, model, 'policy', TRAIN_CONFIG, METRICS, HISTORY)
    stored = torch.load(path, weights_only=True)
    assert set(stored) == REQUIRED_KEYS
    assert stored['history'] == HISTORY
    assert stored['kind'] == 'policy'
    assert isinstance(stored['format_version'], int)
    assert stored['model_config'] == model.config.to_dict()
    assert stored['train_config'] == TRAIN_CONFIG
    assert stored['metrics'] == METRICS
    assert stored['state_dict'].keys() == model.state_dict().keys()
    assert all(torch.equal(stored['state_dict'][name], tensor)
               for name, tensor in model.state_dict().items())
    assert load_checkpoint(path, kind='policy')['metrics'] == METRICS


# --- atomic writes --------------------------------------------------------------------------------

def test_saving_leaves_no_temporary_files(tmp_path):
    saved_policy(tmp_path / 'sft.pt')
    assert os.listdir(tmp_path) == ['sft.pt']


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    path = tmp_path / 'sft.pt'
    saved_policy(path, seed=0)
    saved_policy(path, seed=1)
    assert os.listdir(tmp_path) == ['sft.pt']
    loaded = logits_of(load_model(path), 11, 8)
    assert torch.equal(loaded, logits_of(policy_model(seed=1), 11, 8))
    assert not torch.equal(loaded, logits_of(policy_model(seed=0), 11, 8))


def _caused_by(error, cause):
    error.__cause__ = cause
    return error


DISK_FULL = OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('failure, raised', [
    (DISK_FULL, WriteError),
    (_caused_by(RuntimeError('file write failed'), DISK_FULL), WriteError),  # as torch.save may report it
    (KeyboardInterrupt(), KeyboardInterrupt)])
def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch,
                                                                             failure, raised):
    path = saved_policy(tmp_path / 'sft.pt')
    before = path.read_bytes()

    def write_half_then_fail(payload, file):
        file.write(before[:len(before) // 2])
        raise failure

    monkeypatch.setattr(checkpoint.torch, 'save', write_half_then_fail)
    with pytest.raises(raised) as error:
        save_checkpoint(path, policy_model(seed=1), 'policy', TRAIN_CONFIG, METRICS)
    if raised is WriteError:  # one line naming the file and the cause
        assert str(path) in str(error.value) and 'No space left on device' in str(error.value)
        assert '\n' not in str(error.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['sft.pt']


# --- unusable files -------------------------------------------------------------------------------

LOADERS = [load_checkpoint, load_model]


@pytest.mark.parametrize('load', LOADERS)
def test_a_missing_file_is_reported_with_what_to_run(tmp_path, load):
    path = tmp_path / 'sft.pt'
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert_one_line_naming_file_and_fix(error, path)


def test_the_fix_names_the_command_that_makes_that_file(tmp_path):
    path = tmp_path / 'runs' / 'exp1' / 'reward.pt'
    with pytest.raises(CheckpointError, match='toy-rlhf reward --run exp1'):
        load_model(path)


def _truncate(path):
    saved_policy(path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _random_bytes(path):
    path.write_bytes(torch.randint(256, (4096,), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0)).numpy().tobytes())


def _a_tensor_not_a_dict(path):
    torch.save(torch.zeros(3), path)


@pytest.mark.parametrize('load', LOADERS)
@pytest.mark.parametrize('write', [_truncate, _random_bytes, _a_tensor_not_a_dict])
def test_a_file_that_is_not_a_readable_checkpoint_is_reported_with_what_to_run(tmp_path, write, load):
    path = tmp_path / 'sft.pt'
    write(path)
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert_one_line_naming_file_and_fix(error, path)


class MakesMarker:
    """Unpickling this object calls os.mkdir(marker): harmless, but visible if it ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_plain_pickle(path, payload):
    path.write_bytes(pickle.dumps(payload, protocol=2))


def write_torch_zip(path, payload):
    torch.save(payload, path)


@pytest.mark.parametrize('write, load_unrestricted', [
    (write_plain_pickle, lambda path: pickle.loads(path.read_bytes())),
    (write_torch_zip, lambda path: torch.load(path, weights_only=False)),
])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, write,
                                                                    load_unrestricted):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'sft.pt'
    write(path, {'kind': 'policy', 'state_dict': MakesMarker(marker)})
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_naming_file_and_fix(error, path)
    assert not marker.exists()
    # The payload is live: an unrestricted load does run it (so the check above can fail).
    load_unrestricted(path)
    assert marker.exists()


@pytest.mark.parametrize('protocol', [3, 4, 5])
def test_a_pickle_torch_warns_about_is_reported_in_one_line_without_the_warning(tmp_path, capfd, protocol):
    path = tmp_path / 'sft.pt'
    path.write_bytes(pickle.dumps({'kind': 'policy'}, protocol=protocol))  # not a protocol torch writes
    with warnings.catch_warnings(record=True) as shown, pytest.raises(CheckpointError) as error:
        warnings.simplefilter('always')
        load_checkpoint(path)
    assert_one_line_naming_file_and_fix(error, path)
    assert [str(warning.message) for warning in shown] == []
    assert capfd.readouterr() == ('', '')


@pytest.mark.parametrize('load', LOADERS)
def test_a_reward_checkpoint_asked_for_as_a_policy_is_reported(tmp_path, load):
    path = tmp_path / 'reward.pt'
    save_checkpoint(path, reward_model(), 'reward', TRAIN_CONFIG, METRICS)
    with pytest.raises(CheckpointError, match='reward') as error:
        load(path, kind='policy')
    assert_one_line_naming_file_and_fix(error, path)


@pytest.mark.parametrize('load', LOADERS)
def test_a_policy_checkpoint_asked_for_as_a_reward_model_is_reported(tmp_path, load):
    path = saved_policy(tmp_path / 'sft.pt')
    with pytest.raises(CheckpointError, match='policy') as error:
        load(path, kind='reward')
    assert_one_line_naming_file_and_fix(error, path)


@pytest.mark.parametrize('overrides, kind', [
    ({'vocab_size': 12}, 'policy'),  # reads CLS, which a policy never sees
    ({'block_size': 7}, 'policy'),  # cannot read a whole prompt + SEP + 3 digits
    ({'vocab_size': 12, 'block_size': 10}, 'reward'),  # a language model head, not one score
])
def test_a_model_that_does_not_fit_the_language_is_reported(tmp_path, overrides, kind):
    path = tmp_path / 'model.pt'
    save_checkpoint(path, policy_model(**overrides), kind, TRAIN_CONFIG, METRICS)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_naming_file_and_fix(error, path)


def _without(key):
    def edit(stored):
        del stored[key]
    edit.__name__ = f'without_{key}'
    return edit


def _newer_format(stored):
    stored['format_version'] += 1


def _older_format(stored):  # format 2 had no history, format 1 other parameter names: neither is read
    stored['format_version'] = 2


def _unknown_kind(stored):
    stored['kind'] = 'value'


def _no_block_size(stored):
    del stored['model_config']['block_size']


def _model_config_none(stored):
    stored['model_config'] = None


def _sizes_that_do_not_match_the_weights(stored):
    stored['model_config']['n_embd'] = 24
    stored['model_config']['n_head'] = 2


def _format_version_as_a_tensor(stored):
    stored['format_version'] = torch.tensor(stored['format_version'])


def _history_not_a_list(stored):
    stored['history'] = {'loss': 1.0}


def _a_weight_that_is_not_a_tensor(stored):
    stored['state_dict']['lm_head.weight'] = 0.5


def _nan_weight(stored):
    stored['state_dict']['transformer.h.0.attn.c_attn.weight'][0, 0] = math.nan


def _infinite_weight(stored):
    stored['state_dict']['lm_head.weight'][3, 1] = -math.inf


def _beta_as_text(stored):
    stored['train_config']['beta'] = '1'


def _negative_gold_margin(stored):
    stored['train_config']['gold_margin'] = -20.0


def _a_preference_that_is_not_a_name(stored):
    stored['train_config']['preference'] = 3


def _an_unknown_setting_holding_a_tensor(stored):
    stored['train_config']['extra'] = torch.zeros(2)


def _inputs_not_a_dict_of_names(stored):
    stored['train_config']['inputs'] = ['sft.pt']


def _a_metric_that_is_text(stored):
    stored['metrics']['language_kl'] = 'low'


EDITS = [*(_without(key) for key in sorted(REQUIRED_KEYS)), _newer_format, _older_format, _unknown_kind,
         _no_block_size, _model_config_none, _sizes_that_do_not_match_the_weights,
         _format_version_as_a_tensor, _history_not_a_list, _a_weight_that_is_not_a_tensor, _nan_weight,
         _infinite_weight, _beta_as_text, _negative_gold_margin, _a_preference_that_is_not_a_name,
         _an_unknown_setting_holding_a_tensor, _inputs_not_a_dict_of_names, _a_metric_that_is_text]


@pytest.mark.parametrize('edit', EDITS, ids=lambda edit: edit.__name__.strip('_'))
def test_a_checkpoint_with_missing_or_inconsistent_contents_is_reported_with_what_to_run(tmp_path, edit):
    path = saved_policy(tmp_path / 'sft.pt')
    stored = torch.load(path, weights_only=True)
    edit(stored)
    torch.save(stored, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_naming_file_and_fix(error, path)


def test_every_setting_the_project_writes_passes_the_check_it_is_read_with(tmp_path):
    # The control for the settings edits above: every config's own defaults, as save_stage stores them.
    from dataclasses import asdict
    from toy_rlhf.methods import METHODS
    from toy_rlhf.reward import RewardConfig
    from toy_rlhf.sft import SFTConfig
    for config in (SFTConfig, RewardConfig, *(method.config for method in METHODS.values())):
        settings = {**asdict(config()), 'inputs': {'sft.pt': '0123456789abcdef'}, 'versions': {'torch': '2.13.0'}}
        path = saved_policy(tmp_path / 'policy.pt')
        stored = torch.load(path, weights_only=True)
        stored['train_config'] = settings
        torch.save(stored, path)
        assert load_checkpoint(path)['train_config'] == settings
