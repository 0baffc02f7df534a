"""Run by the webui at start-up and after an install from the Extensions tab (modules/launch_utils.py
``run_extension_installer``).

K-LoRA installs nothing: it needs torch, safetensors and Pillow, which AUTOMATIC1111's webui and Forge
already ship, and gradio only for the panel the webui builds. Adding a package here would let an extension
change the webui's own environment, which K-LoRA has no reason to do.
"""
