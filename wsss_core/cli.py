"""Command line: `wsss run`, `wsss stage`, `wsss validate`.

`wsss stage NAME` runs one stage function directly (no notebook); it is what
`torchrun --nproc_per_node N -m wsss_core.cli stage ...` launches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from .config import ConfigError, load_config, parse_override_value


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. cams.scales=[1.0,0.5]")
        out[key.strip()] = parse_override_value(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, run_dir: bool = True) -> None:
        sp.add_argument("--config", required=True, help="experiment YAML (params/*.yaml)")
        if run_dir:
            sp.add_argument("--run-dir", required=True, help="run directory (runs/<name>)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")

    r = sub.add_parser("run", help="execute the stage notebooks in order (papermill)")
    common(r)
    r.add_argument("--from", dest="from_stage", default=None)
    r.add_argument("--to", dest="to_stage", default=None)

    s = sub.add_parser("stage", help="run one stage function (what torchrun launches)")
    s.add_argument("name")
    common(s)
    s.add_argument("--force", action="store_true", help="rerun even if done")

    v = sub.add_parser("validate", help="load the params and validate the dataset, then stop")
    common(v, run_dir=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .data import DataError
    from .store import StaleUpstreamError

    try:
        overrides = _overrides(args.set)
        if args.command == "run":
            import logging

            from .pipeline import run_pipeline

            # papermill logs each cell's output at INFO: show it, so batch runs show progress
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log = logging.getLogger("papermill")
            log.addHandler(handler)
            log.setLevel(logging.INFO)

            root = run_pipeline(args.config, args.run_dir, args.from_stage, args.to_stage, overrides)
            print(f"[wsss] finished. Outputs: {root}")
            print(f"[wsss] executed notebooks: {root / 'notebooks'}")
        elif args.command == "stage":
            from .stages import open_run, run_stage

            cfg = load_config(args.config, overrides)
            run = open_run(args.run_dir, cfg)
            result = run_stage(args.name, cfg, run, force=args.force)
            if run.is_main:
                print(f"[wsss] {args.name}: {result.metrics}")
        elif args.command == "validate":
            from .data import open_dataset

            cfg = load_config(args.config, overrides)
            ds = open_dataset(cfg.data, validate=False)
            print(ds.validate())
    except (ConfigError, DataError, StaleUpstreamError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"wsss: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
