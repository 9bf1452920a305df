"""Drive a backend the way the proxier does, for tests that call `sync` by hand.

The seam's contract: a partial hint carries, for each changed port, its state at the
last successful sync (`SyncHint.previous`). Tests state the new desired state and the
names that changed; `Driven` fills `previous` in from what it last synced successfully.
"""

from __future__ import annotations

from typing import Any

from proxy.backends.base import Backend
from proxy.model import ProxyState, ServicePortName, ServicePortState, SyncHint


class Driven:
    """A backend plus the memory the proxier would keep of the last successful sync."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.synced: dict[ServicePortName, ServicePortState] = {}

    @property
    def name(self) -> str:
        return self.backend.name

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        previous = {name: self.synced[name] for name in hint.changed if name in self.synced}
        self.backend.sync(state, SyncHint(hint.full, hint.changed, previous, hint.node_changed))
        self.synced = dict(state.services)

    def cleanup(self) -> bool:
        return self.backend.cleanup()

    def drifted(self) -> bool:
        return self.backend.drifted()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)
