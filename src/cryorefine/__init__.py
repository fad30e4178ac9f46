"""cryorefine: template-based cryo-EM particle finding and refinement (PyTorch, CPU or CUDA)."""

__version__ = "0.1.0"
