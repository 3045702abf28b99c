"""Exact comparison of nested run state (checkpoints, state dicts) shared by the resume tests."""
import torch


def same_state(a, b, path="") -> None:
    """Assert that two nested structures of tensors / dicts / lists / plain values are identical,
    tensors bit for bit with the same dtype; the message names the first differing path."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
