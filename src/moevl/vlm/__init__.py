"""MoE-LLaVA's stages on any Hugging Face vision-language checkpoint: train, evaluate, compare."""
