"""Bridges to other tools. Each module imports its tool itself, so ``import moevl`` needs none of them.

``moevl.integrations.lmms_tasks``: local lmms-eval tasks from LLaVA-format JSON files (no lmms-eval needed
to write them). ``moevl.integrations.lmms_eval``: the lmms-eval model class (needs ``pip install
moevl[lmms]``).
"""
