"""Checkpoint -> bundle: the graph builder, weight streaming, the traced exporter, bundle writing, graph checks."""
