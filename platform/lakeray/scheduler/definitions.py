"""The Dagster code location of a lakeray project: ``dagster dev -m lakeray.scheduler.definitions``.

Dagster loads a code location by importing a module and reading its ``defs``, so this module builds
them at import (the one lakeray module that does work at import time, by Dagster's contract). The
project is the one ``lakeray`` itself would pick: ``$LAKERAY_CONFIG`` (else ./lakeray.yaml) and
``$LAKERAY_PROFILE``, which ``lakeray scheduler start`` sets for the daemon and the webserver.
"""

from __future__ import annotations

from lakeray.config import load_settings
from lakeray.scheduler.assets import build_definitions

__all__ = ["defs"]

defs = build_definitions(load_settings())
