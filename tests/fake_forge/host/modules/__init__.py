"""Mirror of the webui's modules package as Forge ships it (A1111 1.10.1 base)."""
