"""renorm-fx: Batch Renormalization for PyTorch, as a compiler pass.

    model = renormify(model)                       # every batchnorm becomes batch renorm
    model = torch.compile(model, backend="renorm") # same, inside torch.compile
    deploy = fold(model.eval())                    # folded into the preceding conv/linear
"""

from .api import RenormTraceError, bounds, renormify
from .graph_module import RenormGraphModule
from .schedule import RenormSchedule

__all__ = ["renormify", "bounds", "RenormSchedule", "RenormGraphModule", "RenormTraceError"]
__version__ = "0.1.0"
