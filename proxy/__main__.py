"""`python -m proxy`: kube-proxy's command line, then run (or `--cleanup`) and exit.

Exit codes: 0 after a clean stop or cleanup, 1 for a bad flag, config file or
setting (the message names the field and value), 2 when start-up fails (a port
already bound, an unknown proxy mode).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from proxy.app import run
from proxy.backends.base import UnknownBackendError
from proxy.cli import parse_settings
from proxy.config.errors import ConfigError
from proxy.kube.listwatch import ConfigError as KubeConfigError


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity >= 4 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname).1s %(threadName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The reflector logs connection failures itself, once, with what it will do next.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _configure_logging(verbosity=0)
    log = logging.getLogger("proxy")
    try:
        settings = parse_settings(args)
    except ConfigError as err:
        log.error("%s", err)
        return 1
    if settings.verbosity >= 4:
        logging.getLogger().setLevel(logging.DEBUG)
    if settings.unsupported_flags:
        log.warning("not supported yet, ignored: %s", ", ".join(settings.unsupported_flags))
    if settings.overridden_by_flags:
        log.info("flags override the config file for: %s", ", ".join(settings.overridden_by_flags))
    try:
        return run(settings)
    except KubeConfigError as err:
        log.error("%s", err)
        return 1
    except UnknownBackendError as err:
        log.error("%s", err)
        return 2
    except OSError as err:
        log.error("start-up failed: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
