"""Settings: kube-proxy's defaults, its `KubeProxyConfiguration` file, its value rules.

Three layers make the `Settings` the proxy runs with (merged by `proxy.cli`):

    built-in defaults  <  the config file (`--config`)  <  flags given on the command line

One module per job:

    errors.py     `ConfigError` / `BadValueError` and how a message names the field and value
    durations.py  Go durations ("30s", "1m0s") both ways
    values.py     one scalar: Go booleans, bounded integers, masquerade bit, proxy mode
    addresses.py  IP:port, bind addresses, pod CIDRs, the NodePort address filter
    node.py       which Node this is (--hostname-override, $NODE_NAME, host name)
    settings.py   `Settings` with kube-proxy's defaults, and settings by name while merging
    rules.py      rules spanning several settings or depending on the mode (checked last)
    schema.py     the v1alpha1 `KubeProxyConfiguration` field tree, as data
    file.py       reading a config file into what it sets (`FileConfig`)
    write.py      `--write-config-to`: `Settings` back into a config file (the inverse)

Import a name from the module that owns it. The package re-exports only the names the
rest of the proxy has always imported from here (`Settings`, `ConfigError`,
`split_host_port`). Nothing in the package touches the network or keeps state; file.py
reads the config file and write.py writes one, nothing else does I/O.
"""

from proxy.config.addresses import split_host_port
from proxy.config.errors import ConfigError
from proxy.config.settings import Settings

__all__ = ["ConfigError", "Settings", "split_host_port"]
