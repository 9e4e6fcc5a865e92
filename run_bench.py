"""Benchmarks that print figures (never timed tests).

    python run_bench.py speed [--model smollm2] [--new-tokens 64] [--batch-sizes 1 8] [--device auto] [--dtype float32]
                              [--student-merges 256]
    python run_bench.py extension [--model smollm2] [--corpus stdlib] [--merges 64 128 256 512] [--tasks bench_tasks]
                                  [--max-literal-shares 1.0 0.55]
    python run_bench.py train-speed [--random-weights] [--batch-sizes 4] [--seq-len 128] [--device auto]
                                    [--windows new_tokens] [--profile] [--run RUN_DIR [--peft]]
    python run_bench.py matrix [--config configs/bench_cpu.json] [--inits fvt] [--objectives kl] [--out-dir DIR]
                               [--kl-variants '{"name": "kl-lr2e-3", "lr": 0.002}' ...] [--set steps=100 ...]
    python run_bench.py heldout RUN_DIR [RUN_DIR ...] [--device auto] [--lift path|trie]
    python run_bench.py lift [--min-probs 0.1 0.03 0.01 0.001] [--chars 20000]
    python run_bench.py evaluator [--tasks bench_tasks] [--workers 0] [--repeats 3]
    python run_bench.py codegen [--run RUN_DIR] [--tasks bench_tasks] [--max-new-tokens 256]
    python run_bench.py inits [--config configs/default.json] [--inits fvt last_piece/first_piece ...] [--steps 50]
    python run_bench.py rows RUN_DIR [RUN_DIR ...] [--teacher runs/teacher-codegen.json] [--against RUN_DIR]
                             [--plot docs/payoff-cpu.png]
    python run_bench.py gen-speed --run RUN_DIR [--n-tasks 20] [--batch-size 1] [--rounds 2]

speed: model load time; greedy decoding tokens/s at each batch size; and, when
`transformers` (+ gguf, accelerate) is installed by hand, the same figures for
transformers' own loading and `generate` in the same process (a ratio), plus the largest
logit difference between the two loaders on a few prompts. transformers is a reference
here, never a dependency of kld.

extension: the tokens that K appended merges save on the held-out files of the corpus that
the corpus rule keeps and on the tasks' prompts + canonical solutions, and how many new
tokens are pieces of codec or Unicode-name tables, for each corpus rule (max_literal_share)
and newline rule (`newline`); then the time to encode the corpus against the base
tokenizer alone, and the time of one path-mode lift (without the teacher's pass).

train-speed: student tokens/s and peak memory of one training step (student forward,
teacher forward and lift for kl, backward, AdamW) at each batch size, every objective on
the same windows, and each step's cost against the ce step's; kl-cached is the kl step
whose lifted targets an earlier pass cached (lifted_targets), the amortised cost of an
epoch or a matrix cell after the first. --run times a finished run's student; --peft (transformers and peft installed by hand) adds the peer: the same
new rows trained by cross-entropy through peft's TrainableTokens, on the same windows.

matrix: one bench config (configs/bench_cpu.json, configs/bench_gpu.json) runs every
initialiser x objective (training a cell unless it was trained earlier under the same
training config), evaluates each student and the teacher on the code-generation tasks, and
writes bench.json, bench.csv, report.md (table, intervals, paired comparisons, where the
new rows sit) and, with matplotlib installed, embeddings.png.

heldout: each finished run's student on its own held-out text: bits per character, KL to
the lifted teacher, the share of new tokens in the text, and at the positions whose next
token is new, the mass the student and the lifted teacher put on new tokens (does the
student expect its new tokens where they occur?), and the targets' own bits per character.

lift: path against trie mode (at each threshold), each with and without conditioning on
the student's previous token, on held-out code: the targets' own bits per character, the
mass they put on new tokens, their total variation to the most exact trie mode, the extra
teacher tokens and time they cost; and how often tau' is not the longest match.

evaluator: the cost per program of judging the tasks' canonical solutions: as one program
with its tests (HumanEval's harness, `sandbox_run_all`) and as two processes whose answers
cross only as plain values (`run_tests_all`, what `evaluate_codegen` uses): wall seconds per
program with `workers` running at once, the best of `repeats` rounds.

codegen: one model on the code-generation tasks, as the matrix evaluates a row: the
teacher of --config, or the student of a finished run (--run); pass@1 with its interval,
adoption, the saving realised on its own text, characters per second; codegen.json.

inits: initialisers of the new rows, each pair (input/output) held out at step 0 and
after a few steps of a config's training from the same extension and windows (Beyond
Initialization Loss ranks them after about 50 steps, not at step 0).

rows: finished runs, each with its codegen.json, as the benchmark's table rows: held-out
bits/char, KL and mass on new tokens; pass@1, paired against the teacher's programs
(`codegen` without --run); adoption, the saving realised, chars/s and the run's seconds;
with --plot, the rows as a curve over run time (the payoff curve). --against pairs them
with another run's programs instead (KL against CE).

gen-speed: a finished run's student and its teacher decode the same prompts in one
process, turn about: characters/s and its ratio, split into tokens/s (a step's cost)
and characters per token (the text a step writes).
"""

import argparse
import cProfile
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import platform
import re
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import kld

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a function is_palindrome(s) that ignores case and spaces.",
    "Explain what a Python generator is, with an example.",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"",
    "Write a class Stack with push, pop and peek.",
    "How do I read a CSV file with the csv module?",
    "Write a function that counts the words in a string.",
    "Write a binary search over a sorted list that returns the index or -1.",
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def kld_tokens_per_s(model, tok, prompts, new_tokens, stop=()):
    """Greedy tokens/s, every row forced to the full budget (no stop tokens; stop strings
    that never occur still cost their check at every step)."""
    kld.generate(model, tok, prompts[:1], kld.Decoding(max_new_tokens=4))  # warm-up
    decoding = kld.Decoding(max_new_tokens=new_tokens, batch_size=len(prompts), stop=tuple(stop))
    outs, seconds = timed(lambda: kld.generate(model, tok, prompts, decoding))
    return sum(len(o.token_ids) for o in outs) / seconds


def student_speed(model, tokenizer, prompts, args):
    """The cost of a generated token, teacher against an FVT student of `args.student_merges`
    merges, at the same batch sizes, every row at the full budget, with a stop string that
    never occurs (so its check runs at every step, as in code generation)."""
    never = ["<never in the output>"]
    teacher_tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
    teacher_speed = {}  # batch size -> tokens/s
    for b in args.batch_sizes:
        teacher_speed[b] = kld_tokens_per_s(model, teacher_tok, prompts[:b], args.new_tokens, never)
    train, _ = kld.load_corpus("stdlib")
    tok = kld.build_extension(tokenizer, train, args.student_merges, model.cfg.vocab_size)
    kld.init_new_rows(model, tok, "fvt", "fvt", seed=0)
    for b in args.batch_sizes:
        student = kld_tokens_per_s(model, tok, prompts[:b], args.new_tokens, never)
        print(f"batch {b}: teacher {teacher_speed[b]:.1f} tok/s, student ({args.student_merges} new tokens) "
              f"{student:.1f} tok/s; the student's cost per token is {teacher_speed[b] / student:.3f}x the teacher's")


def hf_tokens_per_s(hf_model, tokenizer, prompts, new_tokens, pad_id):
    """The same prompt ids through transformers' generate (left padding, greedy)."""
    ids = [tokenizer.encode(p).ids for p in prompts]
    width = max(map(len, ids))
    device = hf_model.device
    input_ids = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    hf_model.generate(input_ids[:1], attention_mask=mask[:1], **dict(kwargs, max_new_tokens=4, min_new_tokens=4))
    out, seconds = timed(lambda: hf_model.generate(input_ids, attention_mask=mask, **kwargs))
    return (out.shape[1] - width) * len(prompts) / seconds


# SmolLM2-135M's shape, for timing where its file is not installed (decoding speed does
# not depend on the weights' values); the tokenizer is then the tiny fixture's.
SMOLLM2_135M = kld.ModelConfig(arch="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                               d_ff=1536, head_dim=64, max_positions=8192, norm_eps=1e-5, rope_theta=100000.0)


# Qwen2-0.5B's shape: a 152k vocabulary, the case a memory-light loss is for.
QWEN2_05B = kld.ModelConfig(arch="llama", vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896,
                            d_ff=4864, head_dim=64, max_positions=32768, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True)
RANDOM_SHAPES = {"smollm2": SMOLLM2_135M, "qwen2": QWEN2_05B}


def random_model(device, dtype, shape: str = "smollm2", layers: int = 0):
    """A model of a known shape (the first `layers` blocks when given) with random weights,
    and the tiny fixture tokenizer: for speed and memory, not for quality."""
    from tokenizers import Tokenizer

    cfg = RANDOM_SHAPES[shape]
    if layers:
        cfg = dataclasses.replace(cfg, n_layer=layers)
    model = kld.GPT(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, Tokenizer.from_file("fixtures/tokenizer.json")


def speed(args):
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name()}")
    device, dtype = kld.resolve_device(args.device), kld.resolve_dtype(args.dtype)
    print(f"device: {device}, {args.dtype}")
    if args.random_weights:
        (model, tokenizer), load_s = timed(lambda: random_model(device, dtype))
        print("model: SmolLM2-135M's shape with random weights (no load time, no reference)")
        prompts = [kld.format_chat(p) for p in PROMPTS] * 8
        teacher_tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
        for b in args.batch_sizes:
            print(f"batch {b}: kld {kld_tokens_per_s(model, teacher_tok, prompts[:b], args.new_tokens):.1f} tok/s")
        return
    path = kld.resolve_model_path(args.model)
    (model, tokenizer), load_s = timed(lambda: kld.load_model(path, device=device, dtype=dtype))
    print(f"kld load: {load_s:.2f} s  ({path.name})")
    prompts = [kld.format_chat(p) for p in PROMPTS]
    if args.student_merges:
        return student_speed(model, tokenizer, prompts, args)
    teacher_tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
    ours = {b: kld_tokens_per_s(model, teacher_tok, prompts[:b], args.new_tokens) for b in args.batch_sizes}
    reference = importlib.util.find_spec("transformers") and path.suffix == ".gguf"
    if not reference:
        for b, tps in ours.items():
            print(f"batch {b}: kld {tps:.1f} tok/s (transformers not installed: no reference)")
        return
    from transformers import AutoModelForCausalLM

    hf_model, hf_load_s = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype).to(device).eval())
    print(f"transformers load: {hf_load_s:.2f} s")
    with torch.no_grad():
        worst = 0.0
        for p in prompts:
            ids = torch.tensor([tokenizer.encode(p).ids], device=device)
            worst = max(worst, (model(ids) - hf_model(ids).logits).abs().max().item())
    print(f"largest logit difference kld vs transformers over {len(prompts)} prompts: {worst:.2e}")
    pad_id = tokenizer.token_to_id("<|im_end|>") or 0
    for b, tps in ours.items():
        ref = hf_tokens_per_s(hf_model, tokenizer, prompts[:b], args.new_tokens, pad_id)
        print(f"batch {b}: kld {tps:.1f} tok/s, transformers {ref:.1f} tok/s, ratio {tps / ref:.2f}x")


TABLE_PIECE = re.compile(r"\\[xuUN]|0x[0-9A-Fa-f]|^ ?[A-Z]{3,}( [A-Z]+)*$")  # hex, escapes, Unicode names


def table_like(tok: kld.ExtendedTokenizer, ids) -> int:
    """How many of these tokens are pieces of codec and Unicode-name tables (TABLE_PIECE)."""
    return sum(bool(TABLE_PIECE.search(tok.token_string(i).strip("\n"))) for i in ids)


def saving(tok: kld.ExtendedTokenizer, base_ids: list[list[int]]) -> float:
    """1 - |tau'(x)| / |tau(x)| over these texts."""
    return 1 - sum(len(tok.merge(ids)) for ids in base_ids) / sum(map(len, base_ids))


def extension(args):
    """Tokens saved on held-out code and on the tasks' code at each K, under each corpus rule
    and newline rule; table-like new tokens; what learning, encoding and one lift cost."""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    model, tokenizer = kld.load_model(args.model)
    V = model.cfg.vocab_size
    encode = lambda texts: [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    _, heldout = kld.load_corpus(args.corpus)  # held-out code that the default rule keeps
    tasks = kld.read_tasks(args.tasks)
    measured = {"held-out": encode(heldout), "tasks": encode([t.prompt + t.canonical_solution for t in tasks])}
    print(f"measured on: {len(heldout)} held-out files of {args.corpus} that the corpus rule keeps; "
          f"{len(tasks)} tasks of {args.tasks} (prompt + canonical solution)")
    K, table = max(args.merges), []
    for share in args.max_literal_shares:
        train, _ = kld.load_corpus(args.corpus, max_literal_share=share)
        for newline in kld.NEWLINE_RULES:
            ext, learn_s = timed(lambda: kld.build_extension(tokenizer, train, K, V, newline=newline))
            print(f"max_literal_share {share}, newline {newline}: {len(train)} train files "
                  f"({sum(map(len, train)) / 1e6:.1f} M chars), {K} merges learned in {learn_s:.0f} s")
            for k in sorted(args.merges):
                sub = kld.ExtendedTokenizer(tokenizer, ext.merges[:k], V)
                table.append([share, newline, k, table_like(sub, range(V, V + k)),
                              *(100 * saving(sub, ids) for ids in measured.values())])
    print("\n| max_literal_share | newline | K | table-like new tokens | saving held-out % | saving tasks % |")
    print("|---|---|---|---|---|---|")
    for share, newline, k, n_table, held, on_tasks in table:
        print(f"| {share} | {newline} | {k} | {n_table} | {held:.1f} | {on_tasks:.1f} |")
    train, _ = kld.load_corpus(args.corpus)
    ext = kld.build_extension(tokenizer, train, K, V)
    print("\nfirst merges:", [ext.token_string(V + i) for i in range(12)])
    base_ids, base_s = timed(lambda: encode(train))
    fresh = kld.ExtendedTokenizer(tokenizer, ext.merges, V)  # empty memo: the cost a new run pays
    student_ids, student_s = timed(lambda: fresh.encode_batch(train))
    print(f"encode the train corpus: base {base_s:.2f} s, extended {student_s:.2f} s "
          f"(ratio {student_s / base_s:.2f}; {sum(map(len, base_ids))} -> {sum(map(len, student_ids))} tokens)")
    window = next(ids for ids in student_ids if len(ids) >= 512)[:512]
    teacher_ids = list(ext.expand(window))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([teacher_ids]))[0].float(), -1)
    first = len(ext.expand(window[:1]))  # the first student token is context only
    rows = kld.TeacherRows.of_logp(logp[first - 1 : -1])
    lift_args = (rows, teacher_ids[first:], kld.coarsening_span_starts(window[1:], ext), kld.lift_trie(ext))
    targets, _ = kld.lift(*lift_args, prev_token=window[0])  # warm-up
    lift_s = statistics.median(timed(lambda: kld.lift(*lift_args, prev_token=window[0]))[1] for _ in range(7))
    softmax_s = statistics.median(timed(lambda: torch.log_softmax(logp[first - 1 : -1], -1))[1] for _ in range(7))
    n_candidates = int((targets.new_logp > -math.inf).sum())
    print(f"path-mode lift of one window ({len(window)} student / {len(teacher_ids)} teacher tokens, "
          f"{n_candidates} new-token targets): {lift_s * 1000:.1f} ms, median of 7 "
          f"(one log_softmax of the window's teacher logits: {softmax_s * 1000:.1f} ms)")


def train_speed(args):
    """Training tokens/s and peak memory of the new rows' training step (forward, lift, backward, AdamW)."""
    device = kld.resolve_device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}")
    if args.peft and not args.run:
        raise kld.KldError("--peft times peft on a finished run's student: give --run")
    if args.run:  # the run's extension and trained rows, its corpus
        model, tok = kld.load_student(args.run, device=device)
        model.new_in.requires_grad_(True)
        model.new_out.requires_grad_(True)
        run_cfg = kld.load_config(str(Path(args.run) / "config.json"))
        train, _ = kld.load_corpus(run_cfg.corpus, run_cfg.heldout_fraction, run_cfg.max_literal_share)
        print(f"model: the student of {args.run} ({len(tok.merges)} new tokens); its corpus, windows and lift")
        # the run's windows and lift at this command's sizes
        cfg = dataclasses.replace(run_cfg, seq_len=args.seq_len, seed=0)
    else:
        cfg = kld.Config(windows=args.windows, seq_len=args.seq_len, lift=args.lift, lift_min_prob=args.lift_min_prob)
        if args.random_weights:
            model, tokenizer = random_model(device, torch.float32, args.shape, args.layers)
            print(f"model: {args.shape}'s shape ({model.cfg.n_layer} layers, vocabulary {model.cfg.vocab_size}) "
                  "with random weights, the tiny fixture tokenizer")
        else:
            model, tokenizer = kld.load_model(args.model, device=device)
        train, _ = kld.load_corpus(args.corpus)
        tok = kld.build_extension(tokenizer, train, args.n_merges, model.cfg.vocab_size)
        kld.init_new_rows(model, tok, "fvt", "fvt", seed=0)
    stream = kld.token_stream(tok, train, kld.separator_id(model.cfg))
    optimizer = torch.optim.AdamW([model.new_in, model.new_out], lr=1e-3)
    scratch = tempfile.TemporaryDirectory()  # kl-cached's targets
    lift_cfg = kld.make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition, device)
    cached_lift = kld.make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition, device, scratch.name, model)
    step_s = {}  # (objective, batch size) -> seconds per step
    for objective in args.objectives:
        for batch_size in args.batch_sizes:
            bf16 = kld.cpu_autocast(args.cpu_bf16 and device.type == "cpu")
            if objective == "kl-cached":  # the targets of the steps below, cached as an earlier epoch or run would
                windows = kld.windows_of(cfg, stream, tok.base_vocab_size)
                for _ in range(1 + args.steps):
                    with bf16:
                        kld.lifted_targets(model, tok, [next(windows) for _ in range(batch_size)], cached_lift)
            windows = kld.windows_of(cfg, stream, tok.base_vocab_size)  # seed 0: each the same
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def step():
                batch = [next(windows) for _ in range(batch_size)]
                with bf16:
                    if objective == "hidden":  # hidden-state distillation at --hidden-layer (0: the last)
                        loss = kld.hidden_state_loss(model, tok, batch, args.hidden_layer or model.cfg.n_layer)
                    elif objective == "kl-cached":
                        loss = kld.training_loss(model, tok, batch, "kl", cached_lift, chunk=args.loss_chunk)
                    else:
                        loss = kld.training_loss(model, tok, batch, objective, lift_cfg, chunk=args.loss_chunk)
                optimizer_step(loss, optimizer, device)

            step()  # warm-up
            if not args.steps:  # one step: its peak memory only
                print(f"{objective}: batch {batch_size} x {args.seq_len}, loss_chunk {args.loss_chunk}: "
                      f"peak memory {kld.peak_memory_mb(device):.0f} MB")
                continue
            profile = cProfile.Profile() if args.profile else None
            if profile:
                profile.enable()
            _, seconds = timed(lambda: [step() for _ in range(args.steps)])
            if profile:
                profile.disable()
                pstats.Stats(profile).sort_stats("cumulative").print_stats(r"kld\.py", 15)  # kld's own functions
            tokens = args.steps * batch_size * args.seq_len
            step_s[objective, batch_size] = seconds / args.steps
            print(f"{objective}: batch {batch_size} x {args.seq_len}, loss_chunk {args.loss_chunk}"
                  f"{', bf16 autocast' if args.cpu_bf16 else ''}: {tokens / seconds:.0f} student tok/s, "
                  f"{1000 * seconds / args.steps:.1f} ms/step, peak memory {kld.peak_memory_mb(device):.0f} MB "
                  f"(the process's peak on the CPU: run one setting per process)", flush=True)
    if args.peft:
        for batch_size in args.batch_sizes:
            windows = kld.windows_of(cfg, stream, tok.base_vocab_size)  # seed 0: each the same
            seconds = peft_ce_step_s(args.run, windows, batch_size, args.steps, device)
            step_s["peft ce", batch_size] = seconds
            print(f"peft ce (transformers + peft TrainableTokens): batch {batch_size} x {args.seq_len}: "
                  f"{batch_size * args.seq_len / seconds:.0f} student tok/s, {1000 * seconds:.1f} ms/step", flush=True)
    for (objective, batch_size), seconds in step_s.items():
        if objective != "ce" and ("ce", batch_size) in step_s:
            ratio = seconds / step_s["ce", batch_size]
            print(f"batch {batch_size}: the {objective} step costs {ratio:.2f}x kld's ce step")
    if args.json:  # for a script that sizes a schedule by them
        kld.write_atomic(args.json, json.dumps({f"{o} {b}": s for (o, b), s in step_s.items()}, indent=1) + "\n")


def optimizer_step(loss, optimizer, device):
    """Backward and AdamW; on CUDA, wait for the GPU, so that a timer sees the step's end."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def peft_ce_step_s(run_dir, windows, batch_size: int, steps: int, device) -> float:
    """Seconds per step of the peer: the run's student exported (`kld.py --export`), loaded by
    transformers, its new rows (input and output) trained by peft's TrainableTokens on the
    next-token cross-entropy of the same windows, AdamW, in bf16 autocast on CUDA (where
    kld's step computes the output projection and the loss in float32, a chunk at a time)."""
    from peft import TrainableTokensConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = kld.export_student(run_dir, Path(tmp) / "student")
        hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device)
    n_new = len(kld.read_json_object(Path(run_dir) / "extension.json", "the run's extension")["merges"])
    vocab = hf_model.get_input_embeddings().num_embeddings  # |V'| = |V| + N
    new_ids = list(range(vocab - n_new, vocab))
    try:  # both the input and the output rows, as kld trains them
        config = TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=new_ids)
        peft_model = get_peft_model(hf_model, config)
        trained = "input and output rows"
    except Exception as e:  # an older peft: the input rows alone
        print(f"peft cannot target lm_head ({type(e).__name__}: {e}); timing the input rows alone")
        config = TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=new_ids)
        peft_model = get_peft_model(hf_model, config)
        trained = "input rows"
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    print(f"peft: {sum(p.numel() for p in params)} trainable values ({trained} of {len(new_ids)} new tokens)")

    def step():
        ids = torch.tensor([next(windows) for _ in range(batch_size)], device=device)  # (B, seq_len + 1)
        with kld.autocast(device):
            loss = peft_model(input_ids=ids, labels=ids).loss  # predicts ids[:, 1:], as kld's ce
        optimizer_step(loss, optimizer, device)

    step()  # warm-up
    _, seconds = timed(lambda: [step() for _ in range(steps)])
    return seconds / steps


# ----------------------------------------------------------------------------------------
# The comparison matrix: initialisers x objectives, and the teacher as the reference row
# ----------------------------------------------------------------------------------------

BENCH_KEYS = {"config": "kld config file every cell starts from", "overrides": "kld config fields set on top of it",
              "inits": "initialisers of the new rows", "objectives": "training objectives",
              "kl_variants": "the kl cells of each initialiser: {\"name\": ..., kld config fields} each "
                             "(default [{\"name\": \"kl\"}])",
              "out_dir": "where cells, bench.json, bench.csv and report.md go"}


def read_bench_config(path, changes: dict | None = None):
    """A bench config, with `changes` (the command line's: bench keys, and kld fields under
    "overrides") on top of it."""
    spec = kld.read_json_object(path, "bench config")
    changes = dict(changes or {})
    spec["overrides"] = {**spec.get("overrides", {}), **changes.pop("overrides", {})}
    spec.update(changes)
    unknown = set(spec) - set(BENCH_KEYS)
    if unknown:
        raise kld.KldError(f"unknown bench config keys {sorted(unknown)}; known: {BENCH_KEYS}")
    values = {**(kld.read_json_object(spec["config"], "kld config") if spec.get("config") else {}),
              **spec.get("overrides", {})}
    base = kld.make_config(values, source=path)
    if not base.tasks:
        raise kld.KldError(f"{path}: set overrides.tasks to a task file or directory (e.g. bench_tasks)")
    for init in spec.get("inits", ["random", "mean", "fvt"]):
        if init not in kld.INIT_NAMES:
            raise kld.KldError(f"{path}: unknown initialiser {init!r}")
    for name, fields in kl_cells(spec):
        kld.make_config({**values, **fields}, source=f"{path}: kl variant {name}")
    return spec, values


def kl_cells(spec) -> list[tuple[str, dict]]:
    """(cell name, config fields) of each kl cell: one per entry of spec["kl_variants"]."""
    cells = []
    for entry in spec.get("kl_variants", [{"name": "kl"}]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
            raise kld.KldError(f"a kl variant of the bench is a dict with a name, not {entry!r}")
        cells.append((entry["name"], {"objective": "kl", **{k: v for k, v in entry.items() if k != "name"}}))
    return cells


def matrix_cells(spec) -> list[tuple[str, dict]]:
    """(cell name, config fields) of every student of the matrix: initialisers x objectives,
    the kl objective once per kl variant."""
    cells = []
    for init in spec.get("inits", ["random", "mean", "fvt"]):
        for objective in spec.get("objectives", ["kl", "ce"]):
            variants = kl_cells(spec) if objective == "kl" else [(objective, {"objective": objective})]
            cells += [(f"{init}-{name}", {"init": init, **fields}) for name, fields in variants]
    return cells


def is_trained(cell: Path, cfg) -> bool:
    """A cell trained earlier under the same training config is kept, not trained again."""
    if not (cell / "results.json").exists() or not (cell / "new_rows.safetensors").exists():
        return False
    previous = json.loads((cell / "config.json").read_text())
    return all(previous.get(key) == getattr(cfg, key) for key in kld.RESUME_KEYS + ("eval_chars", "eval_window"))


def cached_codegen(path: Path, cfg):
    """codegen.json of an earlier evaluation under the same settings, else None."""
    if not path.exists():
        return None
    codegen = json.loads(path.read_text())
    settings = json.loads(json.dumps({key: getattr(cfg, key) for key in kld.CODEGEN_KEYS}))
    if "realised_saving" not in codegen.get("summary", {}):  # written before the measure existed
        return None
    return codegen if codegen.get("settings") == settings else None


def evaluate_row(model, tok, tasks, cfg, path: Path):
    codegen = cached_codegen(path, cfg)
    if codegen is None:
        codegen = kld.evaluate_codegen_as_configured(model, tok, tasks, cfg)
        kld.write_atomic(path, json.dumps(codegen, indent=1) + "\n")
    return codegen


def run_matrix(spec, values):
    """Train (or reuse) each cell, evaluate every student and the teacher on the tasks; one
    dict with everything the report shows."""
    started = time.perf_counter()
    out = Path(spec.get("out_dir", "runs/bench"))
    base = kld.make_config({**values, "out_dir": str(out / "teacher")})
    tasks = kld.read_tasks(base.tasks)
    device, dtype = kld.resolve_device(base.device), kld.resolve_dtype(base.dtype)
    rows = {}
    for name, fields in matrix_cells(spec):
        cfg = kld.make_config({**values, **fields, "out_dir": str(out / name)})
        print(f"\n=== {name}")
        if is_trained(Path(cfg.out_dir), cfg):
            print(f"trained earlier: {cfg.out_dir}")
        else:
            kld.run(dataclasses.replace(cfg, tasks=""))
        results = json.loads((Path(cfg.out_dir) / "results.json").read_text())
        model, tok = kld.load_student(cfg.out_dir, device=device, dtype=dtype)
        codegen = evaluate_row(model, tok, tasks, cfg, Path(cfg.out_dir) / "codegen.json")
        embeddings = kld.embedding_analysis(model, tok)
        kld.write_atomic(Path(cfg.out_dir) / "embeddings.json", json.dumps(embeddings, indent=1) + "\n")
        rows[name] = {"held_out": results["student"], "train_s": results["seconds"], "codegen": codegen,
                      "embeddings": embeddings["summary"], "teacher_held_out": results["teacher"]}
        print(f"{name}: pass@1 {codegen['summary']['pass@1']:.3f}, bits/char "
              f"{results['student']['bits_per_char']:.4f}")
    print("\n=== teacher")
    model, tokenizer = kld.load_model(base.model, device=device, dtype=dtype)
    teacher_tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)  # tau: no merges
    codegen = evaluate_row(model, teacher_tok, tasks, base, out / "teacher" / "codegen.json")
    held_out = next(iter(rows.values()))["teacher_held_out"] if rows else {}
    rows = {"teacher": {"held_out": held_out, "train_s": 0.0, "codegen": codegen}, **rows}
    return {"machine": machine(), "device": str(device), "tasks": base.tasks, "n_tasks": len(tasks),
            "config": values, "rows": rows, "wall_s": time.perf_counter() - started}


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def comparisons(rows) -> list[dict]:
    """Paired comparisons on pass@1: each student against the teacher, and kl against ce for each initialiser."""
    def per_task(name):
        return {t: s["pass@1"] for t, s in rows[name]["codegen"]["tasks"].items()}

    pairs = [("teacher", name) for name in rows if name != "teacher"]
    pairs += [(f"{init}-ce", f"{init}-kl") for init in dict.fromkeys(n.rsplit("-", 1)[0] for n in rows if "-" in n)
              if f"{init}-ce" in rows and f"{init}-kl" in rows]
    return [{"a": a, "b": b, **kld.paired_comparison(per_task(a), per_task(b))} for a, b in pairs]


TABLE_COLUMNS = ["row", "pass@1", "interval_low", "interval_high", "bits_per_char", "tokens_per_char_heldout",
                 "tokens_per_char_generated", "new_token_share", "adoption", "realised_saving", "possible_saving",
                 "saving_realised", "not_compiling", "tokens_per_char_vs_teacher",
                 "generated_chars_per_s", "chars_per_s_vs_teacher", "train_s", "codegen_s"]


def table_rows(bench) -> list[dict]:
    """One row per model; the generation figures also as ratios to the teacher's in the same run."""
    out = []
    teacher_summary = bench["rows"]["teacher"]["codegen"]["summary"]
    for name, row in bench["rows"].items():
        summary = row["codegen"]["summary"]
        out.append({"row": name, "pass@1": summary["pass@1"], "interval_low": summary["pass@1_interval"][0],
                    "interval_high": summary["pass@1_interval"][1],
                    "bits_per_char": row["held_out"].get("bits_per_char"),
                    "tokens_per_char_heldout": row["held_out"].get("tokens_per_char"),
                    "tokens_per_char_generated": summary["tokens_per_char"], "new_token_share": summary["new_token_share"],
                    "adoption": summary.get("adoption"), "realised_saving": summary.get("realised_saving"),
                    "possible_saving": summary.get("possible_saving"), "saving_realised": summary.get("saving_realised"),
                    "not_compiling": summary.get("not_compiling"),
                    "tokens_per_char_vs_teacher": summary["tokens_per_char"] / teacher_summary["tokens_per_char"],
                    "generated_chars_per_s": summary["chars_per_s"],
                    "chars_per_s_vs_teacher": summary["chars_per_s"] / teacher_summary["chars_per_s"],
                    "train_s": row["train_s"], "codegen_s": summary["generation_s"]})
    return out


def markdown_report(bench, table, compared, plot_name) -> str:
    lines = [f"# kld bench: {len(bench['rows']) - 1} students and the teacher", "",
             f"{bench['n_tasks']} tasks from `{bench['tasks']}`; machine: {bench['machine']}; device {bench['device']}; "
             f"wall time {bench['wall_s'] / 60:.1f} min.", "",
             "| row | pass@1 [95% CI] | bits/char | tokens/char held-out | tokens/char generated (x teacher) "
             "| new-token share | adoption | saving realised / possible (share) | not compiling "
             "| generated chars/s (x teacher) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        bpc = f"{r['bits_per_char']:.4f}" if r["bits_per_char"] is not None else "-"
        tpc = f"{r['tokens_per_char_heldout']:.4f}" if r["tokens_per_char_heldout"] is not None else "-"
        adoption = f"{r['adoption']:.2f}" if r["adoption"] is not None else "-"
        broken = r["not_compiling"] if r["not_compiling"] is not None else "-"
        saving = "-"  # codegen.json written before the measure existed: re-evaluate to fill it
        if r["realised_saving"] is not None:
            share = f"{r['saving_realised']:.2f}" if r["saving_realised"] is not None else "-"
            saving = f"{r['realised_saving']:.1%} / {r['possible_saving']:.1%} ({share})"
        lines.append(f"| {r['row']} | {r['pass@1']:.3f} [{r['interval_low']:.3f}, {r['interval_high']:.3f}] | {bpc} | "
                     f"{tpc} | {r['tokens_per_char_generated']:.4f} ({r['tokens_per_char_vs_teacher']:.2f}) | "
                     f"{r['new_token_share']:.1%} | {adoption} | {saving} | {broken} | "
                     f"{r['generated_chars_per_s']:.0f} "
                     f"({r['chars_per_s_vs_teacher']:.2f}) | {r['train_s']:.0f} |")
    lines += ["", "adoption: the share of new tokens among a student's generated tokens over the share tau' gives "
              "when it re-encodes the same text; saving: on the model's own generated text, 1 - the tokens it spent "
              "/ the tokens tau spells it in (realised), 1 - tau''s tokens / tau's (possible), and realised / "
              "possible (share); (x teacher): the ratio to the teacher's figure in this run."]
    lines += ["", "Paired comparisons on per-task pass@1 (b - a; sign test over the tasks where they differ):", "",
              "| a | b | b - a [95% CI] | b better | b worse | p |", "|---|---|---|---|---|---|"]
    for c in compared:
        lo, hi = c["interval"]
        lines.append(f"| {c['a']} | {c['b']} | {c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {c['better']} | "
                     f"{c['worse']} | {c['p_value']:.3f} |")
    lines += ["", "Where the new rows sit (input rows / output rows): mean norm against the base rows' mean, "
              "median norm percentile among base rows, mean cosine to the mean of the sub-token rows, "
              "share whose nearest base token is one of its own sub-tokens:", "",
              "| row | norm new / base | norm percentile | cosine to sub-token mean | nearest is own sub-token |",
              "|---|---|---|---|---|"]
    for name, row in bench["rows"].items():
        if "embeddings" in row:
            e_in, e_out = row["embeddings"]["in"], row["embeddings"]["out"]
            lines.append(f"| {name} | {e_in['new_norm_mean']:.3f} / {e_in['base_norm_mean']:.3f}, "
                         f"{e_out['new_norm_mean']:.3f} / {e_out['base_norm_mean']:.3f} | "
                         f"{e_in['norm_percentile_median']:.2f}, {e_out['norm_percentile_median']:.2f} | "
                         f"{e_in['cosine_to_sub_mean']:.3f}, {e_out['cosine_to_sub_mean']:.3f} | "
                         f"{e_in['nearest_is_own_sub_token']:.0%}, {e_out['nearest_is_own_sub_token']:.0%} |")
    if plot_name:
        lines += ["", f"![new input rows among the base rows]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_embeddings(out: Path, rows, values) -> str | None:
    """The new input rows of each student on the first two principal axes of the base input
    rows; None when matplotlib (optional) is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [name for name in rows if name != "teacher"]
    model, _ = kld.load_model(kld.make_config(values).model)
    base = model.embed.weight.detach().float()
    mean = base.mean(0)
    axes_2d = torch.linalg.svd(base - mean, full_matrices=False).Vh[:2].T  # (d, 2)
    base_points = (base - mean) @ axes_2d
    cols = math.ceil(len(students) / 2)
    fig, grid = plt.subplots(2, cols, figsize=(4 * cols, 8), squeeze=False, sharex=True, sharey=True)
    for ax, name in zip(grid.T.flat, students):
        new_in = kld.read_safetensors(out / name / "new_rows.safetensors")["new_in"].float()
        points = (new_in - mean) @ axes_2d
        ax.scatter(base_points[:, 0], base_points[:, 1], s=1, c="0.8", rasterized=True, label="base rows")
        ax.scatter(points[:, 0], points[:, 1], s=6, c="tab:blue", label="new rows")
        ax.set_title(name)
    grid.flat[0].legend(loc="upper right", fontsize=8)
    fig.suptitle("new input rows on the base rows' first two principal axes")
    fig.tight_layout()
    path = out / "embeddings.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def command_line_changes(args) -> dict:
    """The matrix's command line as bench config keys: --inits, --objectives, --kl-variants
    (a JSON object each), --out-dir and --set KEY=VALUE (kld fields)."""
    changes = {key: getattr(args, key) for key in ("inits", "objectives", "out_dir") if getattr(args, key, None)}
    if getattr(args, "kl_variants", None):
        changes["kl_variants"] = [json.loads(v) for v in args.kl_variants]
    pairs = [pair.partition("=") for pair in getattr(args, "set", [])]
    changes["overrides"] = kld.parse_overrides([f"--{key}={value}" for key, _, value in pairs])
    return changes


def bench_matrix(args):
    spec, values = read_bench_config(args.config, command_line_changes(args))
    bench = run_matrix(spec, values)
    out = Path(spec.get("out_dir", "runs/bench"))
    table, compared = table_rows(bench), comparisons(bench["rows"])
    plot_name = plot_embeddings(out, bench["rows"], values)
    kld.write_atomic(out / "bench.json", json.dumps({**bench, "table": table, "comparisons": compared}, indent=1) + "\n")
    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, TABLE_COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    kld.write_atomic(out / "bench.csv", csv_text.getvalue())
    report = markdown_report(bench, table, compared, plot_name)
    kld.write_atomic(out / "report.md", report)
    print("\n" + report + f"\nwritten to {out}/: bench.json, bench.csv, report.md" + (f", {plot_name}" if plot_name else ""))


def initialisers(args):
    """Initialisers ranked as Beyond Initialization Loss ranks them: held out at step 0 and
    after --steps steps of the config's objective (its windows, rates, cpu_bf16), each pair
    "input/output" (or one name for both) from the same extension and windows."""
    cfg = kld.load_config(args.config, ["--steps", str(args.steps), "--hidden_steps", "0", "--eval_every", "0"])
    device = kld.resolve_device(args.device or cfg.device)
    model, tokenizer = kld.load_model(cfg.model, device=device, dtype=kld.resolve_dtype(cfg.dtype))
    train_texts, heldout_texts = kld.load_corpus(cfg.corpus, cfg.heldout_fraction, cfg.max_literal_share)
    tok = kld.build_extension(tokenizer, train_texts, cfg.n_merges, model.cfg.vocab_size, cfg.new_tokens,
                              cfg.newline)
    sep = kld.separator_id(model.cfg)
    stream = kld.token_stream(tok, train_texts, sep)
    chunks = kld.eval_chunks(tokenizer, heldout_texts, cfg.eval_chars, cfg.eval_window)
    lift_cfg = kld.make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition, device)
    print(f"{len(tok.merges)} new tokens; held out: {cfg.eval_chars} characters; {args.steps} steps of {cfg.objective} "
          f"({cfg.windows} windows, lr {cfg.lr}, lr_out {cfg.lr_out})")
    print("| input / output rows | bits/char @ 0 | KL @ 0 | mass on new @ 0 | bits/char @ N | KL @ N "
          "| mass on new @ N | train s |")
    print("|---|---|---|---|---|---|---|---|")

    def mass(m):
        return f"{m['new_token_mass']:.3f}" if m["new_token_mass"] is not None else "-"

    with tempfile.TemporaryDirectory() as scratch:
        for i, pair in enumerate(args.inits):
            init_in, _, init_out = pair.partition("/")
            kld.init_new_rows(model, tok, init_in, init_out or init_in, cfg.seed)  # replaces the last pair's rows
            start = kld.evaluate(model, tok, chunks, sep, cfg.batch_size, lift_cfg)
            _, seconds = timed(lambda: kld.train(model, tok, cfg, stream, [], Path(scratch) / f"{i}.pt"))
            end = kld.evaluate(model, tok, chunks, sep, cfg.batch_size, lift_cfg) if args.steps else start
            print(f"| {init_in} / {init_out or init_in} | {start['bits_per_char']:.4f} | {start['kl']:.6f} "
                  f"| {mass(start)} | {end['bits_per_char']:.4f} | {end['kl']:.6f} | {mass(end)} | {seconds:.0f} |",
                  flush=True)


def heldout(args):
    device = kld.resolve_device(args.device)
    print("| run | lift | bits/char | targets' bits/char | KL | new-token share | student mass on new "
          "| lifted teacher's mass on new |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        cfg = kld.load_config(str(Path(run) / "config.json"))
        model, tok = kld.load_student(run, device=device)
        _, texts = kld.load_corpus(cfg.corpus, cfg.heldout_fraction, cfg.max_literal_share)
        chunks = kld.eval_chunks(tok.base, texts, cfg.eval_chars, cfg.eval_window)
        lift_cfg = kld.make_lift(tok, args.lift or cfg.lift, cfg.lift_min_prob, cfg.lift_condition)
        m = kld.evaluate(model, tok, chunks, kld.separator_id(model.cfg), cfg.batch_size, lift_cfg)
        masses = [f"{x:.3f}" if x is not None else "-" for x in (m["new_token_mass"], m["target_new_token_mass"])]
        print(f"| {run} | {lift_cfg.mode} | {m['bits_per_char']:.4f} | {m['target_bits_per_char']:.4f} | {m['kl']:.4f} "
              f"| {m['new_token_share']:.1%} | {' | '.join(masses)} |")


def dense_lifted(t: kld.LiftedTargets) -> torch.Tensor:
    """p' as a dense (m, |V'|) matrix."""
    return t.logp().double().exp()


def longest_match_misses(tok: kld.ExtendedTokenizer, trie: kld.LiftTrie, chunks) -> tuple[int, int]:
    """(positions where the token tau' emits is not the longest vocabulary token the rest of
    the text starts with, positions): the assumption under both lift modes, measured."""
    misses = positions = 0
    for chunk in chunks:
        student = tok.merge(chunk)
        at = 0
        for s in student:
            longest, k = 1, 1  # a base token always matches
            while k < len(chunk) - at and (tuple(chunk[at : at + k]) in trie.children):
                k += 1
                if tuple(chunk[at : at + k]) in trie.new_token:
                    longest = k
            emitted = len(tok.expand([s]))
            misses += emitted != longest
            positions += 1
            at += emitted
    return misses, positions


def lift_bench(args):
    """Path against trie mode on held-out code: the lifted targets, what they cost, how they differ."""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    cfg = kld.make_config({"n_merges": args.merges, "eval_chars": args.chars})
    model, tokenizer = kld.load_model(args.model)
    train, heldout_texts = kld.load_corpus(cfg.corpus, cfg.heldout_fraction, cfg.max_literal_share)
    tok = kld.build_extension(tokenizer, train, cfg.n_merges, model.cfg.vocab_size)
    sep = kld.separator_id(model.cfg)
    chunks = kld.eval_chunks(tokenizer, heldout_texts, cfg.eval_chars, cfg.eval_window)
    chars = sum(len(tokenizer.decode(c)) for c in chunks)
    windows = [[sep] + tok.merge(c) for c in chunks]
    n_student = sum(len(w) - 1 for w in windows)
    teacher_measures = kld.evaluate(model, tok, chunks, sep, args.batch_size)
    print(f"{len(chunks)} held-out chunks, {chars} characters, {n_student} student tokens, K = {cfg.n_merges}; "
          f"teacher bits/char {teacher_measures['bits_per_char']:.4f}")
    trie = kld.lift_trie(tok)
    misses, positions = longest_match_misses(tok, trie, chunks)
    print(f"tau' token is not the longest match of the remaining text at {misses} of {positions} positions "
          f"({misses / positions:.2%})")
    settings = [("path", math.inf)] + [("trie", p) for p in args.min_probs]
    print("\n| lift | condition | min_prob | target bits/char | p'(s_j) = 0 | mass on new, all | mass on new, next new "
          "| TV to trie@" + f"{min(args.min_probs):g}" + " | branch tokens / token | ms / window |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    V = tok.base_vocab_size
    for condition in (False, True):
        dense_runs = {}
        rows = {}
        for mode, min_prob in settings:
            lift_cfg = kld.make_lift(tok, mode, min_prob if mode == "trie" else 0.0, condition)
            nats = zero = branch = seconds = mass_all = mass_new = n_new = 0.0
            dense = []
            for i in range(0, len(windows), args.batch_size):
                batch = windows[i : i + args.batch_size]
                (targets, n_branch), s = timed(lambda: kld.teacher_targets(model, tok, batch, lift_cfg))
                seconds += s
                branch += n_branch
                for w, t in zip(batch, targets):
                    next_ids = torch.tensor(w[1:])
                    floor = kld.target_logprobs(t, next_ids)
                    nats -= floor[floor > -math.inf].sum().item()
                    zero += (floor == -math.inf).sum().item()
                    p_new = t.new_logp.double().exp().sum(1)  # (m,) mass on new tokens
                    is_new = next_ids >= V
                    mass_all += p_new.sum().item()
                    mass_new += p_new[is_new].sum().item()
                    n_new += is_new.sum().item()
                    dense.append(dense_lifted(t))
            dense_runs[(mode, min_prob)] = torch.cat(dense)
            rows[(mode, min_prob)] = (nats / math.log(2) / chars, zero / n_student, mass_all / n_student,
                                      mass_new / n_new, branch / n_student, 1000 * seconds / len(windows))
        reference = dense_runs[("trie", min(args.min_probs))]
        for (mode, min_prob), (bits, zero, m_all, m_new, branch, ms) in rows.items():
            tv = 0.5 * (dense_runs[(mode, min_prob)] - reference).abs().sum(1).mean().item()
            shown = "-" if mode == "path" else f"{min_prob:g}"
            print(f"| {mode} | {'yes' if condition else 'no'} | {shown} | {bits:.4f} | {zero:.2%} | {m_all:.3f} | "
                  f"{m_new:.3f} | {tv:.4f} | {branch:.2f} | {ms:.0f} |")


def codegen(args):
    """One model's code generation on the tasks, with a run's config (or the default): the
    teacher, or the student of a finished run; codegen.json beside it, the summary printed."""
    overrides = ["--tasks", args.tasks, "--max_new_tokens", str(args.max_new_tokens), "--exec_timeout", "10"]
    if args.run:
        cfg = kld.load_config(str(Path(args.run) / "config.json"), overrides)
        model, tok = kld.load_student(args.run, device=kld.resolve_device(args.device), dtype=kld.resolve_dtype(cfg.dtype))
        out = Path(args.run) / "codegen.json"
    else:
        cfg = kld.load_config(args.config, overrides)
        model, tokenizer = kld.load_model(cfg.model, device=kld.resolve_device(args.device),
                                          dtype=kld.resolve_dtype(cfg.dtype))
        tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)  # tau: no merges
        out = Path(args.out)
    result = evaluate_row(model, tok, kld.read_tasks(cfg.tasks), cfg, out)
    summary = result["summary"]
    low, high = summary["pass@1_interval"]
    saving = summary.get("saving_realised")
    print(f"{args.run or 'teacher'}: pass@1 {summary['pass@1']:.3f} [{low:.3f}, {high:.3f}]; adoption "
          f"{summary['adoption'] if summary['adoption'] is not None else '-'}; saving realised "
          f"{summary['realised_saving']:.1%} of a possible {summary['possible_saving']:.1%} "
          f"({saving if saving is not None else '-'}); {summary['chars_per_s']:.0f} chars/s; written to {out}")


def generation_speed(args):
    """Characters per second of a finished run's student against its teacher, both in this
    process and turn about (the order swapped each round, the fastest round of each kept),
    on the first --n-tasks prompts, greedy, at --batch-size: a ratio that a load on the
    machine which changes over minutes biases far less than two separate processes. Split
    as chars/s = tokens/s x chars/token: the decoding's speed (steps, the prompts' passes
    and the stop checks) and the text each token writes."""
    if args.rounds < 1 or args.n_tasks < 1:
        raise kld.KldError(f"gen-speed needs at least one round and one task, got {args.rounds} and {args.n_tasks}")
    cfg = kld.load_config(str(Path(args.run) / "config.json"), ["--tasks", args.tasks,
                                                                "--max_new_tokens", str(args.max_new_tokens)])
    device = kld.resolve_device(args.device)
    dtype = kld.resolve_dtype(cfg.dtype)
    student, student_tok = kld.load_student(args.run, device=device, dtype=dtype)
    teacher, tokenizer = kld.load_model(cfg.model, device=device, dtype=dtype)
    teacher_tok = kld.ExtendedTokenizer(tokenizer, [], teacher.cfg.vocab_size)  # tau: no merges
    chat = kld.uses_chat(cfg, teacher_tok)
    prompts = [kld.task_prompt(t, chat, cfg.system_prompt) for t in kld.read_tasks(cfg.tasks)[: args.n_tasks]]
    greedy = dataclasses.replace(kld.decoding_of(cfg), batch_size=args.batch_size, temperature=0.0)
    models = {  # name: (model, tokenizer, its decoding)
        "teacher": (teacher, teacher_tok, kld.task_decoding(greedy, teacher.cfg, teacher_tok, chat)),
        "student": (student, student_tok, kld.task_decoding(greedy, student.cfg, student_tok, chat)),
    }
    seconds = {name: [] for name in models}
    written = {}  # name: (characters, tokens); greedy decoding writes the same every round
    for round_ in range(args.rounds):
        order = list(models) if round_ % 2 == 0 else list(models)[::-1]
        for name in order:
            model, tok, decoding = models[name]
            completions, elapsed = timed(lambda: kld.generate(model, tok, prompts, decoding))
            seconds[name].append(elapsed)
            written[name] = (sum(len(tok.decode(c.token_ids)) for c in completions),
                             sum(len(c.token_ids) for c in completions))
    if not all(tokens for _, tokens in written.values()):
        raise kld.KldError("a model wrote no tokens: nothing to time")
    print(f"{len(prompts)} prompts of {cfg.tasks}, greedy, at most {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}, {args.rounds} rounds turn about, the fastest of each; {machine()}")
    print("| model | chars | tokens | chars/token | tokens/s | chars/s |")
    print("|---|---|---|---|---|---|")
    speed = {}
    for name in models:
        chars, tokens = written[name]
        fastest = min(seconds[name])
        speed[name] = {"chars_per_token": chars / tokens, "tokens_per_s": tokens / fastest, "chars_per_s": chars / fastest}
        print(f"| {name} | {chars} | {tokens} | {chars / tokens:.3f} | {tokens / fastest:.1f} | {chars / fastest:.1f} |")
    ratio = {key: speed["student"][key] / speed["teacher"][key] for key in speed["student"]}
    print(f"student / teacher: chars/s {ratio['chars_per_s']:.2f}x = tokens/s {ratio['tokens_per_s']:.2f}x "
          f"x chars/token {ratio['chars_per_token']:.2f}x")


def copy_accuracy(model, tok: kld.ExtendedTokenizer, texts: list[str], base_only: bool, separator="\n\n") -> dict:
    """Teacher-forced greedy accuracy on the second copy of each text in (text, separator,
    text): the tokens a model can copy from its context, as an answer copies its prompt's
    names and docstring. base_only: the teacher (tau and the base rows); else the student
    (tau'), whose new-token targets are also counted apart, with the shares of them where it
    predicts the new token's first piece or its last piece instead."""
    encode = (lambda text: tok.base.encode(text, add_special_tokens=False).ids) if base_only else tok.encode
    V = tok.base_vocab_size
    right = total = new_right = new_total = as_first = as_last = 0
    for text in texts:
        copy = encode(text)
        context = copy + encode(separator)  # encoded apart: the copy starts where the text did
        with torch.no_grad():
            logits = model(torch.tensor([context + copy]), base_only=base_only)[0]  # (T, |V| or |V'|)
        predicted = logits[len(context) - 1 : -1].argmax(-1).tolist()  # the prediction of each copied token
        for guess, target in zip(predicted, copy):
            right += guess == target
            total += 1
            if target >= V:
                pieces = tok.expansions[target - V]
                new_right += guess == target
                new_total += 1
                as_first += guess == pieces[0]
                as_last += guess == pieces[-1]
    return {"tokens": total, "accuracy": right / total, "new_tokens": new_total,
            **{key: n / new_total if new_total else None
               for key, n in (("new_accuracy", new_right), ("new_as_first", as_first), ("new_as_last", as_last))}}


def first_docstring_line(prompt: str) -> str | None:
    found = re.search(r'(?:"""|\'\'\')\s*(\S.*)', prompt)
    return found.group(1).strip().removesuffix('"""').removesuffix("\'\'\'").strip() if found else None


def docstrings_not_copied(codegen: dict, tasks: dict[str, kld.Task]) -> tuple[int, int]:
    """(answers that do not hold their prompt's first docstring line verbatim, those of them
    that do not compile) in a codegen.json: the copies a model got wrong."""
    wrong = [s for s in codegen["samples"]
             if (line := first_docstring_line(tasks[s["task_id"]].prompt)) and line not in s["completion"]]
    return len(wrong), sum(not s["compiles"] for s in wrong)


def copying(args):
    """copy_accuracy of a finished run's teacher and student on the first --n-tasks prompts,
    then, where their code generation is at hand, the answers whose docstring copy is wrong."""
    model, tok = kld.load_student(args.run, device="cpu")
    tasks = kld.read_tasks(args.tasks)
    texts = [t.prompt for t in tasks[: args.n_tasks]]
    if not texts:
        raise kld.KldError(f"no tasks in {args.tasks}")
    print("| model | tokens copied | right | new tokens | right | predicted as their first piece | as their last |")
    print("|---|---|---|---|---|---|---|")
    for name, base_only in (("teacher", True), ("student", False)):
        m = copy_accuracy(model, tok, texts, base_only)
        new = [f"{m[key]:.3f}" if m[key] is not None else "-" for key in ("new_accuracy", "new_as_first", "new_as_last")]
        print(f"| {name} | {m['tokens']} | {m['accuracy']:.3f} | {m['new_tokens'] or '-'} | {' | '.join(new)} |")
    for name, path in (("teacher", Path(args.teacher)), ("student", Path(args.run) / "codegen.json")):
        if path.exists():
            codegen = kld.read_json_object(path, f"the {name}'s code generation")
            wrong, broken = docstrings_not_copied(codegen, {t.task_id: t for t in tasks})
            print(f"{name} ({path}): {wrong} of {len(codegen['samples'])} answers miscopy their prompt's first "
                  f"docstring line; {broken} of those do not compile")


def run_row(run_dir: Path, reference: dict, label: str = "teacher") -> dict:
    """One finished run as a row: its held-out figures (results.json), its code generation
    (codegen.json, from `codegen --run`) and the paired comparison with the reference's
    programs (the teacher's, or another run's: `label`)."""
    results = kld.read_json_object(run_dir / "results.json", "a run's results")
    codegen = kld.read_json_object(run_dir / "codegen.json", "a run's code generation (run_bench.py codegen --run)")
    if not results.get("complete"):
        raise kld.KldError(f"{run_dir} has not finished (results.json is not complete)")
    if reference["settings"] != codegen.get("settings", {}):
        raise kld.KldError(f"{run_dir}/codegen.json was made with other code-generation settings than the {label}'s")
    try:
        student, summary = results["student"], codegen["summary"]
        paired = kld.paired_comparison({t: s["pass@1"] for t, s in reference["tasks"].items()},
                                       {t: s["pass@1"] for t, s in codegen["tasks"].items()})
        return {"run": str(run_dir), "bits_per_char": student["bits_per_char"], "kl": student["kl"],
                "new_token_mass": student["new_token_mass"], "target_new_token_mass": student["target_new_token_mass"],
                "pass@1": summary["pass@1"], "interval": summary["pass@1_interval"], "vs_reference": paired,
                "adoption": summary["adoption"], "realised_saving": summary["realised_saving"],
                "possible_saving": summary["possible_saving"], "saving_realised": summary["saving_realised"],
                "chars_per_s": summary["chars_per_s"], "run_s": results["seconds"],
                "not_compiling": summary.get("not_compiling"), "n_programs": len(codegen["samples"]),
                "teacher_bits_per_char": results["teacher"]["bits_per_char"], "n_merges": results["n_new_tokens"]}
    except KeyError as e:  # written by an older kld: its evaluation lacks a measure
        raise kld.KldError(f"{run_dir}: results.json or codegen.json lacks {e}; rerun codegen --run {run_dir}") from None


def plot_rows(path: Path, rows: list[dict], teacher: dict, over: str = "time") -> str:
    """The rows as a curve over their run time (or their number of merges K): held-out
    bits/char, the saving realised on the students' own code against the possible one, and
    pass@1 with its paired interval against the teacher."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: no plot"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_of = (lambda r: r["run_s"] / 60) if over == "time" else (lambda r: r["n_merges"])
    rows = sorted(rows, key=x_of)
    x = [x_of(r) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(x, [r["bits_per_char"] for r in rows], "o-", label="student")
    axes[0].axhline(teacher["bits_per_char"], color="gray", ls="--", label="teacher")
    axes[0].set_ylabel("held-out bits/char")
    axes[1].plot(x, [100 * r["realised_saving"] for r in rows], "o-", label="realised")
    axes[1].plot(x, [100 * r["possible_saving"] for r in rows], "o--", label="possible")
    axes[1].set_ylabel("tokens saved on the students' code (%)")
    axes[1].legend()
    p1 = [r["pass@1"] for r in rows]
    low = [teacher["pass@1"] + r["vs_reference"]["interval"][0] for r in rows]
    high = [teacher["pass@1"] + r["vs_reference"]["interval"][1] for r in rows]
    axes[2].plot(x, p1, "o-", label="student")
    axes[2].fill_between(x, low, high, alpha=0.2, label="teacher + paired 95% CI")
    axes[2].axhline(teacher["pass@1"], color="gray", ls="--", label="teacher")
    axes[2].set_ylabel("pass@1 (bench_tasks)")
    axes[0].legend()
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel(f"minutes (whole run; {machine()})" if over == "time" else "K (merges)", fontsize=7)
        if over == "merges":
            ax.set_xscale("log", base=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    kld.write_atomic(path, buffer.getvalue())
    return f"plot written to {path}"


def rows(args):
    """Finished runs (`kld.py --config`, then `codegen --run`) as the benchmark's rows: held out,
    code generation, and pass@1 paired against the teacher's programs (`codegen`), or with
    --against, against another run's."""
    if args.against and args.plot:
        raise kld.KldError("--plot draws the runs against the teacher: leave out --against")
    path = Path(args.against) / "codegen.json" if args.against else Path(args.teacher)
    label = args.against or "teacher"
    reference = kld.read_json_object(path, f"the code generation of {label} (run_bench.py codegen)")
    table = sorted((run_row(Path(r), reference, label) for r in args.runs), key=lambda r: r["run_s"])
    teacher_bpc = table[0]["teacher_bits_per_char"]  # the same held-out text in every run of one corpus
    ref = reference["summary"]
    print(f"teacher: held-out bits/char {teacher_bpc:.4f}")
    print(f"{label} ({path}): pass@1 {ref['pass@1']:.3f} [{ref['pass@1_interval'][0]:.3f}, "
          f"{ref['pass@1_interval'][1]:.3f}]; {ref['chars_per_s']:.0f} chars/s")
    print(f"| run | held-out bits/char | KL | mass on new (p') | pass@1 [95% CI] | vs {label} [95% CI] (better/worse, "
          f"p) | not compiling ({label}) | adoption | saving realised / possible (share) | chars/s (x {label}) "
          f"| run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        c = r["vs_reference"]
        mass = f"{r['new_token_mass']:.3f} ({r['target_new_token_mass']:.3f})" if r["new_token_mass"] is not None else "-"
        adoption = f"{r['adoption']:.2f}" if r["adoption"] is not None else "-"
        share = f"{r['saving_realised']:.2f}" if r["saving_realised"] is not None else "-"
        broken = f"{r['not_compiling']} / {r['n_programs']} ({ref.get('not_compiling', '-')})"
        print(f"| {r['run']} | {r['bits_per_char']:.4f} | {r['kl']:.4f} | {mass} | {r['pass@1']:.3f} "
              f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] | {c['difference']:+.3f} [{c['interval'][0]:+.3f}, "
              f"{c['interval'][1]:+.3f}] ({c['better']}/{c['worse']}, p = {c['p_value']:.3f}) | {broken} | {adoption} | "
              f"{r['realised_saving']:.1%} / {r['possible_saving']:.1%} ({share}) | {r['chars_per_s']:.0f} "
              f"({r['chars_per_s'] / ref['chars_per_s']:.2f}) | {r['run_s']:.0f} |")
    if args.plot:
        print(plot_rows(Path(args.plot), table, {"bits_per_char": teacher_bpc, "pass@1": ref["pass@1"]}, args.plot_over))


def program_with_tests(task: kld.Task, source: str) -> str:
    """One program, as HumanEval's harness runs it."""
    return f"{source}\n\n{task.test}\n\ncheck({task.entry_point})\n"


def sandbox_run_all(programs: list[str], limits=kld.SandboxLimits(), workers=0) -> list[kld.RunResult]:
    """Whole programs, each contained as run_tests_all contains a task's."""
    return kld.run_tests_all([(p,) for p in programs], limits, workers, kld.sandbox_run)


def evaluator(args):
    tasks = kld.read_tasks(args.tasks)
    jobs = [(t, t.prompt + t.canonical_solution) for t in tasks]
    limits = kld.SandboxLimits()
    harnesses = {
        "one program (sandbox_run_all)": lambda: sandbox_run_all(
            [program_with_tests(t, s) for t, s in jobs], limits, args.workers),
        "two processes (run_tests_all)": lambda: kld.run_tests_all(jobs, limits, args.workers),
    }
    print(f"{len(jobs)} canonical solutions from {args.tasks}; {os.cpu_count()} CPUs, workers {args.workers or 'one per CPU'}, "
          f"{'as root: a uid per program' if os.geteuid() == 0 else 'as this user'}")
    for name, judge in harnesses.items():
        rounds = []
        for _ in range(args.repeats):
            results, seconds = timed(judge)
            rounds.append(seconds)
        passed = sum(r.status == "passed" for r in results)
        print(f"{name:32s} {min(rounds) / len(jobs) * 1000:6.1f} ms per program (wall, best of {args.repeats}); "
              f"{passed}/{len(jobs)} passed")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="load time and generation tokens/s (against transformers when installed)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shape, random weights (speed only)")
    p.add_argument("--student-merges", type=int, default=0,
                   help="instead: the teacher against an FVT student with this many new tokens, cost per token")
    p = sub.add_parser("extension", help="tokens saved on held-out code; time to learn merges and to encode")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--merges", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--tasks", default="bench_tasks", help="tasks whose prompt + canonical solution are measured too")
    p.add_argument("--max-literal-shares", type=float, nargs="+", default=[1.0, kld.Config.max_literal_share],
                   help="corpus rules compared (1.0: no file left out for its literals)")
    p = sub.add_parser("matrix", help="initialisers x objectives + the teacher: pass@1, bits/char, tokens/char")
    p.add_argument("--config", default="configs/bench_cpu.json", help="bench config (JSON)")
    p.add_argument("--inits", nargs="+", help="instead of the bench config's")
    p.add_argument("--objectives", nargs="+", help="instead of the bench config's")
    p.add_argument("--kl-variants", nargs="+", help="the kl cells: JSON objects with a name and kld fields")
    p.add_argument("--out-dir", help="instead of the bench config's")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="kld config fields on top of its overrides")
    p = sub.add_parser("heldout", help="finished students on their held-out text: do they expect their new tokens?")
    p.add_argument("runs", nargs="+", help="out_dir of a finished kld run")
    p.add_argument("--lift", choices=["path", "trie"], help="measure against these targets (default: the run's own)")
    p.add_argument("--device", default="auto")
    p = sub.add_parser("lift", help="path against trie mode on held-out code: targets, cost, longest match")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--merges", type=int, default=256)
    p.add_argument("--chars", type=int, default=20000, help="held-out characters")
    p.add_argument("--min-probs", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--batch-size", type=int, default=4)
    p = sub.add_parser("train-speed", help="training tokens/s and peak memory")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--random-weights", action="store_true", help="random weights of --shape")
    p.add_argument("--shape", choices=sorted(RANDOM_SHAPES), default="smollm2", help="with --random-weights")
    p.add_argument("--layers", type=int, default=0, help="with --random-weights: keep only this many blocks")
    p.add_argument("--loss-chunk", type=int, default=kld.Config.loss_chunk, help="0: the loss over all positions at once")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--n-merges", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    p.add_argument("--objectives", nargs="+", default=["ce", "kl", "kl-cached"],
                   help="ce, kl, kl-cached (its targets read from a cache an earlier pass filled), hidden")
    p.add_argument("--lift", choices=["path", "trie"], default="trie")
    p.add_argument("--lift-min-prob", type=float, default=kld.Config.lift_min_prob)
    p.add_argument("--steps", type=int, default=5, help="timed steps after a warm-up one (0: its peak memory only)")
    p.add_argument("--cpu-bf16", action="store_true", help="the step in bf16 autocast on the CPU (Config.cpu_bf16)")
    p.add_argument("--hidden-layer", type=int, default=0, help="objective hidden: the layer matched (0: the last)")
    p.add_argument("--windows", choices=["uniform", "new_tokens"], default="uniform",
                   help="as Config.windows (with --run: the run's)")
    p.add_argument("--profile", action="store_true", help="also print where the timed steps spend their time (cProfile)")
    p.add_argument("--run", help="time a finished run's student (its extension, rows and corpus) instead")
    p.add_argument("--peft", action="store_true", help="with --run: also transformers + peft's ce step, same windows")
    p.add_argument("--json", help="also write the seconds per step to this JSON file ({\"OBJECTIVE BATCH\": s})")
    p.add_argument("--device", default="auto")
    p = sub.add_parser("codegen", help="one model's code generation on the tasks: the teacher, or a finished run's student")
    p.add_argument("--run", help="out_dir of a finished kld run (default: the teacher of --config)")
    p.add_argument("--config", default="configs/default.json")
    p.add_argument("--out", default="runs/teacher-codegen.json", help="where the teacher's codegen.json goes")
    p.add_argument("--tasks", default="bench_tasks")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("inits", help="initialisers held out at step 0 and after a few steps of training")
    p.add_argument("--config", default="configs/default.json", help="the training whose first steps are taken")
    p.add_argument("--inits", nargs="+", default=["fvt", "last_piece/first_piece"],
                   help="INPUT/OUTPUT initialiser pairs (one name: both rows)")
    p.add_argument("--steps", type=int, default=50, help="steps of the config's objective (0: step 0 only)")
    p.add_argument("--device", help="default: the config's")
    p = sub.add_parser("gen-speed", help="a finished run's student against its teacher: generated characters/s, turn about")
    p.add_argument("--run", required=True, help="out_dir of a finished kld run")
    p.add_argument("--tasks", default="bench_tasks")
    p.add_argument("--n-tasks", type=int, default=20, help="the first this many tasks' prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="teacher then student, this many times")
    p.add_argument("--device", default="auto")
    p = sub.add_parser("copy", help="a finished run's teacher and student copying a prompt from their context")
    p.add_argument("--run", required=True, help="out_dir of a finished kld run")
    p.add_argument("--tasks", default="bench_tasks")
    p.add_argument("--n-tasks", type=int, default=60, help="the first this many tasks' prompts")
    p.add_argument("--teacher", default="runs/teacher-codegen.json", help="the teacher's codegen.json, if any")
    p = sub.add_parser("rows", help="finished runs with their code generation as table rows, paired against the teacher "
                                    "(or --against a run)")
    p.add_argument("runs", nargs="+", help="out_dir of a finished kld run with its codegen.json")
    paired = p.add_mutually_exclusive_group()
    paired.add_argument("--teacher", default="runs/teacher-codegen.json", help="the teacher's codegen.json (codegen)")
    paired.add_argument("--against", help="pair with this finished run's programs instead of the teacher's (KL against CE)")
    p.add_argument("--plot", help="also draw the rows as a curve into this PNG")
    p.add_argument("--plot-over", choices=["time", "merges"], default="time", help="the curve's x: run time or K")
    p = sub.add_parser("evaluator", help="cost per program of judging code: one program against two processes")
    p.add_argument("--tasks", default="bench_tasks")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        {"speed": speed, "extension": extension, "train-speed": train_speed, "matrix": bench_matrix,
         "heldout": heldout, "lift": lift_bench, "evaluator": evaluator, "codegen": codegen,
         "rows": rows, "inits": initialisers, "gen-speed": generation_speed,
         "copy": copying}[args.command](args)
    except kld.KldError as e:
        print(f"run_bench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
