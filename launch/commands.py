"""What each ``clipline`` subcommand does: its flags become component configs, handed to the
library. The parser that routes to these is :func:`clipline.launch.cli.build_parser`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def cmd_shards(args: argparse.Namespace) -> int:
    from clipline.data.shard_index import index_shards
    from clipline.data.shards import ShardsConfig, write_shards
    from clipline.pretrain.model import count_clip_tokens

    count_tokens = count_clip_tokens if args.token_stats else None
    if args.index_only:
        report = index_shards(
            args.input, args.output_dir, workers=args.workers, count_tokens=count_tokens
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
        ),
        count_tokens=count_tokens,
    )
    print(report.to_json())
    return 0


def cmd_reinforce(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from clipline.launch.reinforce import ReinforceConfig, reinforce

    args.device = args.device or _default_device()  # the flags are named as the fields
    report = reinforce(
        ReinforceConfig(**{f.name: getattr(args, f.name) for f in fields(ReinforceConfig)})
    )
    print(json.dumps(report, indent=2))
    return 0


def cmd_data_doctor(args: argparse.Namespace) -> int:
    import open_clip  # the default towers' tokenizer for the loader measurement: a real cost

    from clipline.data.decode import DecodeConfig
    from clipline.data.doctor import DoctorConfig, diagnose

    given = {n: getattr(args, n) for n in ("max_pixels", "min_image_size")}
    decode = DecodeConfig(**{n: v for n, v in given.items() if v is not None})
    report = diagnose(
        DoctorConfig(
            shards=args.shards,
            workers=args.workers,
            world_size=args.world_size,
            batch_size=args.batch_size,
            full=args.full,
            seconds=args.seconds,
            image_size=args.image_size,
            decode=decode,
        ),
        tokenize=open_clip.get_tokenizer("ViT-B-32"),
    )
    print(report.to_json() if args.json else report.to_text(args.shards))
    return 0 if report.ok else 1


def cmd_data_ledger(args: argparse.Namespace) -> int:
    from clipline.data.ledger import read_ledger

    report = read_ledger(args.run)
    print(report.to_json() if args.json else report.to_text())
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from clipline.launch.config import load_run_config
    from clipline.launch.run import finished_run, plan, run_pretrain
    from clipline.pretrain.console import summary

    cfg = load_run_config(args.recipe, args.overrides)
    if args.dry_run:
        shape = plan(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), resume=args.resume)
        print(json.dumps({"config": cfg.to_dict(), "plan": shape}, indent=2))
        return 0

    finished = finished_run(cfg, args.resume, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if finished is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"clipline pretrain: {finished}")
        return 0
    run_pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(cfg.run_dir))  # the metrics in full: run_dir/final_metrics.json
    return 0


# Options after NAME=ROOT are split at commas that start another key=: values may hold
# commas of their own (ks=[1,5,10], a list of templates).
_OPTION_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*=)")


def _parse_tasks(items: list[str], kind: str) -> list:
    """``NAME=ROOT[,key=value...]`` flags -> task configs; keys are the task's fields."""
    from clipline.eval.evaluators import EVALUATORS
    from clipline.launch.config import _parse_value, build

    cls = EVALUATORS.get(kind).task
    flag = f"--{kind.replace('_', '-')}"
    tasks = []
    for item in items:
        head, *options = _OPTION_SPLIT.split(item)
        name, sep, root = head.partition("=")
        if not sep or not name or not root:
            raise ValueError(
                f"{flag} {item!r}: expected NAME=ROOT[,key=value...], e.g. {flag} "
                f"pets=/data/pets or {flag} pets=/data/pets,format=folder,split=val"
            )
        data: dict = {"name": name, "root": root}
        for option in options:
            key, _, text = option.partition("=")
            data[key.strip()] = _parse_value(text)
        if {"name", "root"} & {o.partition("=")[0].strip() for o in options}:
            raise ValueError(f"{flag} {item!r}: give the name and root once, as NAME=ROOT")
        try:
            tasks.append(build(cls, data))
        except ValueError as exc:
            raise ValueError(f"{flag} {item!r}: {exc}") from None
    return tasks


def _cli_tasks(args: argparse.Namespace) -> list:
    from clipline.eval.evaluators import list_evaluators

    return [task for kind in list_evaluators() for task in _parse_tasks(getattr(args, kind), kind)]


def _run_tasks(run_dir: str) -> list:
    """The evaluations of the run's own recipe (its ``config.json``)."""
    from clipline.eval.evaluators import EVALUATORS
    from clipline.launch.config import build

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    return [
        build(EVALUATORS.get(kind).task, entry, prefix=f"{path} {kind}[{i}].")
        for kind in EVALUATORS
        for i, entry in enumerate(saved.get(kind) or [])
    ]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    if args.run is not None:
        return _cmd_score_run(args)
    if args.model is None:
        raise ValueError("give a MODEL (export, checkpoint or run directory) or --run RUN_DIR")
    if args.watch:
        raise ValueError("--watch applies to --run RUN_DIR; pass the run directory with --run")
    from clipline.eval.evaluators import build_evaluator
    from clipline.launch.run import load_encoders

    tasks = _cli_tasks(args)
    if not tasks:
        raise ValueError(
            "nothing to evaluate: give --zeroshot NAME=ROOT, --retrieval NAME=ROOT and/or "
            "--linear-probe NAME=ROOT"
        )
    device = args.device or _default_device()
    model = load_encoders(args.model, device)
    preprocess = model.preprocess_config()
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

    from clipline.eval.score import ScoreConfig
    from clipline.launch.score import score_run

    if args.model is not None:
        raise ValueError(f"give either MODEL ({args.model}) or --run RUN_DIR, not both")
    if args.output is not None:
        raise ValueError("--output does not apply to --run; results go to RUN_DIR/eval/")
    given = [f for f in ("poll_seconds", "until_step", "timeout") if getattr(args, f) is not None]
    if given and not args.watch:
        raise ValueError(f"--{given[0].replace('_', '-')} only applies with --watch; add --watch")
    tasks = _cli_tasks(args)
    if not tasks:  # the run's own evaluations
        tasks = _run_tasks(args.run)
        log.info("scoring the run's own tasks: %s", ", ".join(t.name for t in tasks) or "none")
    report = score_run(
        ScoreConfig(
            run_dir=args.run,
            tasks=tasks,
            device=args.device or _default_device(),
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


def cmd_evalset(args: argparse.Namespace) -> int:
    from clipline.eval.evalset import EvalsetConfig, make_evalset

    summary = make_evalset(
        EvalsetConfig(
            kind=args.kind,
            input=args.input,
            output_dir=args.output_dir,
            image_column=args.image_column,
            label_column=args.label_column,
            caption_column=args.caption_column,
            classnames=args.classnames,
            templates=args.templates,
            split=args.split,
            samples_per_shard=args.samples_per_shard,
            image_format=args.image_format,
            overwrite=args.overwrite,
        )
    )
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clipline.launch.run import load_encoders
    from clipline.pretrain.checkpoint import read_config, read_step, resolve_checkpoint
    from clipline.pretrain.ema import load_ema_weights
    from clipline.pretrain.export import export, find_export, load_exported
    from clipline.pretrain.export_clipline import read_export_meta

    found = find_export(args.checkpoint)
    if found is not None and args.weights == "ema":
        raise ValueError(
            f"--weights ema: {found[1]} is a {found[0]} export, which holds one set of weights; "
            "export the EMA from the checkpoint or run directory it came from"
        )
    if found is not None and found[0] == "onnx":
        raise ValueError(
            f"{found[1]} is an ONNX export, which cannot be converted to other formats; export "
            "from the clipline, open_clip or hf export, a checkpoint or the run directory"
        )
    if found is not None and found[0] == "clipline":  # re-export a clipline export
        source = found[1]
        meta = read_export_meta(source)
        model = load_exported(*found)
        run_config, step = meta["run_config"], meta["step"]
    elif found is not None:  # open_clip and hf exports carry no run config or step
        source = found[1]
        model = load_exported(*found)
        run_config, step = {"converted_from": {"format": found[0], "path": str(source)}}, None
    else:
        source = resolve_checkpoint(args.checkpoint)
        model = load_encoders(source)
        if args.weights == "ema":
            load_ema_weights(model, source)
        run_config = read_config(source)
        step = read_step(source)
    written = export(
        model, args.output, format=args.format, run_config=run_config, step=step, name=args.name
    )
    for fmt, out in written.items():
        print(f"exported {source} -> {out} ({fmt})")
    return 0


def cmd_wise_ft(args: argparse.Namespace) -> int:
    from clipline.launch.wise_ft import DEFAULT_ALPHAS, WiseFTConfig, parse_alphas, run_wise_ft

    report = run_wise_ft(
        WiseFTConfig(
            zero_shot=args.zero_shot,
            finetuned=args.finetuned,
            out=args.output,
            tasks=_cli_tasks(args),
            alphas=DEFAULT_ALPHAS if args.alphas is None else parse_alphas(args.alphas),
            pick=args.pick,
            device=args.device or _default_device(),
            format=args.format,
            name=args.name,
        )
    )
    print(report.table())
    picked = report.picked
    for fmt, out in report.written.items():
        print(f"alpha {picked['alpha']:g} ({picked['by']}) -> {out} ({fmt})")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_embed(args: argparse.Namespace) -> int:
    from clipline.eval.embed import EmbedConfig, embed
    from clipline.launch.embed import model_source

    report = embed(
        EmbedConfig(
            output_dir=args.output,
            images=args.images,
            texts=args.texts,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device or _default_device(),
            overwrite=args.overwrite,
        ),
        model_source(args.model),
    )
    print(
        f"embedded {report.count} {report.kind}s ({report.dim}-d) into {report.output_dir}; "
        f"skipped {len(report.skipped)}"
    )
    for item in report.skipped:
        print(f"  skipped {item['id']}: {item['error']}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from clipline.eval.embed import format_hits, search_many
    from clipline.launch.embed import model_source

    texts = list(args.query)
    if args.queries_file is not None:
        path = Path(args.queries_file)
        if not path.is_file():
            raise ValueError(f"--queries-file {path}: not a file (one text query a line)")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = search_many(
        model_source(args.model),
        args.index,
        texts=texts,
        images=args.image,
        k=args.k,
        device=args.device or _default_device(),
    )
    if len(answers) == 1 and args.queries_file is None:  # one query: just its hits
        hits = answers[0]["hits"]
        print(json.dumps(hits, indent=2, ensure_ascii=False) if args.json else format_hits(hits))
    elif args.json:
        print(json.dumps(answers, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(f"{a['kind']}: {a['query']}\n{format_hits(a['hits'])}" for a in answers))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clipline.launch.demo import run_demo

    run_demo(Path(args.output), overrides=args.overrides)
    return 0
