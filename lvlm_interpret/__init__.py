"""lvlm_interpret: see where a vision-language model looked, token by token.

Python API:
    from lvlm_interpret import load_model, generate_with_capture, get_method
    loaded = load_model("random:llava")
    trace = generate_with_capture(loaded, [image], "Describe the image.")
    explanation = get_method("attention").explain(trace, token_index=0)
    show(trace, explanation)                    # in a notebook: the map on the image, colour bar, caption
"""

from .backend import ExplainBackend, TraceView
from .capture import GenerationOptions, generate_with_capture
from .compare import compare_requests, generate_pair
from .errors import UserInputError
from .families import FAMILIES, ImageLayout
from .images import load_image
from .methods import METHODS, Explanation, get_method
from .models.loading import DEFAULT_MODEL, LoadedModel, load_model
from .notebook import show
from .sae import SparseAutoencoder, encode_image, load_sae, load_sae_for
from .service import ExplainService
from .trace import Trace

__all__ = [
    "DEFAULT_MODEL", "FAMILIES", "METHODS", "ExplainBackend", "ExplainService", "Explanation", "GenerationOptions",
    "ImageLayout", "LoadedModel", "Trace", "TraceView", "UserInputError", "generate_with_capture", "get_method",
    "compare_requests", "generate_pair", "load_image", "load_model", "show",
    "SparseAutoencoder", "encode_image", "load_sae", "load_sae_for",
]
