"""Explanation methods, one module each, registered by name. Importing this package registers them all."""

from . import attention  # noqa: F401  (registers "attention")
from .base import METHODS, Explanation, ExplanationMethod, get_method, register_method

__all__ = ["METHODS", "Explanation", "ExplanationMethod", "get_method", "register_method"]
