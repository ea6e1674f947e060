"""The public minGPT interface: GPT, Trainer, CfgNode and set_seed behave as minGPT's do."""
import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.utils import CfgNode, set_seed

# The models here are tiny: a second thread only adds overhead, and on a shared machine whose other
# core is busy it makes every step wait for it (tens of times slower).
torch.set_num_threads(1)

VOCAB = 7
BLOCK = 8


def tiny_config(**overrides):
    """A two-layer GPT small enough to build and run in milliseconds."""
    config = GPT.get_default_config()
    config.model_type = None
    config.n_layer, config.n_head, config.n_embd = 2, 2, 16
    config.vocab_size, config.block_size = VOCAB, BLOCK
    config.merge_from_dict(overrides)
    return config


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def random_tokens(shape, seed=1, high=VOCAB):
    return torch.randint(high, shape, generator=torch.Generator().manual_seed(seed))


# --- shapes ---------------------------------------------------------------------------------------

def test_forward_returns_logits_over_the_vocabulary_and_no_loss_without_targets():
    logits, loss = tiny_model().eval()(random_tokens((3, 5)))
    assert logits.shape == (3, 5, VOCAB)
    assert loss is None


def test_forward_with_targets_returns_a_scalar_loss():
    idx = random_tokens((3, 5))
    _, loss = tiny_model()(idx, random_tokens((3, 5), seed=2))
    assert loss.dim() == 0
    assert torch.isfinite(loss)


def test_output_size_one_gives_one_score_per_position():
    logits, _ = tiny_model(output_size=1)(random_tokens((2, 6)))
    assert logits.shape == (2, 6, 1)


# --- causality and loss ---------------------------------------------------------------------------

@pytest.mark.parametrize('changed_position', [1, 4, BLOCK - 1])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(changed_position):
    model = tiny_model().eval()
    idx = random_tokens((2, BLOCK))
    changed = idx.clone()
    changed[:, changed_position] = (changed[:, changed_position] + 1) % VOCAB
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    assert torch.allclose(before[:, :changed_position], after[:, :changed_position], atol=1e-6)
    # ... while the changed position itself does see the change (so the comparison above can fail).
    assert not torch.allclose(before[:, changed_position], after[:, changed_position], atol=1e-4)


def test_loss_is_the_mean_cross_entropy_over_positions_whose_target_is_not_minus_one():
    model = tiny_model().eval()
    idx = random_tokens((3, 6))
    targets = random_tokens((3, 6), seed=2)
    targets[0, :4] = -1
    targets[2, 1] = -1
    targets[1, 5] = -1
    with torch.no_grad():
        logits, loss = model(idx, targets)
    log_probs = logits.log_softmax(dim=-1)
    kept = [-log_probs[b, t, targets[b, t]] for b in range(3) for t in range(6) if targets[b, t] != -1]
    assert len(kept) == 18 - 6
    assert torch.allclose(loss, torch.stack(kept).mean(), atol=1e-6)


# --- generate -------------------------------------------------------------------------------------

def test_generate_appends_max_new_tokens():
    idx = random_tokens((2, 3))
    out = tiny_model().eval().generate(idx, max_new_tokens=4)
    assert out.shape == (2, 3 + 4)
    assert torch.equal(out[:, :3], idx)


def test_greedy_generation_takes_the_argmax_at_each_step_from_at_most_block_size_tokens():
    model = tiny_model().eval()
    idx = random_tokens((3, 5))
    new_tokens = 6  # 5 + 6 > BLOCK: the later steps must crop the context to the last BLOCK tokens
    out = model.generate(idx, max_new_tokens=new_tokens, do_sample=False)
    expected = idx
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model(expected[:, -BLOCK:])
            expected = torch.cat([expected, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(idx, max_new_tokens=new_tokens), out)


def test_greedy_generation_that_fits_in_block_size_equals_recomputing_every_step():
    # 3 + 5 tokens fit in BLOCK, so generate runs each new token alone against cached keys and values.
    model = tiny_model().eval()
    idx = random_tokens((3, 3))
    expected = idx
    with torch.no_grad():
        for _ in range(5):
            logits, _ = model(expected)
            expected = torch.cat([expected, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(idx, max_new_tokens=5), expected)


@pytest.mark.parametrize('pieces', [(8,), (3, 1, 1, 1, 1, 1), (1, 4, 2, 1)])
def test_a_sequence_fed_in_pieces_through_a_cache_gets_the_logits_of_one_full_pass(pieces):
    model = tiny_model().eval()
    idx = random_tokens((4, BLOCK))
    cache = [{} for _ in model.blocks]
    with torch.no_grad():
        full, _ = model(idx)
        ends = np.cumsum(pieces)
        parts = [model(idx[:, end - size:end], cache=cache)[0] for size, end in zip(pieces, ends)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_a_cache_does_not_let_a_sequence_grow_past_block_size():
    model = tiny_model().eval()
    cache = [{} for _ in model.blocks]
    with torch.no_grad():
        model(random_tokens((2, BLOCK - 1)), cache=cache)
        with pytest.raises(ValueError, match=f'sequence length {BLOCK + 1} exceeds block_size {BLOCK}'):
            model(random_tokens((2, 2)), cache=cache)


def test_sampling_with_top_k_one_is_greedy():
    model = tiny_model().eval()
    idx = random_tokens((4, 2))
    greedy = model.generate(idx, max_new_tokens=5)
    sampled = model.generate(idx, max_new_tokens=5, do_sample=True, top_k=1,
                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, greedy)


def test_sampling_with_the_same_generator_seed_repeats_whatever_the_global_seed():
    model = tiny_model().eval()
    idx = random_tokens((16, 2))

    def sample(seed, global_seed):
        torch.manual_seed(global_seed)
        return model.generate(idx, max_new_tokens=6, do_sample=True,
                              generator=torch.Generator().manual_seed(seed))

    first = sample(seed=5, global_seed=100)
    assert torch.equal(sample(seed=5, global_seed=200), first)
    assert not torch.equal(sample(seed=6, global_seed=100), first)
    assert first.min() >= 0 and first.max() < VOCAB


# --- config ---------------------------------------------------------------------------------------

def test_model_type_together_with_explicit_sizes_is_rejected():
    config = tiny_config(model_type='gpt-nano')
    with pytest.raises(ValueError, match='either model_type'):
        GPT(config)


def test_neither_model_type_nor_all_sizes_is_rejected():
    with pytest.raises(ValueError, match='give a model_type'):
        GPT(tiny_config(n_layer=None, n_head=None, n_embd=None))
    with pytest.raises(ValueError, match='give a model_type'):
        GPT(tiny_config(n_embd=None))


def test_unknown_model_type_is_rejected():
    config = tiny_config(n_layer=None, n_head=None, n_embd=None, model_type='gpt-enormous')
    with pytest.raises(ValueError, match='gpt-enormous'):
        GPT(config)


@pytest.mark.parametrize('name', ['vocab_size', 'block_size'])
def test_missing_vocab_or_block_size_is_rejected(name):
    config = GPT.get_default_config()
    config.model_type = 'gpt-nano'
    config.vocab_size, config.block_size = VOCAB, BLOCK
    setattr(config, name, None)
    with pytest.raises(ValueError, match=name):
        GPT(config)


@pytest.mark.parametrize('model_type, sizes', [('gpt-nano', (3, 3, 48)), ('gpt-micro', (4, 4, 128)),
                                               ('gpt-mini', (6, 6, 192))])
def test_presets_have_minGPT_sizes(model_type, sizes):
    n_layer, n_head, n_embd = sizes
    config = GPT.get_default_config()
    config.model_type = model_type
    config.vocab_size, config.block_size = VOCAB, BLOCK
    model = GPT(config)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == sizes
    assert len(model.blocks) == n_layer
    assert all(block.attn.n_head == n_head for block in model.blocks)
    assert model.wte.embedding_dim == n_embd


def test_building_a_model_does_not_change_the_callers_config():
    config = GPT.get_default_config()
    config.model_type = 'gpt-nano'
    config.vocab_size, config.block_size = VOCAB, BLOCK
    before = config.to_dict()
    GPT(config)
    assert config.to_dict() == before
    GPT(config)  # and so the same config builds a second model


# --- bad input ------------------------------------------------------------------------------------

def test_a_sequence_longer_than_block_size_is_rejected_naming_its_length():
    with pytest.raises(ValueError, match=rf'\b{BLOCK + 1}\b'):
        tiny_model()(random_tokens((1, BLOCK + 1)))


@pytest.mark.parametrize('bad_id', [-1, VOCAB, VOCAB + 5])
def test_a_token_id_outside_the_vocabulary_is_rejected_naming_it(bad_id):
    idx = random_tokens((2, 4))
    idx[1, 2] = bad_id
    with pytest.raises(ValueError, match=rf'id {re.escape(str(bad_id))}\b'):
        tiny_model()(idx)


# --- attention maps -------------------------------------------------------------------------------

def test_attention_maps_are_causal_probability_rows():
    model = tiny_model()
    T = 6
    maps = model.attention_maps(random_tokens((3, T)))
    assert maps.shape == (2, 3, 2, T, T)  # (n_layer, B, n_head, T, T)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(2, 3, 2, T), atol=1e-6)
    above_diagonal = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert torch.all(maps[..., above_diagonal] == 0)
    assert torch.all(maps[..., ~above_diagonal] > 0)


def test_attention_maps_ignore_dropout_and_keep_the_models_mode():
    model = tiny_model(embd_pdrop=0.5, resid_pdrop=0.5, attn_pdrop=0.5)
    idx = random_tokens((2, BLOCK))
    model.train()
    in_train_mode = model.attention_maps(idx)
    assert model.training
    model.eval()
    in_eval_mode = model.attention_maps(idx)
    assert not model.training
    assert torch.equal(in_train_mode, in_eval_mode)


def test_attention_maps_are_the_weights_the_forward_pass_applies_to_the_values():
    model = tiny_model().eval()
    idx = random_tokens((2, 7))
    C, n_head = model.config.n_embd, model.config.n_head
    inputs, outputs = [], []

    def record(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    hooks = [block.attn.register_forward_hook(record) for block in model.blocks]
    with torch.no_grad():
        model(idx)
        for hook in hooks:
            hook.remove()
        maps = model.attention_maps(idx)
        for layer, block in enumerate(model.blocks):
            x = inputs[layer]  # (B, T, C), the block's ln_1 output
            B, T, _ = x.shape
            _, _, v = block.attn.qkv(x).split(C, dim=2)
            v = v.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)
            mixed = (maps[layer] @ v).transpose(1, 2).reshape(B, T, C)
            assert torch.allclose(block.attn.proj(mixed), outputs[layer], atol=1e-5)


# --- optimizer ------------------------------------------------------------------------------------

def test_weight_decay_applies_to_exactly_the_linear_weights():
    model = tiny_model(output_size=3)
    train_config = Trainer.get_default_config()
    optimizer = model.configure_optimizers(train_config)
    decayed, not_decayed = optimizer.param_groups
    assert decayed['weight_decay'] == train_config.weight_decay
    assert not_decayed['weight_decay'] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    # Two blocks of (qkv, proj, two MLP layers) plus the head.
    assert len(linear_weights) == 2 * 4 + 1
    assert {id(p) for p in decayed['params']} == linear_weights
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.Embedding)):
            assert all(id(p) in {id(q) for q in not_decayed['params']} for p in module.parameters())
    grouped = [id(p) for group in optimizer.param_groups for p in group['params']]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}


# --- trainer --------------------------------------------------------------------------------------

class NextTokenDataset(torch.utils.data.Dataset):
    """Sequences x of random tokens whose target y is a fixed function of x: (x + 1) % VOCAB."""

    def __init__(self, size, length=6, seed=0):
        self.x = random_tokens((size, length), seed=seed)
        self.y = (self.x + 1) % VOCAB

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_trainer_has_minGPTs_default_config():
    config = Trainer.get_default_config()
    assert config.device == 'auto'
    assert config.num_workers == 4
    assert config.max_iters is None
    assert config.batch_size == 64
    assert config.learning_rate == 3e-4
    assert config.betas == (0.9, 0.95)
    assert config.weight_decay == 0.1
    assert config.grad_norm_clip == 1.0


def test_minGPT_style_usage_runs_unchanged_and_calls_back_after_every_batch():
    set_seed(0)
    model_config = GPT.get_default_config()
    model_config.model_type = 'gpt-nano'
    model_config.vocab_size = VOCAB
    model_config.block_size = BLOCK
    model = GPT(model_config)
    train_config = Trainer.get_default_config()
    train_config.num_workers = 0
    train_config.max_iters = 5
    train_config.batch_size = 8
    trainer = Trainer(train_config, model, NextTokenDataset(32))

    seen = []
    also_seen = []
    trainer.set_callback('on_batch_end',
                         lambda t: seen.append((t.iter_num, t.loss.item(), t.iter_dt)))
    trainer.add_callback('on_batch_end', lambda t: also_seen.append(t.iter_num))
    trainer.run()

    assert [iter_num for iter_num, _, _ in seen] == [0, 1, 2, 3, 4]
    assert also_seen == [0, 1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss, _ in seen)
    assert all(isinstance(dt, float) and dt >= 0 for _, _, dt in seen)


def test_set_callback_replaces_the_callbacks_of_an_event():
    trainer = Trainer(Trainer.get_default_config(), tiny_model(), NextTokenDataset(4))
    calls = []
    trainer.add_callback('on_batch_end', lambda t: calls.append('first'))
    trainer.set_callback('on_batch_end', lambda t: calls.append('second'))
    trainer.trigger_callbacks('on_batch_end')
    assert calls == ['second']


def test_trainer_lowers_the_loss_on_a_learnable_task():
    set_seed(0)
    model = tiny_model(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    config = Trainer.get_default_config()
    config.num_workers = 0
    config.max_iters = 60
    config.batch_size = 32
    config.learning_rate = 3e-3
    trainer = Trainer(config, model, NextTokenDataset(256))
    losses = []
    trainer.set_callback('on_batch_end', lambda t: losses.append(t.loss.item()))
    trainer.run()
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # Uniform guessing costs log(7) ~ 1.95 nats; the map x -> x + 1 can be learned almost exactly.
    assert first > 0.8 * math.log(VOCAB)
    assert last < 0.5 * first


# --- utils ----------------------------------------------------------------------------------------

def nested_config():
    config = CfgNode(lr=3e-4, name='nano')
    config.model = CfgNode(n_layer=3, n_head=3)
    return config


def test_cfgnode_reads_and_writes_attributes():
    config = nested_config()
    config.batch_size = 16
    assert config.lr == 3e-4
    assert config.model.n_layer == 3
    assert config.batch_size == 16


def test_cfgnode_to_dict_is_nested_and_plain():
    assert nested_config().to_dict() == {'lr': 3e-4, 'name': 'nano',
                                         'model': {'n_layer': 3, 'n_head': 3}}


def test_merge_from_dict_updates_nested_nodes_and_keeps_other_settings():
    config = nested_config()
    config.merge_from_dict({'lr': 1e-3, 'model': {'n_layer': 6}, 'new': 1})
    assert config.to_dict() == {'lr': 1e-3, 'name': 'nano', 'model': {'n_layer': 6, 'n_head': 3},
                                'new': 1}
    assert isinstance(config.model, CfgNode)


def test_cfgnode_prints_one_key_value_line_per_setting():
    lines = str(nested_config()).splitlines()
    assert 'lr: 0.0003' in lines
    assert "name: 'nano'" in lines
    assert 'model:' in lines
    assert any(re.fullmatch(r'\s+n_layer: 3', line) for line in lines)


def test_set_seed_makes_random_numbers_repeat():
    set_seed(123)
    first = (torch.rand(5), np.random.rand(3), random.random())
    set_seed(123)
    second = (torch.rand(5), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
    set_seed(124)
    assert not torch.equal(torch.rand(5), first[0])
