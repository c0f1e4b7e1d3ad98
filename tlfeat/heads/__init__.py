"""Heads on cached embeddings: the registry, the study's Keras head, storage, fitting (in memory and streaming)."""

from tlfeat.heads.registry import HEAD_NAMES, HEADS, HeadSpec, get_head, head_trainable_params, list_heads

__all__ = ["HEAD_NAMES", "HEADS", "HeadSpec", "get_head", "head_trainable_params", "list_heads"]
