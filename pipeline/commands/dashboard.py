"""``dataengine dashboard``, ``dataengine token ...`` and ``dataengine curation export``.

``dashboard`` serves the curation dashboard and the browser annotation tool for one corpus
(uvicorn, 127.0.0.1:8080 by default). Bound to a non-loopback address it refuses to start until
at least one personal token exists (``dataengine token create NAME``), because every request off
loopback must carry one.
"""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import CONFIG_HELP, ROOT_HELP, SET_HELP

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add ``dashboard``, ``token`` and ``curation`` to ``app``."""

    @app.command("dashboard")
    def dashboard_cmd(
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1). "
                                 "Off loopback every request needs a personal token."),
        port: int = typer.Option(None, "--port", help="TCP port (default 8080)."),
        cache_dir: str = typer.Option(None, "--cache-dir", help="Local folder for rendered "
                                      "thumbnails and shard offsets (default: under /tmp)."),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Serve the curation dashboard and the annotation tool for a corpus."""
        import uvicorn

        from pipeline import auth
        from pipeline.config import load_config
        from pipeline.layout import Corpus
        from pipeline.server.app import ServerConfig, create_app

        try:
            cfg = load_config(ServerConfig, config, overrides, host=host, port=port,
                              cache_dir=cache_dir)
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        corpus = Corpus(root)
        if not auth.is_loopback(cfg.host) and not auth.any_active_token(corpus):
            typer.echo(f"refusing to bind {cfg.host}: off loopback every request needs a token, "
                       f"and {corpus.root} has none. Create one with "
                       f"`dataengine token create NAME --root {corpus.root}`.", err=True)
            raise typer.Exit(2)
        app_ = create_app(corpus.root, cfg)
        typer.echo(f"dataengine dashboard for {corpus.root} on http://{cfg.host}:{cfg.port}/ "
                   f"(cache {app_.state.cache_dir})")
        uvicorn.run(app_, host=cfg.host, port=cfg.port, log_level="warning")

    token_app = typer.Typer(help="Personal access tokens for the dashboard and annotation tool.",
                            no_args_is_help=True)
    app.add_typer(token_app, name="token")

    @token_app.command("create")
    def token_create(
        name: str = typer.Argument(..., help="The person's name (their annotator id)."),
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP + " (unused)"),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP + " (unused)"),
    ) -> None:
        """Create a token for NAME and print it once (only its hash is stored)."""
        from pipeline import auth
        from pipeline.layout import Corpus

        try:
            token = auth.create_token(Corpus(root), name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        typer.echo(token)
        typer.echo(f"token for {name!r} created; it is shown only now. Open "
                   f"http://HOST:PORT/?token=<token> or send 'Authorization: Bearer <token>'.",
                   err=True)

    @token_app.command("list")
    def token_list(
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP + " (unused)"),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP + " (unused)"),
    ) -> None:
        """List tokens (id, name, created, revoked); secrets are never shown."""
        from pipeline import auth
        from pipeline.layout import Corpus

        table = Table("token id", "name", "created", "revoked")
        for t in auth.list_tokens(Corpus(root)):
            table.add_row(t["token_id"], t["name"], t["created"], "yes" if t["revoked"] else "")
        Console().print(table)

    @token_app.command("revoke")
    def token_revoke(
        token_id: str = typer.Argument(..., help="Token id from `dataengine token list`."),
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP + " (unused)"),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP + " (unused)"),
    ) -> None:
        """Revoke a token (takes effect within seconds on running servers)."""
        from pipeline import auth
        from pipeline.layout import Corpus

        try:
            auth.revoke_token(Corpus(root), token_id)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        typer.echo(f"revoked {token_id}")

    people_app = typer.Typer(help="Rounds annotated by people in the browser tool.",
                             no_args_is_help=True)
    app.add_typer(people_app, name="people")

    @people_app.command("open")
    def people_open(
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        stage: str = typer.Option("manual", "--stage", help="manual | semi"),
        model: str = typer.Option(..., "--model", help="SAM version in the loop (vNNNN)."),
        images: int = typer.Option(None, "--images", help="The next N train-split images."),
        keys_file: str = typer.Option(None, "--keys", help="A text file of image keys, one "
                                      "per line (instead of --images)."),
        prefill: str = typer.Option("none", "--prefill", help="semi rounds: none | amg | "
                                    "round:N (masks of round N shown for keep/remove/correct)."),
        precompute: str = typer.Option("ray", "--precompute", help="Embeddings ahead of time: "
                                       "ray (annotation actors on the cluster) | local | off."),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP + " (unused)"),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP + " (unused)"),
    ) -> None:
        """Open a round for people: queue its images and compute their SAM embeddings."""
        from pathlib import Path

        from pipeline.layout import Corpus
        from pipeline.server import people
        from pipeline.server.sam_session import precompute as run_precompute

        corpus = Corpus(root)
        keys = None
        if keys_file:
            keys = [k.strip() for k in Path(keys_file).read_text().splitlines() if k.strip()]
        try:
            number = people.open_round(corpus, stage=stage, model_version=model,
                                       n_images=images, keys=keys, prefill=prefill)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        r = people.PeopleRound(corpus, number)
        shard_keys: dict[str, list[str]] = {}
        for k in r.order:
            shard_keys.setdefault(r.images[k].shard, []).append(k)
        results = run_precompute(corpus, model, shard_keys, mode=precompute)
        computed = sum(x.get("computed", 0) for x in results)
        failed = [x for x in results if "error" in x]
        typer.echo(f"round {number} open for people: {len(r.order)} images in "
                   f"{len(shard_keys)} shards; embeddings computed now: {computed}"
                   + (f"; {len(failed)} shard(s) failed (encoded on demand)" if failed else ""))

    curation_app = typer.Typer(help="The curation decision log.", no_args_is_help=True)
    app.add_typer(curation_app, name="curation")

    @curation_app.command("export")
    def curation_export(
        out: str = typer.Argument(..., help="Destination file (.parquet, .csv or .jsonl; any "
                                  "fsspec URL)."),
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        fmt: str = typer.Option(None, "--format", help="parquet | csv | jsonl (default: from "
                                "the extension)."),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP + " (unused)"),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP + " (unused)"),
    ) -> None:
        """Export every curation decision (who, when, what, why), oldest first."""
        from pipeline import curation
        from pipeline.layout import Corpus

        try:
            n = curation.export_log(Corpus(root), out, fmt)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        typer.echo(f"{n} decisions -> {out}")
