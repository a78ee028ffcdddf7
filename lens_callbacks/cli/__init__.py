"""The ``lens`` command: list, inspect, diff and draw saved captures.

``main`` parses and dispatches; ``captures`` finds and opens the folders a run wrote; ``diff``
compares two captured steps; ``text`` lays out tables for the terminal.
"""

from lens_callbacks.cli.main import main

__all__ = ["main"]
