"""Mirror of Forge's backend package (the 2.x architecture)."""
