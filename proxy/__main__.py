"""`python -m proxy`: kube-proxy's command line, then one of its ways to run, and exit.

After the settings are parsed, exactly one of these happens, in upstream's order:

- `--write-config-to PATH`: write the effective configuration as a
  `KubeProxyConfiguration` file (`proxy.config.write`) and exit; nothing else runs;
- `--cleanup`: remove every rule this proxy owns and exit (`proxy.app`);
- `--init-only`: set the kernel tunables that need full root privileges and exit
  (`proxy.init`); no API server, no rule is touched;
- otherwise run the proxy until SIGTERM or SIGINT (`proxy.app`).

Exit codes: 0 after a clean stop, cleanup, write or init, 1 for a bad flag, config file
or setting, a file that cannot be written, or a sysctl `--init-only` cannot set (the
message names the field or sysctl and the value), 2 when start-up fails (a port already
bound, an unknown proxy mode).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from proxy.app import run
from proxy.backends.base import UnknownBackendError
from proxy.cli import parse_settings
from proxy.config.errors import ConfigError
from proxy.config.settings import Settings
from proxy.config.write import write_config_file
from proxy.init import InitError, apply, kernel_version, plan
from proxy.kernel.sysctl import ProcTunables
from proxy.kube.listwatch import ConfigError as KubeConfigError

log = logging.getLogger("proxy")


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
    if settings.write_config_to:
        return _write_config(settings, settings.write_config_to)
    if settings.init_only and not settings.cleanup:  # upstream: --cleanup runs first, and exits
        return _init_only(settings)
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


def _write_config(settings: Settings, path: str) -> int:
    """`--write-config-to`: as upstream, write and exit before anything else runs."""
    try:
        write_config_file(settings, path)
    except ConfigError as err:
        log.error("%s", err)
        return 1
    if settings.master:
        log.warning("--master is not part of a KubeProxyConfiguration: not written to %s", path)
    log.info("wrote the configuration to %s", path)
    return 0


def _init_only(settings: Settings) -> int:
    """`--init-only`: the privileged kernel settings (`proxy.init`), then exit."""
    steps = plan(settings, cpus=os.cpu_count() or 1, kernel=kernel_version(os.uname().release))
    try:
        apply(steps, ProcTunables())
    except InitError as err:
        log.error("%s", err)
        return 1
    log.info("initialized (--init-only): exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
