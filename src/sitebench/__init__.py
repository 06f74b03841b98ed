"""sitebench: evidence that an imaging biomarker holds across sites, vendors and scanner software."""

__version__ = "0.1.0"
