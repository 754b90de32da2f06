"""Sparse autoencoders on the vision tower and on the LM's image tokens: train (TopK with aux-k, or ReLU), save and
load in SAELens' format, measure (L0, explained variance, dead features, spliced-in effect), encode images onto
the map's grid, and edit features through the hook points (steering). See docs/sae.md."""

from .activations import Site, image_activations
from .features import (
    FeatureEdit, FeatureGrid, LoadedSAE, editing, encode_image, feature_edit, generate_edited,
    generate_with_feature_edits, load_sae_for, load_top_cells,
)
from .format import load_sae, save_sae
from .model import SparseAutoencoder
from .pipeline import DataSpec, train_on_model
from .train import TrainConfig, train_sae

__all__ = ["DataSpec", "FeatureEdit", "FeatureGrid", "LoadedSAE", "Site", "SparseAutoencoder", "TrainConfig",
           "editing", "encode_image", "feature_edit", "generate_edited", "generate_with_feature_edits",
           "image_activations", "load_sae", "load_sae_for", "load_top_cells", "save_sae", "train_on_model",
           "train_sae"]
