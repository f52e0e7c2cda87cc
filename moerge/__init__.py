"""moerge: model MoErging platform."""
__version__ = "0.1.0"
