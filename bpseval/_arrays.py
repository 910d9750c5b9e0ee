"""Turn numpy arrays or torch tensors into numpy arrays without importing torch for numpy input."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_tensor(value: Any) -> bool:
    """True for a torch tensor, decided without importing torch (it costs a second at start-up)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array holding `value` at no lower precision than it was given.

    Tensors on any device are detached and moved to the CPU. Floating dtypes numpy lacks
    (bfloat16, float8) become float32, which holds each of their values exactly.
    """
    if is_tensor(value):
        import torch

        tensor = value.detach()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.to(torch.float32)
        return tensor.cpu().numpy()
    return np.asarray(value)
