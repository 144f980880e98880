"""renorm-fx: Batch Renormalization for PyTorch, as a compiler pass.

    model = renormify(model)                       # every batchnorm becomes batch renorm
    model = torch.compile(model, backend="renorm") # same, inside torch.compile
    deploy = fold(model.eval())                    # folded into the preceding conv/linear
"""

from . import backend as _backend
from .config import RenormConfig
from .convert import renormify
from .deploy import FoldReport, export_onnx, fold
from .errors import RenormCompileError, RenormError, RenormTraceError
from .layer import RenormLayer
from .report import LayerDiagnostics, bounds, diagnostics
from .schedule import RenormSchedule
from .steps import count_updates

__all__ = [
    "renormify", "RenormConfig", "RenormSchedule", "RenormLayer", "bounds", "diagnostics", "LayerDiagnostics",
    "count_updates",
    "fold", "FoldReport", "export_onnx", "RenormError", "RenormTraceError", "RenormCompileError",
]
__version__ = "0.2.0"

_backend.register()  # torch.compile(model, backend="renorm")
