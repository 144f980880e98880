"""The errors renorm-fx raises: one base class, one subclass per entry point's failure."""

from __future__ import annotations

__all__ = ["RenormError", "RenormTraceError", "RenormCompileError"]


class RenormError(RuntimeError):
    """Base class of renorm-fx's own errors (bad input to a layer raises ValueError / TypeError, as batchnorm)."""


class RenormTraceError(RenormError):
    """torch.fx could not trace a module that renorm-fx needs to rewrite or fold."""


class RenormCompileError(RenormError):
    """The renorm pass could not rewrite a graph torch.compile captured."""
