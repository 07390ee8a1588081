"""Prompt compression: the prompt is shortened before the model sees it; the cache holds the shorter prompt."""

from reference_impls.prompt.llmlingua import LLMLingua
from reference_impls.prompt.longllmlingua import LongLLMLingua
from reference_impls.prompt.selective_context import SelectiveContext

__all__ = ["LLMLingua", "LongLLMLingua", "SelectiveContext"]
