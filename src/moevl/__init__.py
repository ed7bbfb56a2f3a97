"""moevl: sparse MoE vision-language models with better routing (STGC, LTDR) and BCKD distillation."""

__version__ = "0.1.0"
