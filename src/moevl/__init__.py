"""moevl: sparse MoE vision-language models with better routing (STGC, LTDR) and BCKD distillation.

Importing moevl has no side effects: it imports neither torch nor transformers and registers nothing.
The moevl checkpoint format loads with ``moevl.checkpoint.load_moe_model``, or with transformers' Auto
classes after ``moevl.checkpoint.register_auto_classes()``.
"""

__version__ = "0.1.0"
