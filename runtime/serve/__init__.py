"""Serving and scale-out: PyTriton server (`serve`), Triton model repositories (`triton-repo`)."""

SERVE_EXTRA = 'serving needs PyTriton: pip install "bridge-export[serve]" (into its own venv: it pins numpy<2)'
