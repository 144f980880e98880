"""renorm-fx: Batch Renormalization for PyTorch, as a compiler pass.

    model = renormify(model)                       # every batchnorm becomes batch renorm
    model = torch.compile(model, backend="renorm") # same, inside torch.compile
    deploy = fold(model.eval())                    # folded into the preceding conv/linear
"""

from . import backend as _backend
from .api import LayerDiagnostics, RenormTraceError, bounds, diagnostics, renormify
from .backend import RenormCompileError, renorm_backend
from .deploy import FoldReport, export_onnx, fold
from .graph_module import RenormGraphModule
from .schedule import RenormSchedule

__all__ = [
    "renormify", "bounds", "diagnostics", "LayerDiagnostics", "RenormSchedule", "RenormGraphModule",
    "RenormTraceError", "renorm_backend", "RenormCompileError", "fold", "FoldReport", "export_onnx",
]
__version__ = "0.1.0"

_backend.register()  # torch.compile(model, backend="renorm")
