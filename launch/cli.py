"""``clipline`` command line: shards, data doctor, pretrain, eval, export, embed, search, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("clipline")


def _setup_logging() -> None:
    # Rank 0 speaks; other ranks only warn (RANK is set by torchrun and accelerate launch).
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    noisy_loggers = ("root", "PIL", "matplotlib", "urllib3", "torch.onnx", "onnx_ir", "onnxscript")
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_shards(args: argparse.Namespace) -> int:
    from clipline.data.shards import ShardsConfig, index_shards, write_shards

    if args.index_only:
        report = index_shards(
            args.input, args.output_dir, workers=args.workers, token_stats=args.token_stats
        )
        print(report.to_json())
        return 0
    if args.output_dir is None:
        raise ValueError(
            "missing output_dir: `clipline shards INPUT OUTPUT_DIR` (or --index-only to index "
            "existing shards in place)"
        )
    report = write_shards(
        ShardsConfig(
            input=args.input,
            output_dir=args.output_dir,
            image_column=args.image_column,
            caption_column=args.caption_column,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            max_side=args.max_side,
            jpeg_quality=args.jpeg_quality,
            dedup=args.dedup,
            token_stats=args.token_stats,
        )
    )
    print(report.to_json())
    return 0


def _cmd_data_doctor(args: argparse.Namespace) -> int:
    from clipline.data.doctor import DoctorConfig, diagnose

    report = diagnose(
        DoctorConfig(
            shards=args.shards,
            workers=args.workers,
            world_size=args.world_size,
            batch_size=args.batch_size,
            full=args.full,
            seconds=args.seconds,
            image_size=args.image_size,
        )
    )
    print(report.to_json() if args.json else report.to_text(args.shards))
    return 0 if report.ok else 1


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from clipline.launch.config import load_run_config
    from clipline.launch.run import plan, run_pretrain

    cfg = load_run_config(args.recipe, args.overrides)
    if args.dry_run:
        shape = plan(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        print(json.dumps({"config": cfg.to_dict(), "plan": shape}, indent=2))
        return 0

    metrics = run_pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return 0


def _parse_tasks(items: list[str], kind: str) -> list:
    from clipline.eval.evaluators import RetrievalTask, ZeroShotTask

    cls = ZeroShotTask if kind == "zeroshot" else RetrievalTask
    tasks = []
    for item in items:
        name, sep, root = item.partition("=")
        if not sep:
            raise ValueError(
                f"--{kind} {item!r}: expected NAME=ROOT, e.g. --{kind} emoji=/data/emoji_eval"
            )
        tasks.append(cls(name=name, root=root))
    return tasks


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    if args.run is not None:
        return _cmd_score_run(args)
    if args.model is None:
        raise ValueError("give a MODEL (export, checkpoint or run directory) or --run RUN_DIR")
    if args.watch:
        raise ValueError("--watch applies to --run RUN_DIR; pass the run directory with --run")
    from clipline.eval.evaluators import build_evaluator
    from clipline.launch.run import load_encoders

    tasks = _parse_tasks(args.zeroshot, "zeroshot") + _parse_tasks(args.retrieval, "retrieval")
    if not tasks:
        raise ValueError(
            "nothing to evaluate: give --zeroshot NAME=ROOT and/or --retrieval NAME=ROOT"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_encoders(args.model, device)
    preprocess = model.image_transform(is_train=False)
    results: dict[str, float] = {}
    with torch.inference_mode():
        for task in tasks:
            evaluate = build_evaluator(task, preprocess=preprocess, tokenize=model.tokenize)
            results.update({f"{task.name}/{k}": v for k, v in evaluate(model).items()})
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


def _cmd_score_run(args: argparse.Namespace) -> int:
    import torch

    from clipline.launch.score import ScoreConfig, score_run

    if args.model is not None:
        raise ValueError(f"give either MODEL ({args.model}) or --run RUN_DIR, not both")
    if args.output is not None:
        raise ValueError("--output does not apply to --run; results go to RUN_DIR/eval/")
    given = [f for f in ("poll_seconds", "until_step", "timeout") if getattr(args, f) is not None]
    if given and not args.watch:
        raise ValueError(f"--{given[0].replace('_', '-')} only applies with --watch; add --watch")
    report = score_run(
        ScoreConfig(
            run_dir=args.run,
            tasks=_parse_tasks(args.zeroshot, "zeroshot")
            + _parse_tasks(args.retrieval, "retrieval"),
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            watch=args.watch,
            poll_s=60.0 if args.poll_seconds is None else args.poll_seconds,
            until_step=args.until_step,
            timeout_s=args.timeout,
        )
    )
    print(
        json.dumps({"results_dir": str(Path(args.run) / "eval"), "new": report.results}, indent=2)
    )
    if not report.finished:
        print(
            f"clipline eval: --timeout {args.timeout}s passed before the run finished",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from clipline.launch.run import load_encoders, resolve_checkpoint
    from clipline.pretrain.checkpoint import read_config
    from clipline.pretrain.export import META_FILE, export, read_export_meta

    if (Path(args.checkpoint) / META_FILE).is_file():  # re-export a clipline export
        source = Path(args.checkpoint)
        meta = read_export_meta(source)
        model = load_encoders(source)
        run_config, step = meta["run_config"], meta["step"]
    else:
        source = resolve_checkpoint(args.checkpoint)
        model = load_encoders(source)
        run_config = read_config(source)
        step = json.loads((source / "state.json").read_text())["step"]
    written = export(
        model, args.output, format=args.format, run_config=run_config, step=step, name=args.name
    )
    for fmt, out in written.items():
        print(f"exported {source} -> {out} ({fmt})")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cmd_embed(args: argparse.Namespace) -> int:
    from clipline.launch.embed import EmbedConfig, embed

    report = embed(
        EmbedConfig(
            model=args.model,
            output_dir=args.output,
            images=args.images,
            texts=args.texts,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device or _default_device(),
        )
    )
    print(
        f"embedded {report.count} {report.kind}s ({report.dim}-d) into {report.output_dir}; "
        f"skipped {len(report.skipped)}"
    )
    for item in report.skipped:
        print(f"  skipped {item['id']}: {item['error']}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from clipline.launch.embed import format_hits, search

    hits = search(
        args.model,
        args.index,
        text=args.query,
        image=args.image,
        k=args.k,
        device=args.device or _default_device(),
    )
    print(json.dumps(hits, indent=2, ensure_ascii=False) if args.json else format_hits(hits))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from clipline.launch.demo import run_demo

    run_demo(Path(args.output), overrides=args.overrides)
    return 0


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
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument(
        "--workers", type=int, default=1, help="image encoding processes (same output for any N)"
    )
    p.add_argument(
        "--max-side", type=int, default=None, help="shrink images to this longer side (pixels)"
    )
    p.add_argument(
        "--jpeg-quality", type=int, default=None, help="re-encode every image at this quality"
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
    p.set_defaults(func=_cmd_shards)

    p = sub.add_parser("data", help="data tools: `clipline data doctor SHARDS`")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "doctor",
        help="check shards for anything that would break or hang a run; measure loader speed",
    )
    p.add_argument("shards", help="a shard folder, glob, {a..b} pattern or '::' list")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers per rank")
    p.add_argument("--world-size", type=int, default=1, help="ranks of the planned run")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch per rank")
    p.add_argument("--full", action="store_true", help="decode every sample, not one per shard")
    p.add_argument("--seconds", type=float, default=5.0, help="loader measurement time; 0 skips it")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_data_doctor)

    p = sub.add_parser(
        "pretrain", help="train a dual encoder (use under accelerate launch/torchrun)"
    )
    p.add_argument("--recipe", required=True, help="a shipped recipe name or a TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. loop.steps=100")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, world size, global batch, steps and samples; exit",
    )
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("eval", help="zero-shot / retrieval metrics of an export or checkpoint")
    p.add_argument(
        "model", nargs="?", help="an export directory, a checkpoint directory or a run directory"
    )
    p.add_argument("--zeroshot", action="append", default=[], metavar="NAME=ROOT")
    p.add_argument("--retrieval", action="append", default=[], metavar="NAME=ROOT")
    p.add_argument("--output", help="write the metrics JSON here too")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="score every unscored checkpoint of a run into RUN_DIR/eval/ (results, CSV, plots)",
    )
    p.add_argument(
        "--watch", action="store_true", help="with --run: keep scoring until the run is done"
    )
    p.add_argument("--poll-seconds", type=float, help="with --watch: seconds between polls (60)")
    p.add_argument("--until-step", type=int, help="with --watch: stop once this step is scored")
    p.add_argument("--timeout", type=float, help="with --watch: give up after this many seconds")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "export", help="checkpoint -> clipline, open_clip, transformers (hf) or ONNX export"
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory, a run directory (its latest) or a clipline export",
    )
    p.add_argument("output")
    p.add_argument(
        "--format",
        default="clipline",
        choices=["clipline", "open_clip", "hf", "onnx", "all"],
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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "embed", help="a folder of images or a file of texts -> embeddings + a faiss index"
    )
    p.add_argument("model", metavar="EXPORT_DIR", help="the export that embeds")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="FOLDER", help="embed every image file under FOLDER")
    source.add_argument("--texts", metavar="FILE", help="embed each non-blank line of FILE")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="the index directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0: none)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("search", help="top-k items of an index for a text or image query")
    p.add_argument("model", metavar="EXPORT_DIR", help="the export the index was built with")
    p.add_argument("index", metavar="INDEX_DIR", help="written by clipline embed")
    p.add_argument("query", nargs="?", help="a text query, e.g. 'a black cat on a keyboard'")
    p.add_argument("--image", metavar="PATH", help="an image query instead of a text")
    p.add_argument("-k", type=int, default=5, help="number of hits (5)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("demo", help="emoji pairs -> shards -> train -> eval -> export, on CPU")
    p.add_argument("--output", default="demo_out")
    p.add_argument("overrides", nargs="*", help="overrides of the demo recipe, e.g. loop.steps=50")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipline`` console script and ``python -m clipline``."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    from clipline.pretrain.loop import Preempted

    try:
        return args.func(args)
    except ValueError as exc:  # bad user input: one clear line, no traceback
        print(f"clipline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:  # SIGTERM/SIGUSR1 (143: Slurm requeues) or Ctrl-C (130): saved
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops; one says so
            print(f"clipline {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C outside training, or a second one during it
        why = f" ({exc})" if str(exc) else ""
        print(f"clipline {args.command}: interrupted{why}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
