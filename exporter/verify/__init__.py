"""Verification: parity of every graph and the pipeline against the PyTorch reference."""
