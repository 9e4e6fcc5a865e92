"""Benchmarks that print figures (never timed tests).

    python run_bench.py speed [--model smollm2] [--new-tokens 64] [--batch-sizes 1 8] [--device auto] [--dtype float32]
    python run_bench.py extension [--model smollm2] [--corpus stdlib] [--merges 64 256 1024]
    python run_bench.py train-speed [--random-weights] [--batch-sizes 4] [--seq-len 128] [--device auto]

speed: model load time; greedy decoding tokens/s at each batch size; and, when
`transformers` (+ gguf, accelerate) is installed by hand, the same figures for
transformers' own loading and `generate` in the same process (a ratio), plus the largest
logit difference between the two loaders on a few prompts. transformers is a reference
here, never a dependency of kld.

extension: the tokens that K appended merges save on the held-out files of the corpus,
the time to learn them, the time to encode the corpus against the base tokenizer alone,
and the time of one path-mode lift.

train-speed: student tokens/s and peak memory of one training step (student forward,
teacher forward and lift for kl, backward, AdamW) at each batch size.

The comparison matrix of initialisers x objectives arrives with the evaluation issue.
"""

import argparse
import importlib.util
import math
import platform
import statistics
import time

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


def kld_tokens_per_s(model, tokenizer, prompts, new_tokens):
    """Greedy tokens/s, every row forced to the full budget (no stop tokens)."""
    kld.generate(model, tokenizer, prompts[:1], max_new_tokens=4)  # warm-up
    outs, seconds = timed(lambda: kld.generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                               batch_size=len(prompts)))
    return sum(len(o.token_ids) for o in outs) / seconds


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


def random_smollm2(device, dtype):
    from tokenizers import Tokenizer

    model = kld.GPT(SMOLLM2_135M).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, Tokenizer.from_file("fixtures/tokenizer.json")


def speed(args):
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name()}")
    device, dtype = kld.resolve_device(args.device), kld.resolve_dtype(args.dtype)
    print(f"device: {device}, {args.dtype}")
    if args.random_weights:
        (model, tokenizer), load_s = timed(lambda: random_smollm2(device, dtype))
        print("model: SmolLM2-135M's shape with random weights (no load time, no reference)")
        prompts = [kld.format_chat(p) for p in PROMPTS] * 8
        for b in args.batch_sizes:
            print(f"batch {b}: kld {kld_tokens_per_s(model, tokenizer, prompts[:b], args.new_tokens):.1f} tok/s")
        return
    path = kld.resolve_model_path(args.model)
    (model, tokenizer), load_s = timed(lambda: kld.load_model(path, device=device, dtype=dtype))
    print(f"kld load: {load_s:.2f} s  ({path.name})")
    prompts = [kld.format_chat(p) for p in PROMPTS]
    ours = {b: kld_tokens_per_s(model, tokenizer, prompts[:b], args.new_tokens) for b in args.batch_sizes}
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


def extension(args):
    """Tokens saved on the held-out corpus at each K, and what learning and encoding cost."""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    model, tokenizer = kld.load_model(args.model)
    V = model.cfg.vocab_size
    train, heldout = kld.load_corpus(args.corpus)
    print(f"corpus {args.corpus}: {len(train)} train files ({sum(map(len, train)) / 1e6:.1f} M chars), "
          f"{len(heldout)} held out ({sum(map(len, heldout)) / 1e6:.1f} M chars)")
    K = max(args.merges)
    ext, learn_s = timed(lambda: kld.build_extension(tokenizer, train, K, V))
    print(f"learn {K} merges: {learn_s:.1f} s (base encoding of the corpus included)")
    base_ids, base_s = timed(lambda: [e.ids for e in tokenizer.encode_batch(train, add_special_tokens=False)])
    fresh = kld.ExtendedTokenizer(tokenizer, ext.merges, V)  # empty memo: the cost a new run pays
    student_ids, student_s = timed(lambda: fresh.encode_batch(train))
    print(f"encode the train corpus: base {base_s:.2f} s, extended {student_s:.2f} s "
          f"(ratio {student_s / base_s:.2f}; {sum(map(len, base_ids))} -> {sum(map(len, student_ids))} tokens)")
    held_base = [e.ids for e in tokenizer.encode_batch(heldout, add_special_tokens=False)]
    n_base = sum(map(len, held_base))
    for k in sorted(args.merges):
        sub = kld.ExtendedTokenizer(tokenizer, ext.merges[:k], V)
        n = sum(len(sub.merge(ids)) for ids in held_base)
        print(f"K = {k:5d}: held-out tokens {n_base} -> {n}, saved {100 * (1 - n / n_base):.1f}%")
    print("first merges:", [ext.token_string(V + i) for i in range(12)])
    window = next(ids for ids in student_ids if len(ids) >= 512)[:512]
    teacher = list(ext.expand(window))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([teacher]))[0].float(), -1)
    first = len(ext.expand(window[:1]))  # the first student token is context only
    lift_args = (logp[first - 1 : -1], teacher[first:], kld.coarsening_span_starts(window[1:], ext), ext)
    targets = kld.lift_path(*lift_args)  # warm-up
    lift_s = statistics.median(timed(lambda: kld.lift_path(*lift_args))[1] for _ in range(7))
    softmax_s = statistics.median(timed(lambda: torch.log_softmax(lift_args[0], -1))[1] for _ in range(7))
    n_candidates = int((targets.new_logp > -math.inf).sum())
    print(f"path-mode lift of one window ({len(window)} student / {len(teacher)} teacher tokens, "
          f"{n_candidates} new-token targets): {lift_s * 1000:.1f} ms, median of 7 "
          f"(one log_softmax of the window's teacher logits: {softmax_s * 1000:.1f} ms)")


def train_speed(args):
    """Training tokens/s and peak memory of the new rows' training step (forward, lift, backward, AdamW)."""
    device = kld.resolve_device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}")
    if args.random_weights:
        model, tokenizer = random_smollm2(device, torch.float32)
        print("model: SmolLM2-135M's shape with random weights, the tiny fixture tokenizer")
    else:
        model, tokenizer = kld.load_model(args.model, device=device)
    train, _ = kld.load_corpus(args.corpus)
    tok = kld.build_extension(tokenizer, train, args.n_merges, model.cfg.vocab_size)
    kld.init_new_rows(model, tok, "fvt", "fvt", seed=0)
    stream = kld.token_stream(tok, train, kld.separator_id(model.cfg))
    optimizer = torch.optim.AdamW([model.new_in, model.new_out], lr=1e-3)
    for objective in args.objectives:
        for batch_size in args.batch_sizes:
            windows = kld.training_windows(stream, args.seq_len, seed=0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def step():
                loss = kld.window_losses(model, tok, [next(windows) for _ in range(batch_size)], objective).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()

            step()  # warm-up
            _, seconds = timed(lambda: [step() for _ in range(args.steps)])
            tokens = args.steps * batch_size * args.seq_len
            print(f"{objective}: batch {batch_size} x {args.seq_len}: {tokens / seconds:.0f} student tok/s, "
                  f"peak memory {kld.peak_memory_mb(device):.0f} MB")


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
    p = sub.add_parser("extension", help="tokens saved on held-out code; time to learn merges and to encode")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--merges", type=int, nargs="+", default=[64, 256, 1024])
    p = sub.add_parser("train-speed", help="training tokens/s and peak memory")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shape, random weights")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--n-merges", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    p.add_argument("--objectives", nargs="+", default=["kl", "ce"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = parser.parse_args()
    {"speed": speed, "extension": extension, "train-speed": train_speed}[args.command](args)


if __name__ == "__main__":
    main()
