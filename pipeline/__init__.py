"""Transformers as learned algorithm simulators: tasks, classical algorithms, networks, studies."""
__version__ = "0.1.0"
