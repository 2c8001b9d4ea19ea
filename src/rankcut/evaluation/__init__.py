"""Evaluation of compressed models: perplexity, zero-shot accuracy (lm-eval, optional) and speed/memory.

Submodules are imported on use so that the optional lm-eval dependency is only needed for zero-shot.
"""
