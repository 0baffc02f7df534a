"""Mirror of modules/devices.py (A1111 v1.10.1): the compute device (set by initialize; the tests' CPU)."""

import torch

# modules/devices.py: device: torch.device = None, set to get_optimal_device() when the webui starts
device: torch.device = torch.device("cpu")
