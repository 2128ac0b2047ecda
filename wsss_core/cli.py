"""Command line: `wsss run`, `wsss stage`, `wsss validate`, `wsss predict`,
`wsss sweep` (a grid of variants sharing unchanged stages), `wsss compare`,
`wsss stages` (the list of stages, from the registry), `wsss archive` (a run's
records and scores without its images and models, for keeping and comparing).

`wsss run` runs the stage functions in order in its own process, then each
stage's notebook draws its pictures; `wsss stage NAME` runs one stage function
(no notebook). Under torchrun both run in every process.

Errors are one line on stderr and exit code 2 (`file: key: what is wrong`, or
`stage X failed: Error: first line`); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Sequence

from .config import ConfigError, load_config, parse_override_value


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. cams.scales=[1.0,0.5]")
        out[key.strip()] = parse_override_value(value, key.strip())
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, run_dir: bool = True) -> None:
        sp.add_argument("--config", required=True, help="experiment YAML (params/*.yaml)")
        if run_dir:
            sp.add_argument("--run-dir", required=True, help="run directory (runs/<name>)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
        sp.add_argument("--debug", action="store_true", help="show tracebacks")

    r = sub.add_parser("run", help="run the stages in order, then their notebooks draw (papermill)")
    common(r)
    r.add_argument("--from", dest="from_stage", default=None, metavar="STAGE")
    r.add_argument("--to", dest="to_stage", default=None, metavar="STAGE")
    r.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo this stage from scratch")
    r.add_argument("--no-draw", dest="draw", action="store_false",
                   help="execute no notebook (numbers only); a later run without it draws them")

    s = sub.add_parser("stage", help="run one stage function (what torchrun launches)")
    s.add_argument("name")
    common(s)
    s.add_argument("--force", action="store_true", help="redo it from scratch even if done")

    v = sub.add_parser("validate", help="check the params and the dataset (every file), then stop")
    common(v, run_dir=False)

    sl = sub.add_parser("stages", help="list the stages (from the registry) as a Markdown table")
    sl.add_argument("--debug", action="store_true", help="show tracebacks")

    sw = sub.add_parser("sweep", help="run a grid of variants that share every stage the grid does not change")
    common(sw)
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a parameter and its values (YAML, split on commas outside brackets); repeatable")
    sw.add_argument("--seeds", default=None, metavar="STAGE=N",
                    help="N seed replicates of every variant, reseeding the named stage(s) (segmentation=3, "
                         "boundary,segmentation=3) or every stage (all=3); compare pools them into one row")
    sw.add_argument("--to", dest="to_stage", default=None, metavar="STAGE", help="stop after this stage")
    sw.add_argument("--jobs", type=int, default=1, help="variants run at once (each on its own GPU if several)")
    sw.add_argument("--reuse", action="append", default=[], metavar="RUN",
                    help="take finished stages with the same parameters from this run")
    sw.add_argument("--no-draw", dest="draw", action="store_false",
                    help="the variants execute no notebook (numbers only: compare needs none)")

    cp = sub.add_parser("compare", help="what differs between runs, mIoU with bootstrap intervals, time")
    cp.add_argument("runs", nargs="+", help="a sweep folder, or run folders (one run: its intervals alone)")
    cp.add_argument("--baseline", default=None, help="the run the others are compared with (default: the first)")
    cp.add_argument("--out", default=None, help="where comparison.html goes (default: in the sweep folder)")
    cp.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the images")
    cp.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    cp.add_argument("--debug", action="store_true", help="show tracebacks")

    ar = sub.add_parser("archive", help="copy a run's config, records and scores (no images or models) into a "
                        "new folder that wsss compare reads like the run")
    ar.add_argument("run", help="a run folder")
    ar.add_argument("--out", required=True, help="the new folder")
    ar.add_argument("--debug", action="store_true", help="show tracebacks")

    pr = sub.add_parser("predict", help="segment a folder of new images with a finished run")
    pr.add_argument("--run", required=True, help="a run folder whose segmentation stage (or, for --model bound, "
                    "bound) is done")
    pr.add_argument("--images", required=True, help="folder of images (jpg, png, ...)")
    pr.add_argument("--out", required=True, help="output folder: one class-id PNG per image")
    pr.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                    help="test-time augmentation as the run's predict section (default on)")
    pr.add_argument("--model", choices=("weak", "bound"), default="weak",
                    help="weak: the segmenter trained on the pseudo masks; bound: the run's fully supervised "
                         "bound (segmentation.bound: true)")
    pr.add_argument("--skip-bad", action="store_true", help="segment the readable images, list the others")
    pr.add_argument("--overwrite", action="store_true", help="replace existing output files")
    pr.add_argument("--layout", choices=("voc", "lid"), default=None,
                    help="voc: palette PNGs; lid: grayscale PNGs (LID submission); default: the run's")
    pr.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _run(args: argparse.Namespace) -> None:
    from .stages.registry import check_discovered

    check_discovered()
    for flag in ("config", "run_dir", "run", "images", "out"):
        if getattr(args, flag, None) == "":  # an unset $VARIABLE: never "the current folder"
            raise ConfigError(f"--{flag.replace('_', '-')}: empty path")
    overrides = _overrides(getattr(args, "set", []))
    if args.command == "run":
        from .pipeline import run_pipeline

        root = run_pipeline(args.config, args.run_dir, args.from_stage, args.to_stage, overrides,
                            force=args.force, draw=args.draw)
        from . import runtime
        from .stages import open_run, summary_lines

        if not runtime.is_main():  # under torchrun: rank 0 speaks
            return

        print(f"[wsss] finished. Outputs: {root}")
        print(f"[wsss] executed notebooks: {root / 'notebooks'}" if args.draw else
              "[wsss] no notebook drawn (--no-draw): `wsss run` without it draws them")
        for line in summary_lines(open_run(root, load_config(args.config, overrides))):
            print(line)
    elif args.command == "stage":
        from . import runtime
        from .stages import open_run, run_stage, stage

        stage(args.name)  # an unknown stage fails before anything is read or written
        cfg = load_config(args.config, overrides)
        run = open_run(args.run_dir, cfg)
        finished = False
        try:
            result = run_stage(args.name, cfg, run, force=args.force)
            finished = True
        finally:
            runtime.leave_distributed(wait=finished)  # under torchrun: leave the group before exiting
        if run.is_main:
            print(f"[wsss] {args.name}: {result.metrics}")
    elif args.command == "stages":
        from .stages.registry import stage_table

        print(stage_table())
    elif args.command == "sweep":
        from .sweep import run_sweep

        run_sweep(args.config, args.run_dir, args.grid, overrides, args.to_stage, args.jobs, args.reuse,
                  seeds=args.seeds, draw=args.draw)
    elif args.command == "compare":
        from pathlib import Path

        from .compare import check_comparison_out, compare_runs, comparison_html, comparison_table
        from .store import write_text

        sweep = len(args.runs) == 1 and (Path(args.runs[0]) / "sweep.json").is_file()
        out = Path(args.out) if args.out else (Path(args.runs[0]) if sweep else Path.cwd()) / "comparison.html"
        check_comparison_out(out, args.runs)
        c = compare_runs(args.runs, args.baseline, args.resamples, args.seed)
        print(comparison_table(c))
        write_text(out, comparison_html(c))
        print(f"[wsss] comparison: {out}")
    elif args.command == "archive":
        from .archive import archive_run

        out = archive_run(args.run, args.out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"[wsss] archived {args.run} into {out} ({size / 1024:.0f} KB); wsss compare reads it like the run")
    elif args.command == "predict":
        from .predict_folder import predict_folder

        written = predict_folder(args.run, args.images, args.out, tta=args.tta, skip_bad=args.skip_bad,
                                 overwrite=args.overwrite, layout=args.layout, model=args.model)
        print(f"[wsss] {len(written)} masks written to {args.out}")
    elif args.command == "validate":
        from .data import open_dataset, validate_dataset
        from .stages import STAGES, check_stage

        cfg = load_config(args.config, overrides)
        ds = open_dataset(cfg.data, validate=False)
        for name in STAGES:
            check_stage(name, cfg, ds)
        print(validate_dataset(ds))
        print(f"[wsss] {args.config}: parameters valid for every stage ({', '.join(STAGES)})")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    from .pipeline import raise_terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        return _main(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    from .data import DataError
    from .pipeline import StageFailed, Terminated, one_line
    from .store import FileError, RunLockedError, StaleUpstreamError, describe_os_error

    try:
        _run(args)
    except (ConfigError, DataError, FileError, StaleUpstreamError, RunLockedError, StageFailed) as e:
        if args.debug:
            raise
        print(f"wsss: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system failure no check foresaw: still one line naming the path
        if args.debug:
            raise
        print(f"wsss: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        resume = {"predict": "the masks written so far are complete; rerun with --overwrite to redo them all",
                  "run": "finished stages and the finished files of the interrupted stage are kept; run the same "
                         "command again to resume",
                  "stage": "the finished files of the interrupted stage are kept; run the same command again to "
                           "resume",
                  "sweep": "finished stages of every variant are kept; run the same command again to resume",
                  }.get(args.command, "nothing was written")
        print(f"wsss: {'terminated' if isinstance(e, Terminated) else 'interrupted'}. {resume[0].upper()}"
              f"{resume[1:]}.", file=sys.stderr, flush=True)
        _silence_stderr()  # the kernel client's half-closed tasks complain at exit: not for the user
        return 143 if isinstance(e, Terminated) else 130
    return 0


def _silence_stderr() -> None:
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
