"""`python -m proxy`: kube-proxy's command line, then run (or `--cleanup`) and exit.

Exit codes: 0 after a clean stop or cleanup, 1 for a bad flag, config file or
setting (the message names the field and value), 2 when start-up fails (a port
already bound, an unknown proxy mode).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.backends.base import UnknownBackendError
from proxy.config import ConfigError


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity >= 4 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname).1s %(threadName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from proxy.cli import parse_settings

    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args or "--version=true" in args:
        print(f"kube-proxy-py {__version__}")
        return 0
    try:
        settings = parse_settings(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _configure_logging(settings.verbosity)
    log = logging.getLogger("proxy")
    if settings.unsupported_flags:
        log.warning(
            "accepted but not supported yet (ignored): %s", ", ".join(settings.unsupported_flags)
        )
    from proxy.app import run

    try:
        return run(settings)
    except UnknownBackendError as err:
        log.error("%s", err)
        return 2
    except OSError as err:
        log.error("start-up failed: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
