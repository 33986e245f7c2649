"""TensorRT: optimization profiles from the manifest, precision plans, engine builds, trtexec scripts."""
