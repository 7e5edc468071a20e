"""``clipline`` command line: shards, data doctor, pretrain, eval, evalset, export, wise-ft,
embed, search, demo.

This module holds the parser, logging set-up and the entry point (``main``, which turns bad
input into one line and exit 2); what each command does is in :mod:`clipline.launch.commands`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from clipline.launch import commands


class _BarAwareHandler(logging.StreamHandler):
    """Writes records through tqdm, which lifts a terminal's progress bar above each line."""

    def __init__(self, stream: object) -> None:
        super().__init__(stream)
        self._pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: no bar of its own to lift
            super().emit(record)
            return
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: never raise from emit
            self.handleError(record)


def _setup_logging() -> None:
    # Rank 0 speaks; other ranks only warn (RANK is set by torchrun and accelerate launch).
    # clipline's loggers ("clipline.pretrain.loop", ...) get INFO; libraries stay at WARNING.
    # (Setting logging.getLogger("root") to WARNING, as this once did, silences everything:
    # since Python 3.9 that name is the root logger itself.)
    handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.getLogger("clipline").setLevel(logging.INFO if rank0 else logging.WARNING)


def _int_in(low: int, high: int | None = None):
    """An argparse ``type`` that rejects ints outside ``[low, high]``; argparse's message then
    names the flag as the user typed it (``argument --workers: ...``)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value: 'x'" for non-numbers
    return parse


# clipline export --format (and wise-ft's): the formats pretrain.export registers, and "all";
# listed here so that parsing the command line does not import the model libraries.
_EXPORT_CHOICES = ["clipline", "open_clip", "hf", "onnx", "all"]


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    """``clipline eval``'s task flags (``--zeroshot``, ``--retrieval``, ``--linear-probe``)."""
    task_help = (
        "an eval set; options after the root set the task's fields, e.g. "
        "NAME=ROOT,format=folder,split=val (format: wds (default), folder, csv, mnist, "
        "fashion_mnist; see the README)"
    )
    p.add_argument(
        "--zeroshot", action="append", default=[], metavar="NAME=ROOT[,k=v...]", help=task_help
    )
    p.add_argument(
        "--retrieval", action="append", default=[], metavar="NAME=ROOT[,k=v...]", help=task_help
    )
    p.add_argument(
        "--linear-probe",
        action="append",
        default=[],
        metavar="NAME=ROOT[,k=v...]",
        help="a linear probe on frozen image features (train_split, test_split, format, ...)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipline", description="CLIP-style contrastive image-text pretraining."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "shards",
        help="CSV/TSV/JSONL/Parquet or a folder of pairs -> webdataset shards "
        "(--index-only: manifest for existing shards)",
    )
    p.add_argument(
        "input",
        help="a .csv/.tsv/.jsonl/.parquet file or a folder of name.jpg + name.txt; with "
        "--index-only: existing shards (a folder, glob or {a..b} pattern)",
    )
    p.add_argument(
        "output_dir",
        nargs="?",
        help="where the shards go; with --index-only: a folder for links + manifest "
        "(default: write sizes.json next to the shards)",
    )
    p.add_argument("--image-column", default="filepath")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--samples-per-shard", type=_int_in(1), default=1000)
    p.add_argument(
        "--workers",
        type=_int_in(1),
        default=1,
        help="image encoding processes (same output for any N)",
    )
    p.add_argument(
        "--max-side",
        type=_int_in(1),
        default=None,
        help="shrink images to this longer side (pixels)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=_int_in(1, 100),
        default=None,
        help="re-encode every image at this quality",
    )
    p.add_argument("--dedup", action="store_true", help="skip exact duplicate image bytes")
    p.add_argument(
        "--token-stats",
        action="store_true",
        help="report CLIP BPE token counts and captions longer than 77 tokens",
    )
    p.add_argument(
        "--index-only",
        action="store_true",
        help="write only sizes.json + index_report.json for existing webdataset shards",
    )
    p.set_defaults(func=commands.cmd_shards)

    p = sub.add_parser(
        "reinforce",
        help="shards -> reinforced shards: K seeded crops per sample and teachers' embeddings of "
        "each crop and caption, for distillation without a teacher forward",
    )
    p.add_argument("shards", help="the shards (a folder, glob, {a..b} pattern or '::' list)")
    p.add_argument("output_dir", help="where the reinforced shards go (resumes a killed run)")
    p.add_argument(
        "--teacher",
        dest="teachers",
        action="append",
        required=True,
        metavar="EXPORT",
        help="a teacher export folder (any format); repeat for an ensemble (features are "
        "concatenated in this order)",
    )
    p.add_argument("--augmentations", type=_int_in(1), required=True, help="views per sample (K)")
    p.add_argument("--seed", type=int, default=0, help="seeds the views (0)")
    p.add_argument("--workers", type=_int_in(1), default=1, help="processes, whole shards each (1)")
    p.add_argument(
        "--crop-scale",
        dest="scale",
        type=float,
        nargs=2,
        default=[0.9, 1.0],
        metavar=("LO", "HI"),
        help="crop area range, as the student's train_scale (0.9 1.0)",
    )
    p.add_argument(
        "--crop-ratio",
        dest="ratio",
        type=float,
        nargs=2,
        default=[3 / 4, 4 / 3],
        metavar=("LO", "HI"),
        help="crop aspect range, as train_ratio (0.75 1.333)",
    )
    p.add_argument(
        "--alpha", choices=["white", "black", "drop"], default="white", help="as data.decode.alpha"
    )
    p.add_argument("--batch-size", type=_int_in(1), default=256, help="views per teacher forward")
    p.add_argument("--device", default=None)
    p.set_defaults(func=commands.cmd_reinforce)

    p = sub.add_parser(
        "data", help="data tools: `clipline data doctor SHARDS`, `clipline data ledger RUN`"
    )
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "doctor",
        help="check shards for anything that would break or hang a run; measure loader speed",
    )
    p.add_argument("shards", help="a shard folder, glob, {a..b} pattern or '::' list")
    p.add_argument("--workers", type=_int_in(0), default=2, help="dataloader workers per rank")
    p.add_argument("--world-size", type=_int_in(1), default=1, help="ranks of the planned run")
    p.add_argument("--batch-size", type=_int_in(1), default=64, help="samples per batch per rank")
    p.add_argument("--full", action="store_true", help="decode every sample, not one per shard")
    p.add_argument("--seconds", type=float, default=5.0, help="loader measurement time; 0 skips it")
    p.add_argument("--image-size", type=_int_in(1), default=224)
    p.add_argument(
        "--max-pixels",
        type=_int_in(1),
        default=None,
        help="data.decode.max_pixels: skip larger images, as training does (89478485)",
    )
    p.add_argument(
        "--min-image-size",
        type=_int_in(1),
        default=None,
        help="data.decode.min_image_size: skip images with a shorter side, as training (16)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=commands.cmd_data_doctor)

    p = data_sub.add_parser(
        "ledger",
        help="which samples a run trained on: per epoch, samples seen 0/1/2+ times and skipped "
        "ones by reason (needs loop.sample_ledger=true)",
    )
    p.add_argument("run", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=commands.cmd_data_ledger)

    p = sub.add_parser(
        "pretrain", help="train a dual encoder (use under accelerate launch/torchrun)"
    )
    p.add_argument("--recipe", required=True, help="a shipped recipe name or a TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. loop.steps=100")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check a start runs (shards, eval sets, resume point), print the resolved "
        "config, world size, global batch, steps and samples; exit",
    )
    p.set_defaults(func=commands.cmd_pretrain)

    p = sub.add_parser("eval", help="zero-shot / retrieval metrics of an export or checkpoint")
    p.add_argument(
        "model", nargs="?", help="an export directory, a checkpoint directory or a run directory"
    )
    _add_task_flags(p)
    p.add_argument("--output", help="write the metrics JSON here too")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="score every unscored checkpoint of a run into RUN_DIR/eval/ (results, CSV, plots); "
        "without task flags, the run's own recipe tasks",
    )
    p.add_argument(
        "--watch", action="store_true", help="with --run: keep scoring until the run is done"
    )
    p.add_argument("--poll-seconds", type=float, help="with --watch: seconds between polls (60)")
    p.add_argument("--until-step", type=int, help="with --watch: stop once this step is scored")
    p.add_argument("--timeout", type=float, help="with --watch: give up after this many seconds")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser(
        "evalset",
        help="a CSV or folder of images with labels (zeroshot) or captions (retrieval) -> an "
        "eval set in CLIP_benchmark's webdataset layout",
    )
    p.add_argument("kind", choices=["zeroshot", "retrieval"])
    p.add_argument(
        "input",
        help="zeroshot: a folder of class folders or a CSV/TSV (image, label); retrieval: a "
        "CSV/TSV (image, caption) or a folder of name.jpg + name.txt (one caption a line)",
    )
    p.add_argument("output_dir", help="the set's root, for --zeroshot/--retrieval NAME=OUTPUT_DIR")
    p.add_argument("--image-column", default="filepath", help="CSV column of image paths")
    p.add_argument("--label-column", default="label", help="CSV column of labels (zeroshot)")
    p.add_argument("--caption-column", default="caption", help="CSV column of captions")
    p.add_argument(
        "--classnames", metavar="FILE", help="class names, one a line in label order (zeroshot)"
    )
    p.add_argument(
        "--templates",
        help="zeroshot prompts: 'simple', 'openai_imagenet' or a file of one template a line "
        "(default: the input's zeroshot_classification_templates.txt)",
    )
    p.add_argument("--split", default="test", help="the split folder to write (test)")
    p.add_argument("--samples-per-shard", type=_int_in(1), default=1000)
    p.add_argument("--image-format", choices=["png", "jpg", "webp"], default="png")
    p.add_argument("--overwrite", action="store_true", help="replace the split if it exists")
    p.set_defaults(func=commands.cmd_evalset)

    p = sub.add_parser(
        "export", help="checkpoint -> clipline, open_clip, transformers (hf) or ONNX export"
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory, a run directory (its latest) or an export (clipline, "
        "open_clip or hf format, or the root --format all wrote)",
    )
    p.add_argument("output")
    p.add_argument(
        "--format",
        default="clipline",
        choices=_EXPORT_CHOICES,
        help="clipline: per-tower safetensors + clipline_export.json (default); open_clip: "
        "open_clip's local-dir/hub layout; hf: transformers CLIPModel + CLIPProcessor; onnx: "
        "image.onnx + text.onnx; all: each into OUTPUT/<format>/",
    )
    p.add_argument(
        "--name",
        default=None,
        help="open_clip model-config name of the open_clip format (default: the output "
        "folder's name)",
    )
    p.add_argument(
        "--weights",
        default="raw",
        choices=["raw", "ema"],
        help="raw: the trained weights (default); ema: the checkpoint's exponential moving "
        "average (trained with loop.ema_decay > 0)",
    )
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser(
        "wise-ft",
        help="WiSE-FT: interpolate a zero-shot and a fine-tuned model's weights, score every "
        "alpha, export the best (or --pick)",
    )
    p.add_argument(
        "zero_shot",
        metavar="ZERO_SHOT",
        help="the model the fine-tuning started from (an export, checkpoint or run directory)",
    )
    p.add_argument("finetuned", metavar="FINETUNED", help="the fine-tuned model (the same kinds)")
    p.add_argument(
        "output", metavar="OUT", help="wise_ft.json, wise_ft.png and export/ (the chosen alpha)"
    )
    p.add_argument(
        "--alphas",
        default=None,
        help="weights of FINETUNED, comma-separated (default 0,0.1,...,1)",
    )
    _add_task_flags(p)
    p.add_argument(
        "--pick",
        type=float,
        default=None,
        help="export this alpha (one of --alphas); default: the best mean of the tasks' main "
        "metrics (zero-shot acc1, retrieval mean of image/text recall@1, probe lp_acc1)",
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--format",
        default="clipline",
        choices=_EXPORT_CHOICES,
        help="the export's format, as clipline export --format (clipline)",
    )
    p.add_argument("--name", default=None, help="the open_clip format's model-config name")
    p.set_defaults(func=commands.cmd_wise_ft)

    p = sub.add_parser(
        "embed", help="a folder of images or a file of texts -> embeddings + a faiss index"
    )
    p.add_argument(
        "model",
        metavar="EXPORT_DIR",
        help="the export that embeds (any format, or a checkpoint or run directory)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="FOLDER", help="embed every image file under FOLDER")
    source.add_argument("--texts", metavar="FILE", help="embed each non-blank line of FILE")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="the index directory")
    p.add_argument("--batch-size", type=_int_in(1), default=64)
    p.add_argument(
        "--workers", type=_int_in(0), default=2, help="image-decoding processes (0: none)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an index already in OUT_DIR")
    p.set_defaults(func=commands.cmd_embed)

    p = sub.add_parser(
        "search", help="top-k items of an index for text or image queries (one model load)"
    )
    p.add_argument("model", metavar="EXPORT_DIR", help="the export the index was built with")
    p.add_argument("index", metavar="INDEX_DIR", help="written by clipline embed")
    p.add_argument(
        "query", nargs="*", help="text queries, e.g. 'a black cat on a keyboard' 'a red car'"
    )
    p.add_argument(
        "--queries-file", metavar="FILE", help="more text queries, one a line (blank lines skipped)"
    )
    p.add_argument(
        "--image", metavar="PATH", action="append", default=[], help="an image query (repeatable)"
    )
    p.add_argument("-k", type=_int_in(1), default=5, help="number of hits (5)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.add_argument("--device", default=None)
    p.set_defaults(func=commands.cmd_search)

    p = sub.add_parser("demo", help="emoji pairs -> shards -> train -> eval -> export, on CPU")
    p.add_argument("--output", default="demo_out")
    p.add_argument("overrides", nargs="*", help="overrides of the demo recipe, e.g. loop.steps=50")
    p.set_defaults(func=commands.cmd_demo)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed anywhere after the command.

    argparse gives a ``nargs="*"`` positional only the words before the first option, so
    ``--recipe r run_dir=x --resume latest loop.steps=10`` would leave ``loop.steps=10``
    unrecognised; overrides found among the leftovers join the others, in command-line order.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        stray = [e for e in extras if e.startswith("-") or "=" not in e]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extras)}")
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipline`` console script and ``python -m clipline``."""
    args = parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except ValueError as exc:  # bad user input: one clear line, no traceback
        print(f"clipline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # pretrain.signals' Preempted (SIGTERM/SIGUSR1: 143, which Slurm requeues; Ctrl-C: 130;
        # a checkpoint was saved) and NonFiniteLossError (1), known by their exit code rather
        # than imported: importing the loop here would load the training stack for every
        # command. Their messages say what happened and what to do, in one line.
        exit_code = getattr(exc, "exit_code", None)
        if exit_code is None:
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops; one says so
            print(f"clipline {args.command}: {exc}", file=sys.stderr)
        return exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C outside training, or a second one during it
        why = f" ({exc})" if str(exc) else ""
        print(f"clipline {args.command}: interrupted{why}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
