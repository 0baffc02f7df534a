"""Mirror of Forge's modules_forge package (its presence is what marks Forge)."""
