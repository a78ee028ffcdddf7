"""The computational graph of a capture: built from its records (``model``, no graphviz), drawn
by ``render`` (the only module that imports graphviz)."""

from lens_core.graph.model import GraphNode, ModelGraph, build_graph
from lens_core.graph.render import show_model_graph

__all__ = ["GraphNode", "ModelGraph", "build_graph", "show_model_graph"]
