"""``python -m pipeline.server --root ROOT [--host H --port P --cache-dir D]``: the dashboard
without the ``dataengine`` CLI (benchmarks start it this way in a separate process)."""

from __future__ import annotations

import argparse
import logging
import time

import uvicorn

from pipeline import auth
from pipeline.layout import Corpus
from pipeline.server.app import ServerConfig, create_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--torch-threads", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not auth.is_loopback(a.host) and not auth.any_active_token(Corpus(a.root)):
        raise SystemExit(f"refusing to bind {a.host}: no personal tokens exist "
                         "(dataengine token create NAME)")
    t0 = time.perf_counter()
    app = create_app(a.root, ServerConfig(host=a.host, port=a.port, cache_dir=a.cache_dir,
                                              torch_threads=a.torch_threads))
    print(f"ready in {time.perf_counter() - t0:.2f}s on http://{a.host}:{a.port}/", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
