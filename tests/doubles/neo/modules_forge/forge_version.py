"""Mirror of modules_forge/forge_version.py (Forge Neo 2.26, the exo101/sd-webui-forge-neo-v3 bundle)."""

version = "neo"
release = "2.26"
