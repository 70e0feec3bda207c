"""``dataengine dashboard``, ``token ...``, ``people open`` and ``curation export``.

``dashboard`` serves the curation dashboard and the browser annotation tool for one corpus
(uvicorn, 127.0.0.1:8080 by default). Bound to a non-loopback address (or with
``--require-token``) it refuses to start until at least one personal token exists
(``dataengine token create NAME --role ROLE``), because every request must then carry one.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dataengine.pipeline.cli.common import (CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands, console,
                                            stage_config)


def dashboard_cmd(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1). "
                             "Off loopback every request needs a personal token."),
    port: int = typer.Option(None, "--port", help="TCP port (default 8080)."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Local folder for rendered "
                                  "thumbnails and shard offsets (default: under /tmp)."),
    torch_threads: int = typer.Option(None, "--torch-threads", help="Torch threads for the "
                                      "SAM decoder (default: torch's)."),
    require_token: bool = typer.Option(None, "--require-token/--no-require-token",
                                       help="Every request needs a token, loopback included "
                                       "(default: on off loopback or behind a trusted proxy). "
                                       "Use it when a port-forward or proxy reaches the server."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Serve the curation dashboard and the annotation tool for a corpus."""
    import time

    import uvicorn

    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.server import auth
    from dataengine.pipeline.server.app import ServerConfig, create_app

    cfg = stage_config(ServerConfig, config, overrides, "dashboard", host=host, port=port,
                       cache_dir=cache_dir, torch_threads=torch_threads,
                       require_token=require_token)
    corpus = Corpus(root)
    if cfg.tokens_required and not auth.any_active_token(corpus):
        raise PermissionError(f"refusing to serve {cfg.host}: every request needs a token, and "
                              f"{corpus.root} has none. Create one with `dataengine token create "
                              f"NAME --role admin --root {corpus.root}`.")
    t0 = time.perf_counter()
    app_ = create_app(corpus.root, cfg)
    typer.echo(f"dataengine dashboard for {corpus.root} ready in {time.perf_counter() - t0:.2f}s "
               f"on http://{cfg.host}:{cfg.port}/ (tokens "
               f"{'required' if cfg.tokens_required else 'optional on loopback'}; cache "
               f"{app_.state.cache_dir})")
    # forwarded headers are read by the app, from trusted_proxies only
    uvicorn.run(app_, host=cfg.host, port=cfg.port, log_level="warning", proxy_headers=False,
                server_header=False, timeout_keep_alive=5)


def token_create(
    name: str = typer.Argument(..., help="The person's name (their annotator id)."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    role: str = typer.Option("annotator", "--role", help="annotator (annotate) | curator "
                             "(also approve, reject, export) | admin (also open rounds, manage "
                             "tokens)."),
) -> None:
    """Create a token for NAME with ROLE and print it once (only its hash is stored)."""
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.server import auth

    token = auth.create_token(Corpus(root), name, role)
    typer.echo(token)
    typer.echo(f"{role} token for {name!r} created; it is shown only now. Sign in once at "
               f"http://HOST:PORT/login?token=<token> (the token leaves the URL at once), or "
               f"send 'Authorization: Bearer <token>'.", err=True)


def token_list(root: str = typer.Option(..., "--root", help=ROOT_HELP)) -> None:
    """List tokens (id, name, created, revoked); secrets are never shown."""
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.server import auth

    table = Table("token id", "name", "role", "created", "revoked")
    for t in auth.list_tokens(Corpus(root)):
        table.add_row(t["token_id"], t["name"], t["role"], t["created"],
                      "yes" if t["revoked"] else "")
    console.print(table)


def token_revoke(
    token_id: str = typer.Argument(..., help="Token id from `dataengine token list`."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
) -> None:
    """Revoke a token (takes effect within seconds on running servers)."""
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.server import auth

    auth.revoke_token(Corpus(root), token_id)
    typer.echo(f"revoked {token_id}")


def people_open(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    stage: str = typer.Option("manual", "--stage", help="manual | semi"),
    model: str = typer.Option(..., "--model", help="SAM version in the loop (vNNNN)."),
    images: int = typer.Option(None, "--images", help="The next N train-split images."),
    keys_file: str = typer.Option(None, "--keys", help="A text file of image keys, one per "
                                  "line (instead of --images)."),
    prefill: str = typer.Option("none", "--prefill", help="semi rounds: none | amg | round:N "
                                "(masks of round N shown for keep/remove/correct)."),
    precompute: str = typer.Option("ray", "--precompute", help="Embeddings ahead of time: ray "
                                   "(annotation actors on the cluster) | local | off."),
    honeypot_every: int = typer.Option(0, "--honeypot-every", help="Also queue a held-out "
                                       "image with ground truth after every N-1 images, "
                                       "scored and never trained on (0 = none)."),
) -> None:
    """Open a round for people: queue its images and compute their SAM embeddings."""
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.server import people
    from dataengine.pipeline.server.sam_session import precompute as run_precompute

    corpus = Corpus(root)
    keys = None
    if keys_file:
        keys = [k.strip() for k in Path(keys_file).read_text().splitlines() if k.strip()]
    number = people.open_round(corpus, stage=stage, model_version=model, n_images=images,
                               keys=keys, prefill=prefill, honeypot_every=honeypot_every)
    r = people.PeopleRound(corpus, number)
    shard_keys = {s: list(keys) for s, keys in r.shards.items()}
    results = run_precompute(corpus, model, shard_keys, mode=precompute)
    computed = sum(x.get("computed", 0) for x in results)
    failed = [x for x in results if "error" in x]
    typer.echo(f"round {number} open for people: {len(r.order)} images in {len(shard_keys)} "
               f"shards; embeddings computed now: {computed}"
               + (f"; {len(failed)} shard(s) failed (encoded on demand)" if failed else ""))


def people_review(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    source: int = typer.Option(..., "--round", help="A finished people round."),
    share: float = typer.Option(0.1, "--share", help="Share of its annotated images re-done."),
    seed: int = typer.Option(0, "--seed", help="Seed of the (stable, hash-based) choice."),
) -> None:
    """Open a review round: a share of a finished round's images, each for someone other than
    its first annotator; their agreement IoU is recorded per image and person."""
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.server import people
    from dataengine.pipeline.server.people_review import open_review_round

    corpus = Corpus(root)
    number = open_review_round(corpus, source=source, share=share, seed=seed)
    typer.echo(f"review round {number} open: {len(people.PeopleRound(corpus, number).order)} "
               f"images of round {source}")


def curation_export(
    out: str = typer.Argument(..., help="Destination file (.parquet, .csv or .jsonl; any "
                              "fsspec URL)."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    fmt: str = typer.Option(None, "--format", help="parquet | csv | jsonl (default: from the "
                            "extension)."),
) -> None:
    """Export every curation decision (who, when, what, why), oldest first."""
    from dataengine.pipeline.core import curation
    from dataengine.pipeline.core.layout import Corpus

    n = curation.export_log(Corpus(root), out, fmt)
    typer.echo(f"{n} decisions -> {out}")


def register(app: typer.Typer) -> None:
    """Add ``dashboard`` and the ``token``, ``people`` and ``curation`` groups to ``app``."""
    add_commands(app, {"dashboard": dashboard_cmd})
    groups = {
        "token": ("Personal access tokens for the dashboard and annotation tool.",
                  {"create": token_create, "list": token_list, "revoke": token_revoke}),
        "people": ("Rounds annotated by people in the browser tool.",
                   {"open": people_open, "review": people_review}),
        "curation": ("The curation decision log.", {"export": curation_export}),
    }
    for name, (help_text, commands) in groups.items():
        group = typer.Typer(help=help_text, no_args_is_help=True)
        add_commands(group, commands)
        app.add_typer(group, name=name)
