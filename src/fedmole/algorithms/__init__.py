"""Federated methods: one module each, registered here by name."""

from fedmole.algorithms.base import Method
from fedmole.algorithms.fedamole import FedAMoLE
from fedmole.algorithms.flame import Flame

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Flame, FedAMoLE)}
METHOD_OPTIONS: dict[str, type] = {name: cls.Options for name, cls in METHODS.items()}

__all__ = ["METHODS", "METHOD_OPTIONS", "Method"]
