"""One handler module per kind; ``register_all`` installs them into a kopf registry."""

from __future__ import annotations

from collections.abc import Callable

import kopf

from rasterkube_operator import reconcile
from rasterkube_operator.handlers import changescore, common, mosaic, prediction, vectorization

KIND_MODULES = (mosaic, prediction, changescore, vectorization)


def register_all(registry: kopf.OperatorRegistry, deps: Callable[[], reconcile.Deps],
                 poll_interval_s: float = common.DEFAULT_POLL_INTERVAL_S) -> None:  # fmt: skip
    for module in KIND_MODULES:
        common.register(module.KIND, registry, deps, poll_interval_s)
