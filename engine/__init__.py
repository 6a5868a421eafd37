"""Stagger's runtime: the public API."""
from .llm import LLM
from .lockstep import LLMEngine
from .outputs import RequestMetrics, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams"]
