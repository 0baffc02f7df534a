"""K-LoRA: training-free fusion of a content LoRA and a style LoRA (CVPR 2025), host-independent core."""

__version__ = "0.1.0"
