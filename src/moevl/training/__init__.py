"""Training with the Hugging Face Trainer: ``MoETrainer``, the routing statistics it logs, router health."""

from moevl.training.routing_health import UniformRoutingMonitor
from moevl.training.stats import routing_statistics
from moevl.training.trainer import MoETrainer

__all__ = ["MoETrainer", "UniformRoutingMonitor", "routing_statistics"]
