"""``fastkd distill``: distil a student from a teacher with the stage runner.

With no arguments, a built-in demonstration: a small Llama-style teacher (4 blocks, width 256,
vocabulary 4096) is distilled into a smaller student (2 blocks, width 128) on generated text
through the three presets, and each configuration is run both by fastkd and the plain way
(:mod:`fastkd.runner.plain`); a table gives per configuration the mean step time (first step of
each stage left out), the peak step memory and the last losses. Both models start from random
weights with the same seed for both ways.

With ``--teacher`` and ``--student`` (each a ``save_pretrained`` directory, a directory holding only
a ``config.json``, or a config JSON file; the last two build a randomly initialised model), the
given ``--preset`` (all three when omitted) is run on ``--data`` (a text file, tokenized by the
teacher's tokenizer when its directory has one, else as UTF-8 bytes) or on generated text.
``--save DIR`` writes the distilled student (``save_pretrained``) and its projections
(``projections.pt``). ``--steps`` gives one count per stage, or one count used for every stage.

``--checkpoint-dir DIR`` checkpoints fastkd's run of each preset in ``DIR/<preset>/latest.pt``, at
the end of every stage and, with ``--checkpoint-every N``, every ``N`` steps. When that file exists
the run resumes from it and is fed the batches from the saved step on, so that a killed run,
started again with the same arguments, ends with the weights of an uninterrupted one.
``--log FILE`` appends every step's metrics to ``FILE`` as JSON lines (``preset``, ``way``,
``stage``, ``step``, ``loss``, ``loss_<name>``, ``time_ms``, ``peak_mem_mb``).

``--offline DIR`` distils ``--student`` from an offline teacher instead: the top-k files that
``fastkd teacher-topk`` wrote in ``DIR`` (:class:`fastkd.OfflineTeacher`, checked against the
student), no teacher model, one stage of ``--steps`` steps (default: one pass over the files) with
the ``logit`` loss (``fastkd.fused_linear_sparse_kl``, ``--tail``) and, with ``--ce W``, ``W`` times
the student's cross-entropy on the files' tokens. The batches are the files' (``--batch-size``
sequences of their length), reshuffled each pass; ``--checkpoint-dir``, ``--save`` and ``--log``
work as above (``DIR/offline/``), and there is no plain way to compare with.

``--attention {qk,maps,relations}`` is the runner's ``attention`` (how ``att`` compares the paired
blocks, see :class:`~fastkd.runner.StageRunner`; default: the runner's), ``--relation-heads N`` its
``relation_heads`` (and, without ``--attention``, means ``relations``). The plain way always
compares attention maps; it computes the same ``att`` as ``qk`` and ``maps``, not the relations, so
with ``relations`` it is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys

import torch

from fastkd.runner import Schedule, Stage, StageRunner
from fastkd.runner.measure import fix_mmap_threshold
from fastkd.runner.parallel import init_from_environment
from fastkd.runner.plain import PlainRunner
from fastkd.runner.schedule import PRESETS

DEMO_VOCAB = 4096
DEMO_TEACHER = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8)
DEMO_STUDENT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8)
DEMO_STEPS = {"one-stage": [6], "two-stage": [4, 4], "three-stage": [3, 3, 3]}


def generated_text(words: int, vocabulary: int, seed: int = 0) -> str:
    """Text of ``words`` pseudo-words from a random bigram language over ``vocabulary - 1`` words."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    lexicon = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(4 * vocabulary)})
    lexicon = lexicon[: vocabulary - 1]
    successors = {w: rng.sample(lexicon, 8) for w in lexicon}
    word, out = rng.choice(lexicon), []
    for _ in range(words):
        out.append(word)
        word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(lexicon)
    return " ".join(out)


def word_ids(text: str, vocabulary: int) -> list[int]:
    """Word-level ids: each distinct word by order of first appearance (id 0 kept for padding)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(w, 1 + len(ids) % (vocabulary - 1)) for w in text.split()]


def batches(tokens: list[int], batch_size: int, seq_len: int, steps: int, start: int = 0, rank: int = 0,
            world: int = 1):
    """The batches of steps ``start .. steps - 1`` of rank ``rank`` of ``world``: ``[batch_size,
    seq_len]`` consecutive token blocks, cycling through ``tokens``, block ``step * world + rank`` at
    a step (the same whatever ``start`` is)."""
    block = batch_size * seq_len
    data = torch.tensor(tokens * math.ceil(block * world / max(len(tokens), 1)), dtype=torch.long)
    count = len(data) // block
    for step in range(start, steps):
        index = (step * world + rank) % count
        ids = data[index * block : (index + 1) * block].view(batch_size, seq_len)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load_config(spec: str):
    """The transformers config of a ``save_pretrained`` directory, a config-only directory or a config JSON file."""
    from transformers import AutoConfig

    if os.path.isfile(spec):
        with open(spec) as f:
            fields = json.load(f)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if os.path.isdir(spec):
        return AutoConfig.from_pretrained(spec)
    raise ValueError(f"model: {spec!r} is neither a directory nor a config JSON file")


def load_model(spec: str, device: torch.device):
    """A transformers model from a ``save_pretrained`` directory, a config-only directory or a config JSON
    file (the last two randomly initialised)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = load_config(spec)
    pretrained = os.path.isdir(spec) and any(name.endswith((".safetensors", ".bin")) for name in os.listdir(spec))
    masked = any("MaskedLM" in name for name in (config.architectures or [])) or config.model_type == "bert"
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model = auto.from_pretrained(spec) if pretrained else auto.from_config(config)
    return model.to(device)


def demo_models(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=DEMO_VOCAB, **DEMO_TEACHER))
    student = LlamaForCausalLM(LlamaConfig(vocab_size=DEMO_VOCAB, **DEMO_STUDENT))
    return student.to(device), teacher.to(device)


def summarise(records: list[dict]) -> dict:
    """Mean step time without each stage's first step, peak memory, and the last losses (NaN and
    none when no step ran: a run resumed from the checkpoint of its last step)."""
    if not records:
        return {"time_ms": math.nan, "peak_mb": math.nan, "losses": {}, "steps": 0}
    timed = [r["time_ms"] for k, r in enumerate(records) if k > 0 and r["stage"] == records[k - 1]["stage"]]
    timed = timed or [r["time_ms"] for r in records]
    losses = {}
    for r in records:
        losses.update({k[5:]: v for k, v in r.items() if k.startswith("loss_")})
    return {
        "time_ms": sum(timed) / len(timed),
        "peak_mb": max(r["peak_mem_mb"] for r in records),
        "losses": losses,
        "steps": len(records),
    }


def run_configuration(way, make_models, preset, steps, args, tokens, device, log) -> dict:
    student, teacher = make_models()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    rank, world = args.rank, args.world
    trained = student
    if world > 1:  # under torchrun: DDP, each rank its own batches (fastkd.runner.parallel)
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(student, find_unused_parameters=True)
    runner_class = PlainRunner if way == "plain" else StageRunner
    checkpoints = os.path.join(args.checkpoint_dir, preset) if args.checkpoint_dir and way == "fastkd" else None
    attention = {}
    if way == "fastkd":  # the plain way compares attention maps whatever --attention says
        attention = {"attention": args.attention, "relation_heads": args.relation_heads}
    runner = runner_class(
        trained, teacher, Schedule.preset(preset, steps), optimizer,
        layer_map=args.layer_map, temperature=args.temperature, quiet=args.quiet, measure=True,
        checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every if checkpoints else None, **attention,
    )
    if checkpoints and os.path.exists(os.path.join(checkpoints, "latest.pt")):
        runner.load(os.path.join(checkpoints, "latest.pt"))
        print(f"resuming {preset} from {checkpoints} at step {runner.step_index}", flush=True)
    total = runner.schedule.total_steps
    records = []
    for metrics in runner.run(batches(tokens, args.batch_size, args.seq_len, total, runner.step_index, rank, world)):
        records.append(metrics)
        if log is not None and rank == 0:
            log.write(json.dumps({"preset": preset, "way": way, **metrics}) + "\n")
            log.flush()
    if args.save and way == "fastkd" and rank == 0:
        out = os.path.join(args.save, preset)
        student.save_pretrained(out)
        torch.save(runner.projections.state_dict(), os.path.join(out, "projections.pt"))
    return summarise(records)


def _format_losses(losses: dict) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in losses.items())


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastkd distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="teacher: save_pretrained directory or config JSON")
    parser.add_argument("--student", help="student: save_pretrained directory or config JSON")
    parser.add_argument("--preset", choices=list(PRESETS), action="append", help="configuration(s); default all")
    parser.add_argument("--steps", type=int, nargs="+", help="steps per stage (one count: every stage)")
    parser.add_argument("--data", help="text file to distil on (default: generated text)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layer-map", default="uniform", choices=["uniform", "last"])
    parser.add_argument(
        "--attention", choices=["qk", "maps", "relations"],
        help="how 'att' compares attention: from queries and keys (qk), maps, or MiniLMv2 relations "
        "(default: qk, maps for models that only give maps)",
    )
    parser.add_argument(
        "--relation-heads", type=int, metavar="N", help="relation heads for --attention relations (implies it)"
    )
    parser.add_argument("--offline", metavar="DIR", help="distil from the top-k files of `fastkd teacher-topk` in DIR")
    parser.add_argument("--tail", choices=["renormalize", "bucket"], default="renormalize",
                        help="--offline: how the stored top-k is compared (bucket needs --temperature 1)")
    parser.add_argument("--ce", type=float, default=0.0, metavar="W",
                        help="--offline: add W x the student's cross-entropy on the files' tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain way")
    parser.add_argument("--save", help="directory for the distilled student(s)")
    parser.add_argument("--checkpoint-dir", help="checkpoint (and resume) each preset's run in DIR/<preset>/")
    parser.add_argument("--checkpoint-every", type=int, metavar="N", help="also checkpoint every N steps")
    parser.add_argument("--log", help="append every step's metrics to this file as JSON lines")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="under torchrun: seconds a collective may wait for another rank before failing")
    args = parser.parse_args(argv)
    if args.offline is not None:
        if args.student is None or args.teacher is not None or args.preset:
            parser.error("--offline DIR takes --student and no --teacher or --preset: the files are the teacher")
        if args.steps is not None and len(args.steps) != 1:
            parser.error("--offline runs one stage: give --steps one count")
        if args.ce < 0:
            parser.error(f"--ce: expected a weight >= 0, got {args.ce}")
        return args
    if (args.teacher is None) != (args.student is None):
        parser.error("--teacher and --student go together")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        parser.error("--checkpoint-every needs --checkpoint-dir")
    if args.checkpoint_every is not None and args.checkpoint_every <= 0:
        parser.error(f"--checkpoint-every: expected a positive count, got {args.checkpoint_every}")
    if args.relation_heads is not None:
        if args.attention not in (None, "relations"):
            parser.error(f"--relation-heads goes with --attention relations, not --attention {args.attention}")
        if args.relation_heads <= 0:
            parser.error(f"--relation-heads: expected a positive count, got {args.relation_heads}")
        args.attention = "relations"
    elif args.attention == "relations":
        parser.error("--attention relations needs --relation-heads N")
    return args


def offline_batches(teacher, start: int, with_labels: bool):
    """The offline teacher's batches from step ``start`` on, pass after pass (the same batch at a
    step whatever ``start`` is); ``labels`` are the tokens where ``with_labels``."""
    step = 0
    while True:
        for batch in teacher:
            if step >= start:
                if with_labels:
                    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                yield batch
            step += 1
        if step == 0:
            return


def run_offline(args, device, log) -> int:
    """``--offline``: one logit stage (and ``ce`` with ``--ce``) from the top-k files (module docstring)."""
    from fastkd.offline import OfflineTeacher

    teacher = OfflineTeacher(args.offline, batch_size=args.batch_size)
    torch.manual_seed(0)
    student = load_model(args.student, device)
    losses = {"logit": 1.0, **({"ce": args.ce} if args.ce else {})}
    steps = args.steps[0] if args.steps else len(teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    checkpoints = os.path.join(args.checkpoint_dir, "offline") if args.checkpoint_dir else None
    runner = StageRunner(
        student, teacher, Schedule([Stage("offline", losses, steps)]), optimizer, temperature=args.temperature,
        tail=args.tail, quiet=args.quiet, measure=True, checkpoint_dir=checkpoints,
        checkpoint_every=args.checkpoint_every if checkpoints else None,
    )
    if checkpoints and os.path.exists(os.path.join(checkpoints, "latest.pt")):
        runner.load(os.path.join(checkpoints, "latest.pt"))
        print(f"resuming offline from {checkpoints} at step {runner.step_index}", flush=True)
    print(f"fastkd distill on {device} from the top-k files in {args.offline} (k={teacher.k}): batch "
          f"{args.batch_size} x {teacher.seq_len}, T={args.temperature}, tail={args.tail}")
    records = []
    for metrics in runner.run(offline_batches(teacher, runner.step_index, "ce" in losses)):
        records.append(metrics)
        if log is not None:
            log.write(json.dumps({"preset": "offline", "way": "fastkd", **metrics}) + "\n")
            log.flush()
    result = summarise(records)
    print(f"{'configuration':<13} {'way':<7} {'steps':>5} {'ms/step':>9} {'peak MB':>9}  losses (last step)")
    print(f"{'offline':<13} {'fastkd':<7} {result['steps']:>5} {result['time_ms']:>9.1f} {result['peak_mb']:>9.1f}  "
          f"{_format_losses(result['losses'])}", flush=True)
    if args.save:
        student.save_pretrained(os.path.join(args.save, "offline"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    fix_mmap_threshold()
    args.rank, args.world = init_from_environment(args.device, args.timeout)
    if args.world > 1:
        if args.offline is not None:
            raise SystemExit("fastkd distill: --offline runs on one process; under torchrun use the live teacher")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{torch.cuda.current_device()}"
        if not args.no_plain:
            if args.rank == 0:
                print(f"fastkd distill: {args.world} ranks (DDP); the plain way runs on one process, so it is skipped")
            args.no_plain = True
    if args.rank != 0:  # the tables and progress bars of rank 0 only
        sys.stdout = open(os.devnull, "w")
    device = torch.device(args.device)
    if args.offline is not None:
        with open(args.log, "a") if args.log else contextlib.nullcontext() as log:
            return run_offline(args, device, log)
    presets = args.preset or list(PRESETS)
    if args.teacher is None:
        vocab = DEMO_VOCAB
        make_models = lambda: demo_models(device)  # noqa: E731
    else:
        def make_models():
            torch.manual_seed(0)
            return load_model(args.student, device), load_model(args.teacher, device)

        load_config(args.student)  # a wrong path fails here, before any output
        vocab = load_config(args.teacher).vocab_size
    tokens = _tokens(args, vocab)
    ranks = f" x {args.world} ranks" if args.world > 1 else ""
    print(f"fastkd distill on {device}: batch {args.batch_size} x {args.seq_len}{ranks}, T={args.temperature}")
    if args.attention == "relations" and not args.no_plain:
        print("the plain way is skipped: it compares attention maps, not relations")
    header = f"{'configuration':<13} {'way':<7} {'steps':>5} {'ms/step':>9} {'peak MB':>9} {'speed-up':>8} {'mem':>6}  losses (last step of each)"
    print(header)
    with open(args.log, "a") if args.log else contextlib.nullcontext() as log:
        for preset in presets:
            steps = _steps(args.steps, preset, args.teacher is None)
            results = {}
            plain = not args.no_plain and args.attention != "relations"  # the plain way has no relations
            for way in ("plain", "fastkd") if plain else ("fastkd",):
                results[way] = result = run_configuration(way, make_models, preset, steps, args, tokens, device, log)
                speed = mem = ""
                if way == "fastkd" and "plain" in results:
                    speed = f"{results['plain']['time_ms'] / result['time_ms']:.2f}x"
                    mem = f"{result['peak_mb'] / results['plain']['peak_mb']:.2f}x"
                print(
                    f"{preset:<13} {way:<7} {result['steps']:>5} {result['time_ms']:>9.1f} {result['peak_mb']:>9.1f} "
                    f"{speed:>8} {mem:>6}  {_format_losses(result['losses'])}",
                    flush=True,
                )
    return 0


def _steps(steps, preset, demo) -> list[int]:
    stages = len(PRESETS[preset])
    if steps is None:
        return DEMO_STEPS[preset] if demo else [100] * stages
    return steps * stages if len(steps) == 1 else steps


def _tokens(args, vocab: int) -> list[int]:
    if args.data is None:
        return word_ids(generated_text(20000, vocab), vocab)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    if args.teacher is not None and os.path.isdir(args.teacher):
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(args.teacher)(text)["input_ids"]
        except (OSError, ValueError):
            pass
    return [b % vocab for b in text.encode("utf-8")]


if __name__ == "__main__":
    sys.exit(main())
