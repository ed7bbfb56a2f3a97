"""STGC: token gradient conflicts in MoE, found exactly in the experts' backward (RESEARCH.md §1)."""

from moevl._deprecated import moved_names
from moevl.stgc.cosine import token_gradient_cosine
from moevl.stgc.diagnostics import flag_persistence
from moevl.stgc.loss import conflict_elimination_loss
from moevl.stgc.observer import STGCConfig

__all__ = ["STGCConfig", "conflict_elimination_loss", "flag_persistence", "token_gradient_cosine"]

#: Names this package exported before issue 25 cut its surface -> their module (one release, with a warning).
__getattr__ = moved_names(
    __name__,
    {
        "CosineHistogram": "moevl.stgc.diagnostics",
        "ExpertGradientObserver": "moevl.moe.expert_function",
        "ExpertGrads": "moevl.moe.expert_function",
        "FlagPersistence": "moevl.stgc.diagnostics",
        "LinearGrads": "moevl.moe.expert_function",
        "STGCObserver": "moevl.stgc.observer",
        "STGCStats": "moevl.stgc.observer",
        "conflict_elimination_grad": "moevl.stgc.loss",
        "cosine_histogram": "moevl.stgc.diagnostics",
        "grouped_token_gradient_cosine": "moevl.stgc.cosine",
    },
)
