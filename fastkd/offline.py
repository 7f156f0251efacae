"""Offline distillation: run the teacher once, keep its top-k log-probabilities per token, and distil
later from those files with the teacher nowhere in memory.

``topk_logprobs(logits, k)`` keeps the ``k`` most probable tokens of every row and their
log-probabilities. ``fastkd teacher-topk`` (:func:`main`) runs a transformers causal LM over a data
file and writes them into a directory of shards; :class:`OfflineTeacher` reads that directory back
as batches.

The directory (format version 1):

- ``shard-00000.safetensors``, ``shard-00001.safetensors``, ...: rows ``first_row .. first_row + rows``
  of the data, each a sequence of ``seq_len`` positions, as four tensors: ``input_ids`` int32
  ``[rows, seq_len]``; ``attention_mask`` uint8 ``[rows, seq_len]`` (1 a token, 0 padding: only the
  last sequence has any, at its end); ``teacher_ids`` int32 ``[rows, seq_len, k]``, the teacher's
  ``k`` most probable tokens at each position, most probable first; ``teacher_logprobs``
  ``[rows, seq_len, k]`` (float16, or bfloat16 when asked), their log-probabilities at temperature 1.
  Position ``i`` holds the teacher's distribution at position ``i``, its prediction of token
  ``i + 1``, aligned with the logits and not shifted. Padding positions hold ids ``-1`` and
  log-probabilities ``-inf``, so that ``exp`` gives them probability 0.
- ``manifest.json``: ``format`` ("fastkd-teacher-topk"), ``version``, ``teacher`` (``path``,
  ``model_type``, ``vocab_size`` the width of its logits, ``dtype`` it ran in), ``k``, ``temperature``
  (1.0), ``seq_len``, ``logprob_dtype``, ``tokenizer`` (``name_or_path``, ``class``, ``vocab_size``,
  ``vocab_sha256`` of its sorted vocabulary; or ``"utf-8 bytes"``; or null for token-id files of a
  teacher without a tokenizer), ``data`` (``name``, ``path``, ``format``, ``sha256``), ``batch_size``,
  ``counts`` (``sequences``, ``tokens`` without padding, ``shards``, ``rows_per_shard``), ``shards``
  (per shard: ``file``, ``first_row``, ``rows``, ``complete``, and ``max_id``, the largest id it
  stores, once complete) and ``finished``.

Why float16 for the log-probabilities: they lie in about ``[-100, 0]``, where float16's 10-bit
mantissa is 8 times finer than bfloat16's 7 bits and its range suffices; ``-inf`` is representable
in both. A token costs ``6 k + 5`` bytes: int32 ids and float16 log-probabilities, its int32 input id
and uint8 mask (389 bytes at ``k = 64``, 773 at ``k = 128``).

Writes are atomic: each shard goes to ``<file>.tmp``, flushed and ``fsync``-ed, then renamed over
its name (``os.replace``), and the manifest is rewritten the same way after it, marking the shard
complete. The manifest alone says which shards are complete: a shard file it does not mark complete
(a run killed between the two renames) is computed and written again. A run started again with the
same arguments on the same directory skips the complete shards and continues; with different ones
(teacher, data, tokenizer, ``k``, ``seq_len``, dtypes, ``--rows-per-shard``) it stops with an error.
``--batch-size`` and ``--device`` may change between runs: they change no stored value beyond
rounding. Batches never straddle two shards, so a run resumed with the same arguments writes the
bytes of an uninterrupted one on a deterministic device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings

import numpy as np
import torch

from fastkd._files import fsync_directory

FORMAT = "fastkd-teacher-topk"
VERSION = 1
MANIFEST = "manifest.json"
CHUNK_ELEMENTS = 1 << 22  # elements of the logits made float32 at once by topk_logprobs
TOKEN_FILES = (".npy", ".safetensors", ".pt")
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
SHARD_DTYPES = {"input_ids": "I32", "attention_mask": "U8", "teacher_ids": "I32"}
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
# The manifest entries a resumed run must share with the run that started the directory.
RUN_KEYS = ("teacher", "k", "temperature", "seq_len", "logprob_dtype", "tokenizer", "data", "counts")


@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable entries of every row of ``logits`` ``[..., V]`` and their log-probabilities.

    Returns ``(ids, logprobs)``, both ``[..., k]`` on the logits' device: ``ids`` int64, most
    probable first, and ``logprobs`` float32,
    ``logprobs[..., j] = logits[..., ids[..., j]] - logsumexp(logits.float(), dim=-1)``, that is
    ``log_softmax(logits.float(), dim=-1)`` at ``ids``. Ties are broken as ``torch.topk`` breaks them.
    Rows are processed in chunks of about 2^22 elements: the top-k is taken on the logits in their
    own dtype (the order is the same in float32), and only one chunk at a time is made float32 for
    its log-sum-exps. The results carry no gradient.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(
            f"logits: expected a floating-point tensor (float32, bfloat16, float16, float64), got {logits.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError("logits: expected a tensor [..., V] with at least one dimension, got a 0-d tensor")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected a Python int, got {type(k).__name__}")
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k: expected an int in [1, {vocab}] (the logits' last dimension), got {k}")
    rows = logits.reshape(-1, vocab)
    ids = torch.empty(rows.shape[0], k, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows.shape[0], k, dtype=torch.float32, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        values, top = chunk.topk(k, dim=-1)
        ids[start : start + step] = top
        logprobs[start : start + step] = values.float() - torch.logsumexp(chunk.float(), dim=-1, keepdim=True)
    return ids.view(*logits.shape[:-1], k), logprobs.view(*logits.shape[:-1], k)


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer in a manifest: ``name_or_path``, ``class``, ``vocab_size`` (its
    length, added tokens included) and ``vocab_sha256``, the sha256 of its vocabulary as a JSON
    list of ``[token, id]`` pairs sorted by token."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "name_or_path": tokenizer.name_or_path,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest(),
    }


# ------------------------------------------------------------------------------------------------
# Writing: fastkd teacher-topk


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_durably(tmp: str, path: str) -> None:
    """``fsync`` the written file ``tmp``, rename it over ``path`` and ``fsync`` the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def _write_manifest(directory: str, manifest: dict) -> None:
    path = os.path.join(directory, MANIFEST)
    with open(f"{path}.tmp", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    _replace_durably(f"{path}.tmp", path)


def _teacher_tokenizer(teacher: str):
    """The tokenizer saved in the teacher's directory, or None when it holds none (no
    ``tokenizer_config.json`` or ``tokenizer.json``)."""
    if not any(os.path.isfile(os.path.join(teacher, name)) for name in ("tokenizer_config.json", "tokenizer.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher)


def read_tokens(path: str, tokenizer_dir: str | None, vocab_size: int) -> tuple[torch.Tensor, str]:
    """The token stream of the data file ``path`` as int64 ``[N]``, and its format.

    ``.npy``, ``.safetensors`` (one tensor, or one named ``input_ids``) and ``.pt`` (a tensor) files
    hold integer token ids of any shape, read in row-major order; any other file is UTF-8 text,
    tokenized as ``fastkd distill`` does: by the tokenizer of ``tokenizer_dir``, or as UTF-8 bytes
    (modulo ``vocab_size``) when it is None.
    """
    from fastkd.distill import _tokens

    suffix = os.path.splitext(path)[1]
    if suffix not in TOKEN_FILES:
        text = _tokens(argparse.Namespace(data=path, teacher=tokenizer_dir), vocab_size)
        return torch.tensor(text, dtype=torch.int64), "text"
    if suffix == ".npy":
        ids = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".pt":
        ids = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1 and "input_ids" not in tensors:
            raise ValueError(f"data: {path} holds {sorted(tensors)}; expected one tensor or one named 'input_ids'")
        ids = tensors["input_ids"] if "input_ids" in tensors else next(iter(tensors.values()))
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"data: {path} must hold integer token ids, got {got}")
    ids = ids.reshape(-1).to(torch.int64)
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
        raise ValueError(
            f"data: {path} holds token ids in [{int(ids.min())}, {int(ids.max())}], outside the teacher's "
            f"vocabulary [0, {vocab_size})"
        )
    return ids, suffix[1:]


def _existing_manifest(out: str, manifest: dict) -> dict | None:
    """The manifest already in ``out`` when it was written by a run with the same arguments; None
    when ``out`` holds nothing yet; a SystemExit naming the differences otherwise."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        if any(not name.endswith(".tmp") for name in os.listdir(out)):
            raise SystemExit(f"fastkd teacher-topk: --out {out} is not empty and holds no {MANIFEST}")
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as error:
        raise SystemExit(f"fastkd teacher-topk: --out {out}: cannot read {MANIFEST} ({error})") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT or old.get("version") != VERSION:
        raise SystemExit(f"fastkd teacher-topk: --out {out}: {MANIFEST} is not a version {VERSION} {FORMAT} manifest")
    differences = [
        f"{key}: {old.get(key)!r} there, {manifest[key]!r} here" for key in RUN_KEYS if old.get(key) != manifest[key]
    ]
    if differences:
        raise SystemExit(
            f"fastkd teacher-topk: --out {out} was written with other arguments ({'; '.join(differences)}); "
            "use another --out, or the same arguments to resume"
        )
    return old


def _write_shard(path: str, model, ids: torch.Tensor, mask: torch.Tensor, args, dtype, bar) -> int:
    """Run the teacher over the rows ``ids``, ``mask`` ``[rows, seq_len]`` in batches and write their
    shard to ``path`` atomically; returns the largest id it stores."""
    from safetensors.torch import save_file

    rows, device = ids.shape[0], torch.device(args.device)
    teacher_ids = torch.empty(rows, args.seq_len, args.k, dtype=torch.int32)
    teacher_logprobs = torch.empty(rows, args.seq_len, args.k, dtype=dtype)
    for start in range(0, rows, args.batch_size):
        batch = slice(start, start + args.batch_size)
        batch_mask = mask[batch].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids[batch].to(device), attention_mask=batch_mask, use_cache=False).logits
        if logits.shape[-1] != model.config.vocab_size:
            raise SystemExit(f"fastkd teacher-topk: the teacher's logits are {logits.shape[-1]} wide, "
                             f"its config says vocab_size {model.config.vocab_size}")
        top_ids, top_logprobs = topk_logprobs(logits, args.k)
        padding = (batch_mask == 0)[..., None]
        teacher_ids[batch] = top_ids.masked_fill(padding, -1).to(torch.int32).cpu()
        teacher_logprobs[batch] = top_logprobs.masked_fill(padding, -math.inf).to(dtype).cpu()
        bar.update(min(args.batch_size, rows - start))
    tensors = {
        "input_ids": ids.to(torch.int32),
        "attention_mask": mask.to(torch.uint8),
        "teacher_ids": teacher_ids,
        "teacher_logprobs": teacher_logprobs,
    }
    # one metadata entry: safetensors writes several in an order that changes from process to process
    save_file(tensors, f"{path}.tmp", metadata={"format": FORMAT})
    _replace_durably(f"{path}.tmp", path)
    return max(int(ids.max()), int(teacher_ids.max()))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="fastkd teacher-topk",
        description="Run a causal LM teacher over a data file once and write its top-k log-probabilities "
        "per token into shards, for fastkd.OfflineTeacher.",
    )
    parser.add_argument("--teacher", required=True, help="the teacher's save_pretrained directory")
    parser.add_argument(
        "--data", required=True,
        help="a UTF-8 text file (tokenized by the teacher's tokenizer, else as bytes) or a file of integer "
        "token ids: .npy, .safetensors (one tensor, or 'input_ids') or .pt (a tensor)",
    )
    parser.add_argument("--out", required=True, help="output directory (a stopped run in it is resumed)")
    parser.add_argument("--k", type=int, default=64, help="log-probabilities kept per token (default: 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per teacher call (default: 8)")
    parser.add_argument("--rows-per-shard", type=int, default=1024, help="sequences per shard (default: 1024)")
    parser.add_argument(
        "--dtype", choices=list(LOGPROB_DTYPES), default="float16", help="stored log-probabilities (default: float16)"
    )
    parser.add_argument(
        "--teacher-dtype", choices=TEACHER_DTYPES, default="auto",
        help="dtype the teacher runs in (default: auto, the dtype it was saved in)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("k", "seq_len", "batch_size", "rows_per_shard"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive count, got {getattr(args, name)}")
    if not os.path.isdir(args.teacher):
        parser.error(f"--teacher: {args.teacher} is not a directory")
    if not os.path.isfile(args.data):
        parser.error(f"--data: {args.data} is not a file")
    return args


def main(argv: list[str] | None = None) -> int:
    """``fastkd teacher-topk``: write the teacher's top-k log-probabilities of a data file (module docstring)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from fastkd.distill import load_config

    args = parse_args(sys.argv[1:] if argv is None else argv)
    teacher, data = os.path.abspath(args.teacher), os.path.abspath(args.data)
    config = load_config(teacher)
    vocab_size = config.vocab_size
    if args.k > vocab_size:
        raise SystemExit(f"fastkd teacher-topk: --k {args.k} is more than the teacher's vocabulary ({vocab_size})")
    tokenizer = _teacher_tokenizer(teacher)
    tokens, data_format = read_tokens(data, None if tokenizer is None else teacher, vocab_size)
    if tokens.numel() == 0:
        raise SystemExit(f"fastkd teacher-topk: --data {args.data} holds no tokens")
    sequences = math.ceil(tokens.numel() / args.seq_len)
    ids = torch.zeros(sequences * args.seq_len, dtype=torch.int64)
    ids[: tokens.numel()] = tokens
    mask = (torch.arange(ids.numel()) < tokens.numel()).to(torch.uint8)
    ids, mask = ids.view(sequences, args.seq_len), mask.view(sequences, args.seq_len)
    shards = math.ceil(sequences / args.rows_per_shard)
    dtype = args.teacher_dtype
    if dtype == "auto":
        dtype = str(config.dtype or torch.float32).removeprefix("torch.")
    if tokenizer is not None:
        identity = tokenizer_identity(tokenizer)
    else:
        identity = "utf-8 bytes" if data_format == "text" else None
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"path": teacher, "model_type": config.model_type, "vocab_size": vocab_size, "dtype": dtype},
        "k": args.k,
        "temperature": 1.0,
        "seq_len": args.seq_len,
        "logprob_dtype": args.dtype,
        "tokenizer": identity,
        "data": {"name": os.path.basename(data), "path": data, "format": data_format, "sha256": _sha256(data)},
        "batch_size": args.batch_size,
        "counts": {
            "sequences": sequences, "tokens": tokens.numel(), "shards": shards, "rows_per_shard": args.rows_per_shard
        },
        "shards": [
            {"file": f"shard-{index:05d}.safetensors", "first_row": index * args.rows_per_shard,
             "rows": min(args.rows_per_shard, sequences - index * args.rows_per_shard),
             "complete": False, "max_id": None}
            for index in range(shards)
        ],
        "finished": False,
    }
    os.makedirs(args.out, exist_ok=True)
    old = _existing_manifest(args.out, manifest)
    if old is not None:
        manifest["shards"] = old["shards"]
        manifest["batch_size"] = old["batch_size"]
    _write_manifest(args.out, manifest)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=getattr(torch, dtype)).to(args.device).eval()
    done = sum(shard["rows"] for shard in manifest["shards"] if shard["complete"])
    with tqdm(total=sequences, initial=done, disable=args.quiet, desc="teacher-topk", unit="seq") as bar:
        for shard in manifest["shards"]:
            if shard["complete"]:
                continue
            rows = slice(shard["first_row"], shard["first_row"] + shard["rows"])
            path = os.path.join(args.out, shard["file"])
            shard["max_id"] = _write_shard(path, model, ids[rows], mask[rows], args, LOGPROB_DTYPES[args.dtype], bar)
            shard["complete"] = True
            _write_manifest(args.out, manifest)
    manifest["finished"] = True
    _write_manifest(args.out, manifest)
    print(f"fastkd teacher-topk: {shards} shards, {sequences} sequences of {args.seq_len}, {tokens.numel()} tokens "
          f"in {args.out} ({6 * args.k + 5} bytes per position)")
    return 0


# ------------------------------------------------------------------------------------------------
# Reading: OfflineTeacher


class OfflineTeacher:
    """The batches of a ``fastkd teacher-topk`` directory, for distilling without the teacher.

    Iterating gives one epoch of dicts of CPU tensors: ``input_ids`` and ``attention_mask`` int64
    ``[B, seq_len]``, ``teacher_ids`` int64 ``[B, seq_len, k]`` (``-1`` at padding) and
    ``teacher_logprobs`` float32 ``[B, seq_len, k]`` (``-inf`` at padding), ``B = batch_size`` (the
    writing run's ``--batch-size`` when None) except perhaps for the epoch's last batch, which
    ``drop_last`` leaves out. Each row of the directory comes exactly once per epoch. Shards are read
    one at a time; with ``shuffle`` the order of the shards and the order of the rows inside each
    shard are permutations drawn from ``(seed, epoch)``, and batches run on across shard boundaries.
    Each iteration is the next epoch, from 0; :meth:`set_epoch` chooses the next one.

    A top-k loss from a batch, the student's log-probabilities at the teacher's ids::

        log_q = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        keep = batch["teacher_ids"] >= 0
        log_q_at = log_q.gather(-1, batch["teacher_ids"].clamp(min=0))
        p = batch["teacher_logprobs"].exp()
        kl = torch.where(keep, p * (batch["teacher_logprobs"] - log_q_at), 0.0).sum() / keep[..., 0].sum()

    The manifest and every shard's header (names, dtypes, shapes) are checked on construction, the
    stored ids' range when a shard is read; each problem is a ValueError naming the file (a missing
    manifest a FileNotFoundError). A directory whose run is still going, or stopped, is read with a
    warning: only the shards its manifest marks complete are used.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.directory = os.fspath(directory)
        self.manifest = _read_manifest(self.directory)
        if batch_size is not None and (type(batch_size) is not int or batch_size <= 0):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        self.batch_size = self.manifest["batch_size"] if batch_size is None else batch_size
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        self.shards = [shard for shard in self.manifest["shards"] if shard["complete"]]
        if len(self.shards) < len(self.manifest["shards"]):
            warnings.warn(
                f"{self.directory}: {len(self.shards)} of {len(self.manifest['shards'])} shards are complete "
                "(a teacher-topk run still going or stopped); only those are read",
                stacklevel=2,
            )
        for shard in self.shards:
            self._check_header(shard)

    @property
    def k(self) -> int:
        """Log-probabilities per position."""
        return self.manifest["k"]

    @property
    def vocab_size(self) -> int:
        """The width of the teacher's logits."""
        return self.manifest["teacher"]["vocab_size"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def teacher(self) -> str:
        """The teacher's directory, as the writing run saw it."""
        return self.manifest["teacher"]["path"]

    @property
    def tokenizer(self) -> dict | str | None:
        """The tokenizer's identity (:func:`tokenizer_identity`), ``"utf-8 bytes"``, or None when unknown."""
        return self.manifest["tokenizer"]

    @property
    def num_rows(self) -> int:
        """Sequences in the complete shards: the rows of one epoch."""
        return sum(shard["rows"] for shard in self.shards)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch of the next iteration (and count on from it)."""
        self.epoch = epoch

    def check_student(self, model_or_config=None, tokenizer=None) -> None:
        """Raise a ValueError when a student cannot use these top-k: its vocabulary (``vocab_size`` of
        a model's config, or of a config) is smaller than the largest stored id needs, or
        ``tokenizer``'s vocabulary is not the one the manifest names (its size and ``vocab_sha256``;
        the name and class may differ). Either may be left out; a tokenizer is not checked against a
        manifest that records none."""
        if model_or_config is not None:
            vocab_size = getattr(getattr(model_or_config, "config", model_or_config), "vocab_size", None)
            if not isinstance(vocab_size, int):
                raise TypeError(f"model_or_config: expected a model or config with an int vocab_size, got "
                                f"{type(model_or_config).__name__}")
            needed = 1 + max(shard["max_id"] for shard in self.shards) if self.shards else 0
            if vocab_size < needed:
                raise ValueError(
                    f"model_or_config: the student's vocabulary ({vocab_size}) is smaller than the stored ids "
                    f"need ({needed}: ids up to {needed - 1}; teacher vocabulary {self.vocab_size})"
                )
        if tokenizer is not None and self.tokenizer is not None:
            if self.tokenizer == "utf-8 bytes":
                raise ValueError(f"tokenizer: the data was read as UTF-8 bytes, got a {type(tokenizer).__name__} "
                                 f"({tokenizer.name_or_path})")
            got = tokenizer_identity(tokenizer)
            want = self.tokenizer
            if (got["vocab_size"], got["vocab_sha256"]) != (want["vocab_size"], want["vocab_sha256"]):
                raise ValueError(
                    f"tokenizer: {got['name_or_path']} ({got['vocab_size']} tokens, vocabulary sha256 "
                    f"{got['vocab_sha256'][:12]}) is not the teacher's {self.tokenizer['name_or_path']} "
                    f"({self.tokenizer['vocab_size']} tokens, {self.tokenizer['vocab_sha256'][:12]})"
                )

    def _expected(self, shard: dict) -> dict[str, tuple[str, list[int]]]:
        rows, length, k = shard["rows"], self.seq_len, self.k
        shapes = {"input_ids": [rows, length], "attention_mask": [rows, length], "teacher_ids": [rows, length, k],
                  "teacher_logprobs": [rows, length, k]}
        dtypes = {**SHARD_DTYPES, "teacher_logprobs": SAFETENSORS_DTYPES[self.manifest["logprob_dtype"]]}
        return {name: (dtypes[name], shapes[name]) for name in shapes}

    def _check_header(self, shard: dict) -> None:
        from safetensors import safe_open

        path = os.path.join(self.directory, shard["file"])
        try:
            with safe_open(path, framework="pt") as f:
                slices = {name: f.get_slice(name) for name in f.keys()}
                found = {name: (t.get_dtype(), list(t.get_shape())) for name, t in slices.items()}
        except Exception as error:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{path}: not a readable safetensors shard ({error})") from None
        for name, (dtype, shape) in self._expected(shard).items():
            if name not in found:
                raise ValueError(f"{path}: no tensor {name!r} (found {sorted(found)})")
            if found[name] != (dtype, shape):
                raise ValueError(f"{path}: {name} is {found[name][0]} {found[name][1]}, the manifest (k={self.k}, "
                                 f"seq_len={self.seq_len}, {shard['rows']} rows) says {dtype} {shape}")

    def _load(self, shard: dict) -> dict[str, torch.Tensor]:
        """A shard's tensors, with the range of its ids checked."""
        from safetensors.torch import load_file

        path = os.path.join(self.directory, shard["file"])
        tensors = load_file(path)
        ids, teacher_ids, padding = tensors["input_ids"], tensors["teacher_ids"], tensors["attention_mask"] == 0
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.vocab_size):
            raise ValueError(f"{path}: input_ids in [{int(ids.min())}, {int(ids.max())}], outside the teacher's "
                             f"vocabulary [0, {self.vocab_size})")
        kept = teacher_ids[~padding]
        if kept.numel() and not (0 <= int(kept.min()) and int(kept.max()) < self.vocab_size):
            raise ValueError(f"{path}: teacher_ids in [{int(kept.min())}, {int(kept.max())}], outside the teacher's "
                             f"vocabulary [0, {self.vocab_size})")
        if not bool((teacher_ids[padding] == -1).all()):
            raise ValueError(f"{path}: teacher_ids at padding positions must be -1")
        return tensors

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.shards)) if self.shuffle else range(len(self.shards))
        pending: dict[str, torch.Tensor] | None = None
        for index in order:
            tensors = self._load(self.shards[index])
            if self.shuffle:
                rows = torch.from_numpy(rng.permutation(self.shards[index]["rows"]))
                tensors = {name: x[rows] for name, x in tensors.items()}
            if pending is not None:
                tensors = {name: torch.cat([pending[name], x]) for name, x in tensors.items()}
            count = tensors["input_ids"].shape[0]
            full = count - count % self.batch_size
            for start in range(0, full, self.batch_size):
                yield _batch({name: x[start : start + self.batch_size] for name, x in tensors.items()})
            pending = {name: x[full:] for name, x in tensors.items()} if full < count else None
        if pending is not None and not self.drop_last:
            yield _batch(pending)


def _batch(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": tensors["input_ids"].long(),
        "attention_mask": tensors["attention_mask"].long(),
        "teacher_ids": tensors["teacher_ids"].long(),
        "teacher_logprobs": tensors["teacher_logprobs"].float(),
    }


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"directory: {directory} holds no {MANIFEST} (not written by fastkd teacher-topk)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: format version {manifest.get('version')!r}; this fastkd reads version {VERSION}")
    missing = [key for key in (*RUN_KEYS, "batch_size", "counts", "shards") if key not in manifest]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    if manifest["logprob_dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(
            f"{path}: logprob_dtype {manifest['logprob_dtype']!r}, expected one of {list(SAFETENSORS_DTYPES)}"
        )
    return manifest
