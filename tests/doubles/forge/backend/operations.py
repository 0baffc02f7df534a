"""Mirror of backend/operations.py: Forge's Linear is a torch.nn.Module with weight/bias attributes, not a
torch.nn.Linear subclass (ForgeOperations.Linear); forward is F.linear on the (possibly cast) weight."""

from __future__ import annotations

import torch


class ForgeOperations:
    # backend/operations.py: ForgeOperations.Linear(in_features, out_features, *args, **kwargs)
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            bias = kwargs.get("bias", True)
            self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) * in_features**-0.5)
            self.bias = torch.nn.Parameter(torch.randn(out_features) * 0.02) if bias else None
            self.scale_weight = None
            self.parameters_manual_cast = False

        # backend/operations.py: ForgeOperations.Linear.forward(x) → get_weight_and_bias + F.linear
        def forward(self, x):
            weight, bias = self.weight, self.bias
            if self.parameters_manual_cast:
                weight = weight.to(x)
                bias = bias.to(x) if bias is not None else None
            return torch.nn.functional.linear(x, weight, bias)
