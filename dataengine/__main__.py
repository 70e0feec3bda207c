"""``python -m dataengine ...``: the same command line as the ``dataengine`` script."""

from dataengine.pipeline.cli import main

main()
