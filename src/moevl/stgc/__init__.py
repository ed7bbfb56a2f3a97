"""STGC: token gradient conflicts in MoE, found exactly in the experts' backward (RESEARCH.md §1)."""

from moevl.moe.expert_function import ExpertGradientObserver, ExpertGrads, LinearGrads
from moevl.stgc.cosine import grouped_token_gradient_cosine, token_gradient_cosine
from moevl.stgc.diagnostics import CosineHistogram, FlagPersistence, cosine_histogram, flag_persistence
from moevl.stgc.loss import conflict_elimination_grad, conflict_elimination_loss
from moevl.stgc.observer import STGCConfig, STGCObserver, STGCStats

__all__ = [
    "CosineHistogram",
    "ExpertGradientObserver",
    "ExpertGrads",
    "FlagPersistence",
    "LinearGrads",
    "STGCConfig",
    "STGCObserver",
    "STGCStats",
    "conflict_elimination_grad",
    "conflict_elimination_loss",
    "cosine_histogram",
    "flag_persistence",
    "grouped_token_gradient_cosine",
    "token_gradient_cosine",
]
