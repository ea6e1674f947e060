"""A GPT language model, readable top to bottom: config, attention, block, model.

The public interface follows minGPT (`GPT.get_default_config()`, `model_type='gpt-nano'`,
`model(idx, targets) -> (logits, loss)`, `generate`, `configure_optimizers`, `from_pretrained`), and
so do the parameter names (`transformer.wte`, `transformer.h.0.attn.c_attn`, `lm_head`, ...): a
minGPT state dict loads as it is, and ours loads into minGPT with strict=False (it lacks only the
causal masks minGPT keeps as buffers). Our additions: `output_size`, the width of the output head (1
for a reward model), `attention_maps`, a key/value cache for `generate`, and
`CausalSelfAttention.query_key_value`, the projections its attention starts from.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mingpt.utils import CfgNode

# (n_layer, n_head, n_embd) of the named model sizes, as in minGPT.
PRESETS = {
    'openai-gpt': (12, 12, 768),
    'gpt2': (12, 12, 768),
    'gpt2-medium': (24, 16, 1024),
    'gpt2-large': (36, 20, 1280),
    'gpt2-xl': (48, 25, 1600),
    'gopher-44m': (8, 16, 512),
    'gpt-mini': (6, 6, 192),
    'gpt-micro': (4, 4, 128),
    'gpt-nano': (3, 3, 48),
}
# The sizes whose weights OpenAI published (as GPT-2), which from_pretrained can load.
PRETRAINED = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')


class PretrainedWeightsUnavailable(RuntimeError):
    """GPT.from_pretrained cannot load the weights without a download, which it never attempts."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier positions."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # queries, keys and values
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.register_load_state_dict_pre_hook(_drop_causal_mask_buffer)

    def query_key_value(self, x):
        """The queries, keys and values the forward pass attends with, split into heads: x (B, T, C)
        -> three tensors (B, n_head, T, C // n_head). Public for code that arranges the attention
        itself, such as a pass over many sequences that share prefixes and so share their keys."""
        B, T, C = x.shape
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                     for t in self.c_attn(x).split(C, dim=2))

    def forward(self, x, cache=None):
        """x: (B, T, C) -> (B, T, C). With a cache (a dict, empty for a new sequence), x continues
        the sequence whose keys and values the cache holds, and its own are added to it."""
        q, k, v = self.query_key_value(x)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
            cache['k'], cache['v'] = k, v
        past = k.size(2) - q.size(2)
        # Query i sits at position past + i and sees keys 0 .. past + i. SDPA's own causal mask is
        # aligned top-left, which is right only when there is no past.
        mask = None if past == 0 else \
            torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past)
        # The fused kernel is several times faster than softmax(q k^T) v written out on the CPU.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).flatten(2)))

    def weights(self, x):
        """The attention weights the forward pass uses (without dropout): x (B, T, C) -> (B, n_head, T, T)."""
        q, k, _ = self.query_key_value(x)
        T = x.size(1)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))
        return scores.masked_fill(future, float('-inf')).softmax(dim=-1)


def _drop_causal_mask_buffer(module, state_dict, prefix, *args):
    """minGPT's attention stores its causal mask as a buffer, `attn.bias`, which minGPT state dicts
    therefore hold. The fused kernel needs no mask: the entry is dropped so that such a state dict
    still loads strictly (anything else unexpected is still an error)."""
    state_dict.pop(prefix + 'bias', None)


class MLP(nn.Module):
    """The position-wise feed-forward network of a block, named as minGPT names it."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU(approximate='tanh')  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: attention then an MLP, each added to the residual stream."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer over token ids in [0, vocab_size)."""

    @staticmethod
    def get_default_config():
        C = CfgNode()
        # Either a named size (model_type) or explicit n_layer/n_head/n_embd, never both.
        C.model_type = 'gpt'
        C.n_layer = None
        C.n_head = None
        C.n_embd = None
        # These must be set by the user.
        C.vocab_size = None
        C.block_size = None
        # Width of the output head; None means vocab_size (a language model). A reward model uses 1.
        C.output_size = None
        C.embd_pdrop = 0.1
        C.resid_pdrop = 0.1
        C.attn_pdrop = 0.1
        return C

    def __init__(self, config):
        super().__init__()
        config = _resolved(config)
        self.config = config
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size
        self.output_size = config.output_size or config.vocab_size

        # minGPT's names, so that state dicts carry over. The order in which the layers are made
        # decides which random numbers initialise which weight: keep it.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, self.output_size, bias=False)

        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream so its variance does not grow with depth.
        for block in self.transformer.h:
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(layer.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_pretrained(cls, model_type):
        """OpenAI's GPT-2 (model_type one of PRETRAINED) with the weights that Hugging Face's
        `transformers` has in its local cache. Never downloads: without `transformers` or without
        the weights in the cache it raises PretrainedWeightsUnavailable at once."""
        if model_type not in PRETRAINED:
            raise ValueError(f'no pretrained weights for model_type {model_type!r}; '
                             f"choose one of {', '.join(PRETRAINED)}")
        # Read first, so that a missing library or cache fails before building a large model.
        hf_weights = _cached_hugging_face_weights(model_type)
        config = cls.get_default_config()
        config.model_type = model_type
        config.vocab_size = 50257  # GPT-2's byte-pair vocabulary
        config.block_size = 1024
        model = cls(config)
        # Hugging Face keeps these four as Conv1D weights, (in, out); nn.Linear's are (out, in).
        conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        model.load_state_dict({name: hf_weights[name].t() if name.endswith(conv1d) else hf_weights[name]
                               for name in model.state_dict()})
        return model

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _check_input(self, idx, start=0):
        if idx.dim() != 2:
            raise ValueError(f'idx must have shape (batch, length), got {tuple(idx.shape)}')
        length = start + idx.size(1)
        if length > self.block_size:
            raise ValueError(f'sequence length {length} exceeds block_size {self.block_size}')
        if idx.numel():
            low, high = idx.min().item(), idx.max().item()
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f'token id {bad} is outside [0, {self.vocab_size})')

    def _embed(self, idx, start=0):
        """idx: (B, T) at positions start .. start + T - 1 -> the residual stream's input (B, T, C)."""
        self._check_input(idx, start)
        positions = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids -> logits (B, T, output_size) and the mean cross-entropy over
        positions whose target is not -1 (None when targets is None).

        cache: None, or one dict per block, empty for a new sequence
        (`[{} for _ in model.transformer.h]`).
        The keys and values of idx are added to it, and a later call's idx continues the sequence:
        generation then runs only each new token through the network.
        """
        start = cache[0]['k'].size(2) if cache and cache[0] else 0
        x = self._embed(idx, start)
        blocks = self.transformer.h
        for block, block_cache in zip(blocks, cache or [None] * len(blocks)):
            x = block(x, block_cache)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, idx):
        """idx: (B, T) -> softmax attention weights (n_layer, B, n_head, T, T), causal mask applied,
        computed without dropout whatever the module's mode."""
        was_training = self.training
        self.eval()
        try:
            x = self._embed(idx)
            maps = []
            for block in self.transformer.h:
                maps.append(block.attn.weights(block.ln_1(x)))
                x = block(x)
        finally:
            self.train(was_training)
        return torch.stack(maps)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None,
                 generator=None):
        """Append max_new_tokens tokens to idx (B, T), each predicted from at most block_size
        previous tokens: sampled if do_sample (from `generator`, a torch.Generator, if given), else
        the most likely one."""
        # While every context fits in block_size (the last token is sampled, never read), the keys
        # and values of the tokens so far are cached and each step runs only the new token. Beyond
        # that the context is cropped to the last block_size tokens, every position shifts, and
        # each step recomputes it.
        longest_context = idx.size(1) + max_new_tokens - 1
        cache = [{} for _ in self.transformer.h] if longest_context <= self.block_size else None
        new_tokens = idx
        for _ in range(max_new_tokens):
            context = new_tokens if cache is not None else idx[:, -self.block_size:]
            logits, _ = self(context, cache=cache)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth_largest = torch.topk(logits, top_k).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_largest, float('-inf'))
            if do_sample:
                next_token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            else:
                next_token = logits.argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, next_token), dim=1)
            new_tokens = next_token
        return idx

    def configure_optimizers(self, train_config):
        """AdamW with weight decay on the weights of Linear layers only (not on biases,
        LayerNorm or embeddings)."""
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        groups = [
            {'params': [p for p in params if id(p) in decayed], 'weight_decay': train_config.weight_decay},
            {'params': [p for p in params if id(p) not in decayed], 'weight_decay': 0.0},
        ]
        # The fused kernel updates all tensors in one call: for a model this small the per-tensor
        # loop of the default implementation costs ~1 ms a step, a twentieth of the whole step.
        return torch.optim.AdamW(groups, lr=train_config.learning_rate, betas=train_config.betas, fused=True)


def _cached_hugging_face_weights(model_type):
    """The state dict of Hugging Face's GPT2LMHeadModel `model_type`, from the local cache only."""
    needs = (f'GPT.from_pretrained({model_type!r}) needs `pip install transformers` and the '
             f"{model_type} weights in the local Hugging Face cache (it never downloads)")
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise PretrainedWeightsUnavailable(f'{needs}: transformers is not installed') from None
    try:
        return GPT2LMHeadModel.from_pretrained(model_type, local_files_only=True).state_dict()
    except OSError as error:  # what transformers raises for files that are not in the cache
        raise PretrainedWeightsUnavailable(f'{needs}: {model_type} is not in the cache') from error


def _resolved(config):
    """A checked copy of config with n_layer/n_head/n_embd filled in from the preset if one is named."""
    config = CfgNode(**config.to_dict())
    sizes = (config.n_layer, config.n_head, config.n_embd)
    has_preset = config.model_type is not None
    has_sizes = any(s is not None for s in sizes)
    if has_preset and has_sizes:
        raise ValueError(f"give either model_type ({config.model_type!r}) or n_layer/n_head/n_embd, "
                         "not both (set model_type=None to use explicit sizes)")
    if has_preset:
        if config.model_type not in PRESETS:
            raise ValueError(f'unknown model_type {config.model_type!r}; '
                             f"choose one of {', '.join(PRESETS)} or set explicit sizes")
        config.n_layer, config.n_head, config.n_embd = PRESETS[config.model_type]
    elif not all(s is not None for s in sizes):
        raise ValueError('give a model_type or all of n_layer, n_head and n_embd')
    if config.n_embd % config.n_head:
        raise ValueError(f'n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})')
    for name in ('vocab_size', 'block_size'):
        if not isinstance(getattr(config, name), int) or getattr(config, name) <= 0:
            raise ValueError(f'{name} must be a positive integer, got {getattr(config, name)!r}')
    return config
