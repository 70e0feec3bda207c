"""CLI subcommand groups; each module defines ``register(app)`` and is listed in
``pipeline.cli.COMMAND_MODULES``."""
