"""Explanation methods, one module each, registered by name. Importing this package registers them all."""

from . import attention, cleann, igos, relevancy, tam  # noqa: F401  (each module registers its method)
from .base import METHODS, Explanation, ExplanationMethod, get_method, register_method

__all__ = ["METHODS", "Explanation", "ExplanationMethod", "get_method", "register_method"]
