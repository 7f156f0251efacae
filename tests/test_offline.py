"""Offline distillation: ``topk_logprobs`` against float64 formulas, ``fastkd teacher-topk`` on tiny
transformers teachers (the files hold the model's own top-k; killed runs resume to the files of an
uninterrupted one; other arguments on the same directory are refused) and ``OfflineTeacher``
(every row once per epoch, shuffling, dtypes, and its errors)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import fastkd  # noqa: E402
from conftest import Recorder  # noqa: E402
from fastkd import offline  # noqa: E402
from fastkd.cli import main  # noqa: E402
from fastkd.distill import generated_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 97  # the teachers' vocabulary: a size no other dimension has
L, K = 12, 8  # --seq-len, --k
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``words`` (ids 2 on; 0 padding, 1 unknown)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Llama with random weights and a word-level tokenizer in one directory, and a text file."""
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    text = generated_text(310, 40, seed=1)  # 310 words: 26 sequences of 12, the last of 10 tokens
    word_tokenizer(sorted(set(text.split()))).save_pretrained(root / "llama")
    (root / "data.txt").write_text(text)
    return root


def topk_argv(teacher: Path, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["teacher-topk", "--teacher", str(teacher / "llama"), "--data", str(data or teacher / "data.txt"),
            "--out", str(out), "--k", str(K), "--seq-len", str(L), "--batch-size", "3", "--rows-per-shard", "4",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def written(teacher, tmp_path_factory):
    """The directory ``fastkd teacher-topk`` writes for ``teacher`` (7 shards, the last of 2 rows)."""
    out = tmp_path_factory.mktemp("written") / "topk"
    assert main(topk_argv(teacher, out)) == 0
    return out


def shards_of(directory: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(p) for p in sorted(directory.glob("shard-*.safetensors"))]


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------
# topk_logprobs


@pytest.mark.parametrize(
    "shape, dtype, k, chunk",
    [
        ((4, 7, 101), torch.float32, 5, None),
        ((3, 1001), torch.float32, 1, None),  # odd V, k = 1
        ((5, 33), torch.float32, 33, None),  # k = V
        ((2, 3, 257), torch.bfloat16, 16, None),
        ((6, 50), torch.float16, 7, None),
        ((9, 31), torch.float32, 4, 64),  # chunks of 2 rows and a last one of 1
        ((0, 10), torch.float32, 3, None),
        ((3,), torch.float64, 2, None),
    ],
)
def test_topk_logprobs_matches_float64(shape, dtype, k, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(offline, "CHUNK_ELEMENTS", chunk)
    logits = (4 * torch.randn(shape)).to(dtype)
    ids, logprobs = fastkd.topk_logprobs(logits, k)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert ids.shape == logprobs.shape == (*shape[:-1], k)
    reference = torch.log_softmax(logits.double(), dim=-1)
    # the entries at the returned ids are the top k (ties may be ordered either way), most probable first
    torch.testing.assert_close(logprobs.double(), reference.gather(-1, ids), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logprobs.double(), reference.topk(k, dim=-1).values, rtol=1e-6, atol=1e-5)
    assert all(len(set(row.tolist())) == k for row in ids.reshape(-1, k))


def test_topk_logprobs_of_a_strided_view():
    logits = torch.randn(6, 4, 50).transpose(0, 1)
    ids, logprobs = fastkd.topk_logprobs(logits, 3)
    want = torch.log_softmax(logits.double(), dim=-1).topk(3, dim=-1)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(logprobs.double(), want.values, rtol=1e-6, atol=1e-6)


def test_topk_logprobs_makes_no_float32_copy_of_the_logits(monkeypatch):
    monkeypatch.setattr(offline, "CHUNK_ELEMENTS", 4000)  # 4 rows of 1000 at a time
    logits = torch.randn(64, 1000).half()
    with Recorder({}) as recorder:
        fastkd.topk_logprobs(logits, 5)
    assert max(size for _, size in recorder.produced) <= logits.numel() * logits.element_size()


@pytest.mark.parametrize(
    "logits, k, error, words",
    [
        ([[1.0, 2.0]], 1, TypeError, "logits: expected a torch.Tensor"),
        (torch.arange(6).view(2, 3), 1, TypeError, "logits: expected a floating-point tensor"),
        (torch.tensor(1.0), 1, ValueError, "logits: .*0-d"),
        (torch.randn(2, 5), 2.0, TypeError, "k: expected a Python int"),
        (torch.randn(2, 5), True, TypeError, "k: expected a Python int"),
        (torch.randn(2, 5), 0, ValueError, r"k: expected an int in \[1, 5\]"),
        (torch.randn(2, 5), 6, ValueError, r"k: expected an int in \[1, 5\]"),
    ],
)
def test_topk_logprobs_errors(logits, k, error, words):
    with pytest.raises(error, match=words):
        fastkd.topk_logprobs(logits, k)


# ------------------------------------------------------------------------------------------
# fastkd teacher-topk


def assert_holds_the_models_topk(shards: list[dict], model, tokens: list[int], logprob_dtype=torch.float16, k=K):
    """The shards' rows are ``tokens`` cut into sequences of ``L`` (the last padded), and each
    position holds the model's own top-k of its float64 log-softmax, padding ids -1 and -inf."""
    assert [s["input_ids"].dtype for s in shards] == [torch.int32] * len(shards)
    assert {s["attention_mask"].dtype for s in shards} == {torch.uint8}
    assert {s["teacher_ids"].dtype for s in shards} == {torch.int32}
    assert {s["teacher_logprobs"].dtype for s in shards} == {logprob_dtype}
    ids, mask, top_ids, top_logprobs = (torch.cat([s[name] for s in shards]) for name in
                                        ("input_ids", "attention_mask", "teacher_ids", "teacher_logprobs"))
    rows = math.ceil(len(tokens) / L)
    want_ids = torch.zeros(rows * L, dtype=torch.int32)
    want_ids[: len(tokens)] = torch.tensor(tokens)
    assert torch.equal(ids, want_ids.view(rows, L))
    assert torch.equal(mask.flatten(), (torch.arange(rows * L) < len(tokens)).to(torch.uint8))
    with torch.no_grad():
        logits = model(input_ids=ids.long(), attention_mask=mask.long()).logits
    reference = torch.log_softmax(logits.double(), dim=-1)
    kept = mask.bool()
    eps = torch.finfo(logprob_dtype).eps
    got = top_logprobs.double()[kept]
    assert top_ids.shape == (rows, L, k)
    torch.testing.assert_close(got, reference.gather(-1, top_ids.long().clamp(min=0))[kept], rtol=eps, atol=1e-4)
    torch.testing.assert_close(got, reference.topk(k, dim=-1).values[kept], rtol=eps, atol=1e-4)
    assert bool((top_ids[~kept] == -1).all()) and bool((top_logprobs[~kept] == -math.inf).all())


def test_teacher_topk_holds_the_models_topk(teacher, written):
    model = LlamaForCausalLM.from_pretrained(teacher / "llama").eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher / "llama")
    tokens = tokenizer((teacher / "data.txt").read_text())["input_ids"]
    assert len(tokens) == 310
    assert_holds_the_models_topk(shards_of(written), model, tokens)
    manifest = manifest_of(written)
    assert manifest["format"] == "fastkd-teacher-topk" and manifest["version"] == 1
    assert manifest["teacher"] == {"path": str(teacher / "llama"), "model_type": "llama", "vocab_size": V,
                                   "dtype": "float32"}
    assert [manifest[key] for key in ("k", "temperature", "seq_len", "logprob_dtype")] == [K, 1.0, L, "float16"]
    assert manifest["tokenizer"] == offline.tokenizer_identity(tokenizer)
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer)
    data = teacher / "data.txt"
    assert manifest["data"] == {"name": "data.txt", "path": str(data), "format": "text",
                                "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert manifest["counts"] == {"sequences": 26, "tokens": 310, "shards": 7, "rows_per_shard": 4}
    assert [(s["file"], s["first_row"], s["rows"], s["complete"]) for s in manifest["shards"]] == [
        (f"shard-{i:05d}.safetensors", 4 * i, 4 if i < 6 else 2, True) for i in range(7)
    ]
    assert manifest["finished"] and manifest["batch_size"] == 3
    names = ["manifest.json"] + [f"shard-{i:05d}.safetensors" for i in range(7)]
    assert sorted(p.name for p in written.iterdir()) == names


@pytest.mark.parametrize("data_format", ["txt", "npy", "pt", "safetensors"])
def test_teacher_topk_reads_bytes_and_token_id_files(tmp_path, data_format):
    """A GPT-2 teacher without a tokenizer: text as UTF-8 bytes (ids modulo the vocabulary, as
    ``fastkd distill`` reads them), or token-id files of any shape; bfloat16 log-probabilities."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    text = "Grüße, café: naïve façade. " * 3
    tokens = list(text.encode("utf-8"))
    ids = torch.tensor(tokens).view(3, -1)  # a shape the reader flattens in row-major order
    data = tmp_path / f"data.{data_format}"
    if data_format == "txt":
        data.write_text(text, encoding="utf-8")
    elif data_format == "npy":
        np.save(data, ids.numpy().astype(np.int32))
    elif data_format == "pt":
        torch.save(ids, data)
    else:
        save_file({"input_ids": ids}, data)
    argv = ["teacher-topk", "--teacher", str(tmp_path / "gpt2"), "--data", str(data), "--out", str(tmp_path / "out"),
            "--k", "5", "--seq-len", str(L), "--batch-size", "2", "--rows-per-shard", "3", "--dtype", "bfloat16",
            "--quiet"]
    assert main(argv) == 0
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    assert_holds_the_models_topk(shards_of(tmp_path / "out"), model, tokens, torch.bfloat16, k=5)
    manifest = manifest_of(tmp_path / "out")
    assert manifest["tokenizer"] == ("utf-8 bytes" if data_format == "txt" else None)
    assert manifest["data"]["format"] == ("text" if data_format == "txt" else data_format)
    assert manifest["counts"]["tokens"] == len(tokens) and manifest["logprob_dtype"] == "bfloat16"


def test_teacher_topk_refuses_bad_data(teacher, tmp_path):
    np.save(tmp_path / "floats.npy", np.ones(10, dtype=np.float32))
    np.save(tmp_path / "large.npy", np.array([1, 2, V]))
    errors = {"floats.npy": "integer token ids", "large.npy": r"outside the teacher's vocabulary \[0, 97\)"}
    for name, words in errors.items():
        with pytest.raises(ValueError, match=words):
            main(topk_argv(teacher, tmp_path / "out", data=tmp_path / name))
    with pytest.raises(SystemExit, match="more than the teacher's vocabulary"):
        main(topk_argv(teacher, tmp_path / "out", "--k", str(V + 1)))


def test_other_arguments_on_the_same_directory_are_an_error(teacher, written, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(written, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "other.txt").write_text((teacher / "data.txt").read_text() + " more")
    shutil.copytree(teacher / "llama", tmp_path / "llama")
    cases = {
        "k: 8 there, 4 here": topk_argv(teacher, out, "--k", "4"),
        "seq_len: 12 there, 16 here": topk_argv(teacher, out, "--seq-len", "16"),
        "logprob_dtype: 'float16' there, 'bfloat16' here": topk_argv(teacher, out, "--dtype", "bfloat16"),
        "data: ": topk_argv(teacher, out, data=tmp_path / "other.txt"),
        "teacher: ": topk_argv(tmp_path, out, data=teacher / "data.txt"),
        "counts: ": topk_argv(teacher, out, "--rows-per-shard", "5"),
    }
    for words, argv in cases.items():
        with pytest.raises(SystemExit, match="was written with other arguments") as error:
            main(argv)
        assert words in str(error.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(topk_argv(teacher, out, "--batch-size", "5")) == 0  # the same run: nothing left to do
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "other_out").mkdir()
    (tmp_path / "other_out" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not empty and holds no manifest.json"):
        main(topk_argv(teacher, tmp_path / "other_out"))


# Kill the run once it has renamed shard KILL_AT into place, before the manifest marks it complete.
KILL_AFTER_RENAME = """
import os, signal, sys
from fastkd.cli import main

replace = os.replace

def killing_replace(src, dst):
    replace(src, dst)
    if dst.endswith(f"shard-{int(os.environ['KILL_AT']):05d}.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = killing_replace
main(sys.argv[1:])
"""

# Kill the run in the middle of writing shard KILL_AT: half of its temporary file is written.
KILL_IN_WRITE = """
import os, signal, sys
import safetensors.torch
from fastkd.cli import main

save = safetensors.torch.save

def half_save_file(tensors, filename, metadata=None):
    data = save(tensors, metadata=metadata)
    if filename.endswith(f"shard-{int(os.environ['KILL_AT']):05d}.safetensors.tmp"):
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    with open(filename, "wb") as f:
        f.write(data)

safetensors.torch.save_file = half_save_file
main(sys.argv[1:])
"""


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def resume_and_compare(teacher, whole: Path, run: Path, monkeypatch) -> list[int]:
    """Run ``run`` again in this process; check that its files are those of ``whole``, and return
    the shards the resumed run wrote."""
    write, written_now = offline._write_shard, []

    def recorded(path, *args):
        written_now.append(int(Path(path).name[6:11]))
        return write(path, *args)

    monkeypatch.setattr(offline, "_write_shard", recorded)
    assert main(topk_argv(teacher, run, "--rows-per-shard", "1")) == 0
    assert files_of(run) == files_of(whole)
    return written_now


@pytest.fixture(scope="module")
def whole_run(teacher, tmp_path_factory):
    """An uninterrupted run of one sequence per shard (26 shards)."""
    out = tmp_path_factory.mktemp("whole") / "topk"
    assert main(topk_argv(teacher, out, "--rows-per-shard", "1")) == 0
    return out


@pytest.mark.parametrize("driver", [KILL_AFTER_RENAME, KILL_IN_WRITE], ids=["after-shard-rename", "in-shard-write"])
def test_killed_run_resumes_to_the_same_files(teacher, whole_run, tmp_path, monkeypatch, driver):
    run = tmp_path / "topk"
    argv = topk_argv(teacher, run, "--rows-per-shard", "1")
    done = subprocess.run([sys.executable, "-c", driver, *argv], env={**ENV, "KILL_AT": "3"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    manifest = manifest_of(run)
    assert [s["complete"] for s in manifest["shards"]] == [True] * 3 + [False] * 23 and not manifest["finished"]
    if driver is KILL_AFTER_RENAME:
        assert (run / "shard-00003.safetensors").exists()  # written, but not marked complete
    else:
        assert (run / "shard-00003.safetensors.tmp").exists() and not (run / "shard-00003.safetensors").exists()
    with pytest.warns(UserWarning, match="3 of 26 shards are complete"):
        assert fastkd.OfflineTeacher(run).num_rows == 3
    assert resume_and_compare(teacher, whole_run, run, monkeypatch) == list(range(3, 26))


def test_killed_command_resumes_to_the_same_files(teacher, whole_run, tmp_path, monkeypatch):
    """``python -m fastkd teacher-topk`` killed with SIGKILL as soon as its first shard exists."""
    run = tmp_path / "topk"
    process = subprocess.Popen([sys.executable, "-m", "fastkd", *topk_argv(teacher, run, "--rows-per-shard", "1")],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "shard-00000.safetensors").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    process.stderr.close()
    complete = [s["complete"] for s in manifest_of(run)["shards"]]
    assert not all(complete), "the run ended before it was killed"
    rewritten = resume_and_compare(teacher, whole_run, run, monkeypatch)
    assert rewritten == [i for i, c in enumerate(complete) if not c] and rewritten[-1] == 25


# ------------------------------------------------------------------------------------------
# OfflineTeacher


def rows_of(batches) -> list[tuple]:
    """Each row of ``batches`` as a hashable tuple of its values."""
    out = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            out.append(tuple(torch.cat([batch[name][i].flatten().double() for name in
                                        ("input_ids", "attention_mask", "teacher_ids", "teacher_logprobs")]).tolist()))
    return out


def test_offline_teacher_yields_every_row_once_per_epoch(written):
    stored = rows_of(shards_of(written))
    assert len(set(stored)) == 26
    data = fastkd.OfflineTeacher(written, batch_size=5)
    assert (data.k, data.vocab_size, data.seq_len, data.num_rows, data.batch_size) == (K, V, L, 26, 5)
    manifest = manifest_of(written)
    assert (data.teacher, data.tokenizer) == (manifest["teacher"]["path"], manifest["tokenizer"])
    epochs = []
    for _ in range(3):
        batches = list(data)
        assert len(batches) == len(data) == 6
        assert [b["input_ids"].shape[0] for b in batches] == [5] * 5 + [1]
        for b in batches:
            n = b["input_ids"].shape[0]
            assert {name: (x.dtype, tuple(x.shape)) for name, x in b.items()} == {
                "input_ids": (torch.int64, (n, L)), "attention_mask": (torch.int64, (n, L)),
                "teacher_ids": (torch.int64, (n, L, K)), "teacher_logprobs": (torch.float32, (n, L, K)),
            }
        epochs.append(rows_of(batches))
        assert sorted(epochs[-1]) == sorted(stored)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    again = fastkd.OfflineTeacher(written, batch_size=5)
    assert rows_of(again) == epochs[0]
    again.set_epoch(2)
    assert rows_of(again) == epochs[2]
    assert rows_of(fastkd.OfflineTeacher(written, batch_size=5, seed=1)) != epochs[0]
    assert rows_of(fastkd.OfflineTeacher(written, batch_size=5, shuffle=False)) == stored


def test_offline_teacher_batch_sizes(written):
    default = fastkd.OfflineTeacher(written, shuffle=False)
    assert default.batch_size == 3 and len(default) == 9  # the writing run's --batch-size
    dropped = fastkd.OfflineTeacher(written, batch_size=4, drop_last=True)
    assert len(dropped) == 6 and [b["input_ids"].shape[0] for b in dropped] == [4] * 6
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        fastkd.OfflineTeacher(written, batch_size=0)


def test_check_student(teacher, written):
    data = fastkd.OfflineTeacher(written)
    needed = 1 + max(s["max_id"] for s in manifest_of(written)["shards"])
    tokenizer = AutoTokenizer.from_pretrained(teacher / "llama")
    data.check_student(LlamaConfig(vocab_size=needed), tokenizer)
    data.check_student(LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2)))
    with pytest.raises(ValueError, match=rf"student's vocabulary \({needed - 1}\) is smaller than the stored ids need"):
        data.check_student(LlamaConfig(vocab_size=needed - 1))
    other = word_tokenizer(["other", "words"] + sorted(set((teacher / "data.txt").read_text().split()))[2:])
    with pytest.raises(ValueError, match="tokenizer: .* is not the teacher's"):
        data.check_student(tokenizer=other)
    with pytest.raises(TypeError, match="model_or_config"):
        data.check_student(object())


def test_check_student_on_bytes(tmp_path, teacher):
    shutil.copytree(teacher / "llama", tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "llama" / name).unlink()
    (tmp_path / "data.txt").write_text("bytes, not words")
    assert main(topk_argv(tmp_path, tmp_path / "out")) == 0
    data = fastkd.OfflineTeacher(tmp_path / "out")
    assert data.tokenizer == "utf-8 bytes"
    with pytest.raises(ValueError, match="tokenizer: the data was read as UTF-8 bytes"):
        data.check_student(tokenizer=AutoTokenizer.from_pretrained(teacher / "llama"))


def rewrite_shard(directory: Path, index: int, edit) -> None:
    path = directory / f"shard-{index:05d}.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_offline_teacher_errors(written, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no manifest.json"):
        fastkd.OfflineTeacher(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "fastkd-teacher-topk", "version": 1, "k"')
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        fastkd.OfflineTeacher(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "fastkd-teacher-topk", "version": 2}')
    with pytest.raises(ValueError, match="format version 2"):
        fastkd.OfflineTeacher(tmp_path)

    def copy(name):
        shutil.copytree(written, tmp_path / name)
        return tmp_path / name

    def fewer_k(tensors):
        tensors["teacher_ids"] = tensors["teacher_ids"][..., :-1].contiguous()
        tensors["teacher_logprobs"] = tensors["teacher_logprobs"][..., :-1].contiguous()

    rewrite_shard(copy("k"), 2, fewer_k)
    with pytest.raises(ValueError, match=r"00002.safetensors: teacher_ids is I32 \[4, 12, 7\], the manifest \(k=8"):
        fastkd.OfflineTeacher(tmp_path / "k")
    rewrite_shard(copy("dtype"), 1, lambda t: t.update(teacher_logprobs=t["teacher_logprobs"].float()))
    with pytest.raises(ValueError, match=r"teacher_logprobs is F32 \[4, 12, 8\], the manifest .* says F16"):
        fastkd.OfflineTeacher(tmp_path / "dtype")
    rewrite_shard(copy("missing"), 0, lambda t: t.pop("attention_mask"))
    with pytest.raises(ValueError, match="no tensor 'attention_mask'"):
        fastkd.OfflineTeacher(tmp_path / "missing")
    path = copy("truncated") / "shard-00003.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard-00003.safetensors: not a readable safetensors shard"):
        fastkd.OfflineTeacher(tmp_path / "truncated")

    rewrite_shard(copy("range"), 4, lambda t: t["teacher_ids"][0, 0].fill_(V))
    data = fastkd.OfflineTeacher(tmp_path / "range", shuffle=False)
    with pytest.raises(ValueError, match=r"shard-00004.safetensors: teacher_ids in \[\d+, 97\], outside"):
        list(data)
    rewrite_shard(copy("input_range"), 0, lambda t: t["input_ids"][1].fill_(-3))
    with pytest.raises(ValueError, match=r"input_ids in \[-3, .*\], outside the teacher's vocabulary"):
        list(fastkd.OfflineTeacher(tmp_path / "input_range"))
    rewrite_shard(copy("padding"), 6, lambda t: t["teacher_ids"][1, -1].fill_(5))
    with pytest.raises(ValueError, match="teacher_ids at padding positions must be -1"):
        list(fastkd.OfflineTeacher(tmp_path / "padding"))


def test_offline_teacher_on_an_incomplete_directory(written, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(written, run)
    manifest = manifest_of(run)
    manifest["shards"][1]["complete"] = manifest["shards"][6]["complete"] = False
    manifest["finished"] = False
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="5 of 7 shards are complete"):
        data = fastkd.OfflineTeacher(run, batch_size=4)
    assert data.num_rows == 20 and len(data) == 5
    stored = shards_of(run)
    assert sorted(rows_of(data)) == sorted(rows_of([s for i, s in enumerate(stored) if i not in (1, 6)]))


# ------------------------------------------------------------------------------------------
# Distilling from the files: the runner and `fastkd distill --offline`.


def small_student(vocab=V):
    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def test_runner_trains_from_the_files(written):
    """A logit-only schedule with ``teacher=OfflineTeacher(DIR)``: no teacher model, and the stored
    teacher's loss on the files goes down over three passes."""
    teacher = fastkd.OfflineTeacher(written, batch_size=4, seed=1)
    student = small_student()
    schedule = fastkd.Schedule([fastkd.Stage("kd", {"logit": 1.0, "ce": 0.2}, 3 * len(teacher))])
    runner = fastkd.StageRunner(student, teacher, schedule, torch.optim.AdamW(student.parameters(), lr=3e-2),
                                temperature=2.0, quiet=True)
    losses = []
    for _ in range(3):
        for batch in teacher:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            losses.append(float(runner.step(batch)["loss_logit"]))
    first, last = np.mean(losses[: len(teacher)]), np.mean(losses[-len(teacher):])
    assert last < 0.8 * first, losses


def test_runner_refuses_what_the_files_cannot_give(written):
    teacher = fastkd.OfflineTeacher(written)
    student = small_student()
    optimizer = torch.optim.AdamW(student.parameters())
    with pytest.raises(ValueError, match="need a live teacher"):
        fastkd.StageRunner(student, teacher, fastkd.Schedule.preset("two-stage", [1, 1]), optimizer)
    small = small_student(vocab=40)
    with pytest.raises(ValueError, match="vocab"):
        fastkd.StageRunner(small, teacher, fastkd.Schedule([fastkd.Stage("kd", {"logit": 1.0}, 1)]),
                           torch.optim.AdamW(small.parameters()))


def test_distill_offline_command(written, tmp_path, capsys):
    small_student().save_pretrained(tmp_path / "student")
    argv = ["distill", "--offline", str(written), "--student", str(tmp_path / "student"), "--steps", "4",
            "--batch-size", "3", "--ce", "0.5", "--quiet", "--log", str(tmp_path / "log.jsonl"),
            "--save", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("offline"))
    assert line.split()[1:3] == ["fastkd", "4"] and "logit=" in line and "ce=" in line
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(math.isfinite(r["loss_logit"]) for r in records)
    assert (tmp_path / "out" / "offline" / "config.json").exists()
    with pytest.raises(SystemExit):
        main(["distill", "--offline", str(written), "--student", str(tmp_path / "student"), "--preset", "one-stage"])
