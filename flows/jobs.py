"""Run one stage as a Ray job, without Prefect: ``python -m flows.jobs STAGE --root ROOT ...``.

The same config as the flows (a YAML file whose section for STAGE maps to the stage's config
dataclass; ``--set key=value`` overrides), calling the stage's pipeline function directly::

    # on one machine (starts a local Ray)
    python -m flows.jobs shard --root /data/corpus --source ../shared/data/coco128-seg
    # on any Ray cluster (the job's driver runs on the head; the package travels as working dir)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m flows.jobs train_ldm --root s3://bucket/corpus --config configs/pipeline.yaml

Under ``ray job submit`` Ray sets ``RAY_ADDRESS`` for the driver, so the job joins that cluster.
Prints the stage's result as JSON on the last line; exits 1 with the error on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from flows import stages
from flows.common import apply_aws_credentials, jsonable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.jobs", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=sorted(stages.STAGES), help="stage to run")
    p.add_argument("--root", required=True, help="corpus root: local path or fsspec URL")
    p.add_argument("--config", default=None, help="YAML config (the STAGE section is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable)")
    p.add_argument("--source", dest="sources", action="append", default=[],
                   help="raw image source for the shard stage (repeatable)")
    p.add_argument("--arg", dest="args", action="append", default=[], metavar="NAME=VALUE",
                   help="other keyword argument of the stage function, e.g. model=v0001")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if not stages.available(args.stage):
        print(f"stage {args.stage!r} ({stages.spec(args.stage).module}) is not part of this "
              f"checkout; available: {stages.available_stages()}", file=sys.stderr)
        return 2
    from pipeline.config import parse_overrides
    from pipeline.distribute import ensure_ray

    extra = parse_overrides(args.args)
    if args.sources:
        extra["sources"] = args.sources
    apply_aws_credentials()
    ensure_ray()
    try:
        result = stages.run_stage(args.stage, args.root, args.config, args.overrides, **extra)
    except Exception as exc:  # noqa: BLE001 - reported to the job's caller
        logging.getLogger(__name__).exception("stage %s failed", args.stage)
        print(f"stage {args.stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"stage": args.stage, "root": args.root, "result": jsonable(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
