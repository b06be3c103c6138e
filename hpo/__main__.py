"""``python -m hpo``: the ``hpo`` command (the worker supervisor starts its children this way)."""

from hpo.cli import main

main()
