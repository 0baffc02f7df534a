"""A small test double of the Forge (lllyasviel/stable-diffusion-webui-forge, main dfdcbab6) surface that
klora.webui.forge touches. Each item names the Forge file and function or class it mirrors; module names,
attribute names and signatures follow Forge, bodies are reduced to what the glue needs."""
