"""moevl: sparse MoE vision-language models with better routing (STGC, LTDR) and BCKD distillation."""

from moevl.auto import register_auto_classes

__version__ = "0.1.0"

# The moevl checkpoint format loads with transformers' Auto classes once moevl is imported
# (lazily: nothing of transformers is imported here; see moevl.auto).
register_auto_classes()
