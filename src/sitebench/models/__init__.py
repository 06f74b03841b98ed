"""Biomarker models behind one interface (ground floor: imports nothing else of ours but errors/provenance)."""

from sitebench.models.base import BiomarkerModel, ModelCard, Prediction
from sitebench.models.registry import ResolvedModel, load_model, resolve_model

__all__ = ["BiomarkerModel", "ModelCard", "Prediction", "ResolvedModel", "load_model", "resolve_model"]
