"""Federated methods: one module each, registered here by name."""

from fedmole.algorithms.base import Method
from fedmole.algorithms.centralized import Centralized
from fedmole.algorithms.fedamole import FedAMoLE
from fedmole.algorithms.fedit import FedIT
from fedmole.algorithms.flame import Flame
from fedmole.algorithms.flexlora import FlexLoRA
from fedmole.algorithms.flora import FLoRA
from fedmole.algorithms.hetlora import HetLoRA
from fedmole.algorithms.local_only import LocalOnly

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Flame, FedAMoLE, FedIT, HetLoRA, FlexLoRA, FLoRA, LocalOnly, Centralized)
}
METHOD_OPTIONS: dict[str, type] = {name: cls.Options for name, cls in METHODS.items()}

__all__ = ["METHODS", "METHOD_OPTIONS", "Method"]
