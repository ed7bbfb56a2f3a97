"""STGC: token gradient conflicts in MoE, found exactly in the experts' backward (RESEARCH.md §1)."""

from moevl.stgc.cosine import token_gradient_cosine
from moevl.stgc.diagnostics import flag_persistence
from moevl.stgc.loss import conflict_elimination_loss
from moevl.stgc.observer import STGCConfig

__all__ = ["STGCConfig", "conflict_elimination_loss", "flag_persistence", "token_gradient_cosine"]
