"""sinkscope: find out how attention sinks form in transformer language models."""

__version__ = "0.1.0"
