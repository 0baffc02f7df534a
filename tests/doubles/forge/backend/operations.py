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


class ParameterGGUF(torch.nn.Parameter):
    """backend/operations_gguf.py ParameterGGUF: the data is packed (here: flattened), ``.shape`` is the real
    (logical) shape (``real_shape``)."""

    def __new__(cls, tensor, *, tensor_shape):
        param = super().__new__(cls, tensor.detach().reshape(-1).clone(), requires_grad=False)
        param.real_shape = torch.Size(tensor_shape)
        return param

    @property
    def shape(self):
        return self.real_shape

    def dequantize(self):  # backend/operations_gguf.py dequantize_tensor
        return self.as_subclass(torch.Tensor).reshape(self.real_shape)


class ForgeOperationsGGUF(ForgeOperations):
    # backend/operations.py ForgeOperationsGGUF.Linear: a torch.nn.Module without in_features/out_features;
    # forward dequantizes the weight (weights_manual_cast with dequantize_tensor) and calls F.linear
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            dense = ForgeOperations.Linear(in_features, out_features, *args, **kwargs)
            self.weight = ParameterGGUF(dense.weight, tensor_shape=(out_features, in_features))
            self.bias = dense.bias

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.dequantize(), self.bias)


class ForgeOperationsBNB4bits(ForgeOperations):
    # backend/operations_bnb.py ForgeLoader4Bit (a torch.nn.Module without in_features/out_features): the
    # weight is a bitsandbytes Params4bit whose stored shape is packed; the real shape is quant_state.shape
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            dense = ForgeOperations.Linear(in_features, out_features, *args, **kwargs)
            packed = dense.weight.detach().reshape(-1, 2).clone()
            self.weight = torch.nn.Parameter(packed, requires_grad=False)
            shape = torch.Size((out_features, in_features))
            self.weight.quant_state = type("QuantState", (), {"shape": shape})()
            self.bias = dense.bias

        def forward(self, x):
            weight = self.weight.reshape(self.weight.quant_state.shape)
            return torch.nn.functional.linear(x, weight, self.bias)
