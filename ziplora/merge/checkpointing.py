"""Gradient checkpointing with torch.utils.checkpoint (non-reentrant), wrapped around host blocks for a job.

Not the model's own checkpoint flag: sgm's ``CheckpointFunction`` returns gradients only for a block's
inputs and its own parameters, so merger vectors living outside the block would silently get none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed"]


@contextmanager
def checkpointed(blocks: list[nn.Module], enabled: bool = True) -> Iterator[int]:
    """Recompute each block's forward in backward; yields how many blocks were wrapped. Always undone."""
    wrapped: list[nn.Module] = []
    try:
        if enabled:
            for block in blocks:
                if "forward" in block.__dict__:
                    continue  # someone else's instance-level forward: leave it alone
                original = type(block).forward

                def forward(*args, _block=block, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                    if torch.is_grad_enabled():
                        return checkpoint(_original, _block, *args, use_reentrant=False, **kwargs)
                    return _original(_block, *args, **kwargs)

                block.forward = forward  # type: ignore[method-assign]
                wrapped.append(block)
        yield len(wrapped)
    finally:
        for block in wrapped:
            del block.forward
