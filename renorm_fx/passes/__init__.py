"""Graph passes: one pass a file."""

from .renorm_pass import RenormSite, rewrite_batch_norms

__all__ = ["RenormSite", "rewrite_batch_norms"]
