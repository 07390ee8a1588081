"""Retrieval: methods that hold the whole cache but let each decoding query read only a few keys."""

from reference_impls.retrieval.base import RetrievalMethod, RetrievalStore, selected_nbytes, top_k_mask
from reference_impls.retrieval.quest import Quest
from reference_impls.retrieval.infllm import InfLLM
from reference_impls.retrieval.sparq import SparQ
from reference_impls.retrieval.loki import Loki

__all__ = ["InfLLM", "Loki", "Quest", "RetrievalMethod", "RetrievalStore", "SparQ", "selected_nbytes", "top_k_mask"]
