"""The public minGPT interface: GPT, Trainer, CfgNode, set_seed and setup_logging behave as
minGPT's do, and GPT's state dicts are minGPT's."""
import functools
import json
import math
import multiprocessing
import random
import re
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mingpt import model as model_module
from mingpt.model import GPT, PretrainedWeightsUnavailable
from mingpt.trainer import Trainer
from mingpt.utils import CfgNode, set_seed, setup_logging

# The models here are tiny: a second thread only adds overhead, and on a shared machine whose other
# core is busy it makes every step wait for it (tens of times slower).

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
    cache = [{} for _ in model.transformer.h]
    with torch.no_grad():
        full, _ = model(idx)
        ends = np.cumsum(pieces)
        parts = [model(idx[:, end - size:end], cache=cache)[0] for size, end in zip(pieces, ends)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_a_cache_does_not_let_a_sequence_grow_past_block_size():
    model = tiny_model().eval()
    cache = [{} for _ in model.transformer.h]
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


def test_generation_far_beyond_block_size_samples_each_token_from_the_top_k_after_the_last_block():
    model = tiny_model(block_size=128).eval()
    idx = random_tokens((2, 5))
    out = model.generate(idx, max_new_tokens=500, do_sample=True, top_k=3,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 505)
    assert torch.equal(out[:, :5], idx)
    # Before, at and long after the context first fills the block: the token is one of the 3 most
    # likely after the last 128 tokens (3 of 7, so a wrong context or no top-k would show).
    with torch.no_grad():
        for step in (0, 123, 124, 300, 499):
            logits, _ = model(out[:, :5 + step][:, -128:])
            top = logits[:, -1].topk(3).indices
            assert (top == out[:, 5 + step, None]).any(dim=1).all(), step


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
    assert len(model.transformer.h) == n_layer
    assert all(block.attn.n_head == n_head for block in model.transformer.h)
    assert model.transformer.wte.embedding_dim == n_embd


def test_building_a_model_does_not_change_the_callers_config():
    config = GPT.get_default_config()
    config.model_type = 'gpt-nano'
    config.vocab_size, config.block_size = VOCAB, BLOCK
    before = config.to_dict()
    GPT(config)
    assert config.to_dict() == before
    GPT(config)  # and so the same config builds a second model


# --- minGPT's state dicts ------------------------------------------------------------------------

def minGPT_shapes(n_layer, n_embd, vocab_size, block_size, with_masks):
    """The names and shapes of a minGPT GPT's state dict, written out from minGPT's module layout.
    with_masks: include the causal masks (`attn.bias`) that minGPT's attention keeps as buffers."""
    C = n_embd
    shapes = {'transformer.wte.weight': (vocab_size, C), 'transformer.wpe.weight': (block_size, C)}
    for layer in range(n_layer):
        h = f'transformer.h.{layer}.'
        shapes.update({
            h + 'ln_1.weight': (C,), h + 'ln_1.bias': (C,),
            h + 'attn.c_attn.weight': (3 * C, C), h + 'attn.c_attn.bias': (3 * C,),
            h + 'attn.c_proj.weight': (C, C), h + 'attn.c_proj.bias': (C,),
            h + 'ln_2.weight': (C,), h + 'ln_2.bias': (C,),
            h + 'mlp.c_fc.weight': (4 * C, C), h + 'mlp.c_fc.bias': (4 * C,),
            h + 'mlp.c_proj.weight': (C, 4 * C), h + 'mlp.c_proj.bias': (C,),
        })
        if with_masks:
            shapes[h + 'attn.bias'] = (1, 1, block_size, block_size)
    shapes.update({'transformer.ln_f.weight': (C,), 'transformer.ln_f.bias': (C,),
                   'lm_head.weight': (vocab_size, C)})
    return shapes


def minGPT_state_dict(with_masks, seed=0):
    """Random weights under minGPT's names for tiny_config's sizes (masks as minGPT fills them)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = minGPT_shapes(2, 16, VOCAB, BLOCK, with_masks)
    return {name: torch.ones(shape).tril() if name.endswith('.attn.bias')
            else 0.3 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def minGPT_logits(weights, idx, n_layer=2, n_head=2):
    """What minGPT's forward pass computes from `weights` (without dropout), in plain tensor ops."""
    B, T = idx.shape
    x = weights['transformer.wte.weight'][idx] + weights['transformer.wpe.weight'][:T]
    C = x.size(-1)

    def linear(x, name):
        return x @ weights[name + '.weight'].T + weights[name + '.bias']

    def layer_norm(x, name):
        return F.layer_norm(x, (C,), weights[name + '.weight'], weights[name + '.bias'])

    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    for layer in range(n_layer):
        h = f'transformer.h.{layer}.'
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2)
                   for t in linear(layer_norm(x, h + 'ln_1'), h + 'attn.c_attn').split(C, dim=2))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(C // n_head)).masked_fill(future, float('-inf'))
        x = x + linear((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C), h + 'attn.c_proj')
        hidden = F.gelu(linear(layer_norm(x, h + 'ln_2'), h + 'mlp.c_fc'), approximate='tanh')
        x = x + linear(hidden, h + 'mlp.c_proj')
    return layer_norm(x, 'transformer.ln_f') @ weights['lm_head.weight'].T


def test_the_state_dict_has_minGPTs_names_and_shapes_less_the_causal_masks():
    # So it loads into minGPT's GPT with strict=False, which then reports only the attn.bias masks
    # as missing; minGPT makes those itself.
    model = tiny_model()
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == \
        minGPT_shapes(2, 16, VOCAB, BLOCK, with_masks=False)


@pytest.mark.parametrize('with_masks', [False, True], ids=['without_masks', 'with_masks'])
def test_a_minGPT_state_dict_loads_strictly_and_gives_the_logits_minGPT_computes(with_masks):
    weights = minGPT_state_dict(with_masks)
    model = tiny_model(seed=1).eval()
    model.load_state_dict(weights)
    assert weights.keys() == minGPT_shapes(2, 16, VOCAB, BLOCK, with_masks).keys()  # the caller's dict is kept
    same_weights = tiny_model(seed=2).eval()
    same_weights.load_state_dict(minGPT_state_dict(with_masks=False))
    idx = random_tokens((3, BLOCK))
    with torch.no_grad():
        logits, _ = model(idx)
        assert torch.equal(logits, same_weights(idx)[0])
        assert torch.allclose(logits, minGPT_logits(weights, idx), atol=1e-5)


def test_other_unexpected_entries_still_fail_strict_loading():
    weights = minGPT_state_dict(with_masks=True)
    weights['transformer.h.0.attn.masked_bias'] = torch.tensor(-1e4)
    with pytest.raises(RuntimeError, match='masked_bias'):
        tiny_model().load_state_dict(weights)


# --- from_pretrained ------------------------------------------------------------------------------

def fake_transformers(from_pretrained):
    """A stand-in for the `transformers` package whose GPT2LMHeadModel.from_pretrained is given."""
    module = types.ModuleType('transformers')
    module.GPT2LMHeadModel = types.SimpleNamespace(from_pretrained=from_pretrained)
    return module


def test_from_pretrained_names_the_models_it_has_weights_for():
    with pytest.raises(ValueError, match=r"'gpt-nano'.*gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPT.from_pretrained('gpt-nano')


def test_from_pretrained_without_transformers_says_what_it_needs_at_once(monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers now fails
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable,
                       match='pip install transformers.*local Hugging Face cache.*not installed'):
        GPT.from_pretrained('gpt2')
    # Before any model is built (gpt2 alone takes seconds) or anything is fetched.
    assert time.perf_counter() - start < 1.0


def test_from_pretrained_reads_only_the_local_cache_and_says_so_when_the_weights_are_not_there(monkeypatch):
    calls = []

    def not_cached(name, **options):
        calls.append((name, options))
        raise OSError(f'{name} is not in the cache and local_files_only is set')

    monkeypatch.setitem(sys.modules, 'transformers', fake_transformers(not_cached))
    with pytest.raises(PretrainedWeightsUnavailable, match='gpt2-medium is not in the cache'):
        GPT.from_pretrained('gpt2-medium')
    assert calls == [('gpt2-medium', {'local_files_only': True})]


def test_from_pretrained_transposes_hugging_faces_conv1d_weights(monkeypatch):
    # gpt2's vocabulary and context at a tiny width, so that the test builds no 124M-weight model.
    monkeypatch.setitem(model_module.PRESETS, 'gpt2', (2, 2, 8))
    config = GPT.get_default_config()
    config.model_type, config.vocab_size, config.block_size = 'gpt2', 50257, 1024
    torch.manual_seed(3)
    source = GPT(config)
    conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    # Hugging Face's layout: Conv1D weights are (in, out), and the attention keeps a buffer more.
    hf_weights = {name: t.t() if name.endswith(conv1d) else t for name, t in source.state_dict().items()}
    hf_weights['transformer.h.0.attn.masked_bias'] = torch.tensor(-1e4)
    hf_model = types.SimpleNamespace(state_dict=lambda: hf_weights)
    monkeypatch.setitem(sys.modules, 'transformers', fake_transformers(lambda name, **options: hf_model))

    model = GPT.from_pretrained('gpt2')
    assert (model.config.vocab_size, model.config.block_size) == (50257, 1024)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (24, 8)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], t) for name, t in source.state_dict().items())


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

    hooks = [block.attn.register_forward_hook(record) for block in model.transformer.h]
    with torch.no_grad():
        model(idx)
        for hook in hooks:
            hook.remove()
        maps = model.attention_maps(idx)
        for layer, block in enumerate(model.transformer.h):
            x = inputs[layer]  # (B, T, C), the block's ln_1 output
            B, T, _ = x.shape
            _, _, v = block.attn.c_attn(x).split(C, dim=2)
            v = v.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)
            mixed = (maps[layer] @ v).transpose(1, 2).reshape(B, T, C)
            assert torch.allclose(block.attn.c_proj(mixed), outputs[layer], atol=1e-5)


def test_causal_attention_written_out_from_the_public_queries_keys_and_values_is_the_forward_pass():
    attention = tiny_model().eval().transformer.h[0].attn
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, v = attention.query_key_value(x)
        assert q.shape == k.shape == v.shape == (2, 2, 7, 8)  # (B, n_head, T, head size)
        future = torch.ones(7, 7, dtype=torch.bool).triu(diagonal=1)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(future, float('-inf')).softmax(dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(2, 7, 16)
        assert torch.allclose(attention.c_proj(mixed), attention(x), atol=1e-6)


# --- optimizer ------------------------------------------------------------------------------------

def test_weight_decay_applies_to_exactly_the_linear_weights():
    model = tiny_model(output_size=3)
    train_config = Trainer.get_default_config()
    optimizer = model.configure_optimizers(train_config)
    decayed, not_decayed = optimizer.param_groups
    assert decayed['weight_decay'] == train_config.weight_decay
    assert not_decayed['weight_decay'] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    # Two blocks of (c_attn, c_proj, the MLP's c_fc and c_proj) plus the head.
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


class Enough(Exception):
    """How a callback ends a run that has no max_iters."""


def test_without_max_iters_training_runs_until_a_callback_stops_it_and_leaves_no_workers(recwarn):
    config = Trainer.get_default_config()  # max_iters None, minGPT's 4 worker processes
    config.batch_size = 8
    trainer = Trainer(config, tiny_model(), NextTokenDataset(64))
    before = set(multiprocessing.active_children())
    workers = []

    def stop_after_seven_steps(trainer):
        workers.append(len(set(multiprocessing.active_children()) - before))
        if trainer.iter_num == 6:
            raise Enough

    trainer.set_callback('on_batch_end', stop_after_seven_steps)
    with pytest.raises(Enough) as stopped:
        trainer.run()
    assert trainer.iter_num == 6 and len(workers) == 7
    assert workers == [4] * 7
    # Gone at once, although `stopped` keeps the traceback and with it run()'s frame, as a notebook
    # keeps the last error.
    assert stopped.traceback and set(multiprocessing.active_children()) - before == set()
    # More workers than CPUs is fine here, and torch's warning about it is not shown.
    assert not [warning for warning in recwarn if 'DataLoader' in str(warning.message)]


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


# --- merge_from_args and setup_logging ------------------------------------------------------------

def command_line_config():
    return CfgNode(lr=3e-4, steps=10, betas=(0.9, 0.95), flag=True, name='nano', work_dir=None,
                   model=CfgNode(n_layer=3, attention=CfgNode(n_head=3)))


@pytest.mark.parametrize('arg, path, value', [
    ('--steps=12', 'steps', 12),
    ('--lr=1e-3', 'lr', 1e-3),
    ('--betas=(0.9, 0.99)', 'betas', (0.9, 0.99)),
    ('--flag=False', 'flag', False),
    ('--name=None', 'name', None),
    ('--name=gpt-mini', 'name', 'gpt-mini'),  # not a literal: kept as text
    ("--name='42'", 'name', '42'),  # a quoted literal is a string
    ('--work_dir=./out/run 2', 'work_dir', './out/run 2'),
    ('--name=a=b', 'name', 'a=b'),  # only the first = separates name and value
    ('--model.n_layer=6', 'model.n_layer', 6),
    ('--model.attention.n_head=4', 'model.attention.n_head', 4),
])
def test_merge_from_args_parses_literals_keeps_other_text_and_walks_nested_nodes(arg, path, value):
    config = command_line_config()
    config.merge_from_args([arg])
    expected = command_line_config().to_dict()
    *groups, leaf = path.split('.')
    node = expected
    for group in groups:
        node = node[group]
    node[leaf] = value
    assert config.to_dict() == expected  # that setting, and no other
    # 1 == 1.0 == True: the type shows what the text was parsed as.
    assert type(functools.reduce(getattr, path.split('.'), config)) is type(value)


@pytest.mark.parametrize('arg, message', [
    ('--steps', "'--steps' is not of the form --name=value"),
    ('steps=3', "'steps=3' is not of the form --name=value"),
    ('-steps=3', "'-steps=3' is not of the form --name=value"),
    ('--stpes=3', "there is no setting 'stpes'"),
    ('--to_dict=3', "there is no setting 'to_dict'"),  # a method, not a setting
    ('--model.n_layr=3', "there is no setting 'model.n_layr'"),
    ('--model.attention.heads=3', "there is no setting 'model.attention.heads'"),
    ('--modle.n_layer=3', "there is no group of settings 'modle'"),
    ('--steps.x=3', "there is no group of settings 'steps'"),
    ('--model=3', "'model' is a group of settings"),
])
def test_merge_from_args_rejects_malformed_arguments_and_unknown_settings_naming_them(arg, message):
    config = command_line_config()
    with pytest.raises(ValueError, match=re.escape(message)):
        config.merge_from_args([arg])
    assert config.to_dict() == command_line_config().to_dict()


def test_setup_logging_writes_the_command_line_and_every_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train.py', '--model.n_layer=6'])
    work_dir = tmp_path / 'runs' / 'first'  # a Path, and two folders that do not exist yet
    config = CfgNode(system=CfgNode(seed=1, work_dir=work_dir), model=CfgNode(n_layer=6, betas=(1, 2)))
    setup_logging(config)
    assert (work_dir / 'args.txt').read_text() == 'train.py --model.n_layer=6'
    text = (work_dir / 'config.json').read_text()
    assert json.loads(text) == {'system': {'seed': 1, 'work_dir': str(work_dir)},
                                'model': {'n_layer': 6, 'betas': [1, 2]}}
    assert '\n    "system": {\n        "seed": 1,' in text  # indented, one setting a line


def test_setup_logging_needs_a_work_dir():
    with pytest.raises(ValueError, match=re.escape('config.system.work_dir')):
        setup_logging(CfgNode(model=CfgNode(n_layer=3)))
