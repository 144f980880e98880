"""``RenormGraphModule``: a traced model with a training graph and an eval graph."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from torch import fx, nn
from torch.fx.graph_module import _copy_attr, _forward_from_src, reduce_graph_module

from .passes.renorm_pass import STEP_SUFFIX, RenormOptions, RenormSite, rewrite_batch_norms

__all__ = ["RenormGraphModule"]


def _dispatch_forward(self: "RenormGraphModule", *args: Any, **kwargs: Any) -> Any:
    if not self.training:
        return self._eval_forward(*args, **kwargs)
    out = self._train_forward(*args, **kwargs)
    if not torch.compiler.is_compiling():  # a compiled step carries no host sync
        self.report_nonfinite()
    return out


class RenormGraphModule(fx.GraphModule):
    """A model whose batch-norms run batch renorm in training mode.

    Built from two traces of one model: ``source_graph`` (training mode) and
    ``eval_graph`` (eval mode). ``self.graph`` / ``self.code`` is the source graph
    with each batch-norm rewritten into its renorm subgraph; it runs in training
    mode. In eval mode the module runs ``eval_graph``: renorm's inference is
    batchnorm's, with the same buffers. Both share one set of parameters and
    buffers under the original model's names, so ``state_dict`` keys match.

    ``renorm_sites`` maps each converted layer to its step buffer and settings;
    ``renorm_skipped`` lists batch-norms left alone (no running statistics).
    ``options`` say how the pass rewrites (see :class:`RenormOptions`); ``root`` must hold
    a :class:`RenormSchedule` at ``options.schedule``.
    """

    def __init__(
        self,
        root: nn.Module,
        source_graph: fx.Graph,
        eval_graph: fx.Graph,
        options: RenormOptions,
        class_name: str = "RenormGraphModule",
    ) -> None:
        train_graph = copy.deepcopy(source_graph)
        sites, skipped = rewrite_batch_norms(root, train_graph, options)
        # recompile() (run by GraphModule.__init__) needs the eval graph.
        self.__dict__["eval_graph"] = eval_graph
        super().__init__(root, train_graph, class_name)
        for node in eval_graph.nodes:
            if node.op in ("call_module", "get_attr"):
                _copy_attr(root, self, node.target)  # the real modules, not bare containers
        for site in sites:  # GraphModule copied them as persistent buffers
            self._non_persistent_buffers_set.update((site.diagnostics, site.nonfinite))
        # Diagnostics are each process's own: DDP must not overwrite them with rank 0's every forward.
        prefixes = tuple(name for site in sites for name in (site.diagnostics, site.nonfinite))
        own = sorted(b for b in self._non_persistent_buffers_set if b.startswith(prefixes))
        ignored = [*getattr(root, "_ddp_params_and_buffers_to_ignore", ()), *own]
        self._ddp_params_and_buffers_to_ignore = list(dict.fromkeys(ignored))
        self.source_graph = source_graph
        self.renorm_options = options
        self.renorm_sites: dict[str, RenormSite] = {s.name: s for s in sites}
        self.renorm_skipped: list[str] = skipped
        self.nonfinite_warned: set[str] = set()  # layers already warned about

    def recompile(self) -> Any:
        python_code = super().recompile()
        cls = type(self)
        cls._train_forward = cls.forward
        eval_code = self.eval_graph.python_code(root_module="self")
        cls._eval_forward = _forward_from_src(eval_code.src, eval_code.globals, {})
        cls.forward = _dispatch_forward
        return python_code

    def report_nonfinite(self) -> None:
        """Warn once per layer that has skipped a non-finite training batch (one host sync).

        Runs after every eager training forward. A compiled step carries no Python call (it
        would cost more than the step's normalization, ~0.2 ms on CPU), so compiled models
        are checked on ``train()`` / ``eval()``, ``state_dict()`` and ``renorm_fx.diagnostics()``.
        """
        if not self.renorm_options.nonfinite_guard:
            return
        sites = [s for s in self.renorm_sites.values() if s.nonfinite and s.name not in self.nonfinite_warned]
        if not sites:
            return
        counts = torch.stack([self.get_buffer(s.nonfinite) for s in sites]).tolist()
        for site, count in zip(sites, counts):
            if count > 0:
                self.nonfinite_warned.add(site.name)
                warnings.warn(
                    f"renorm layer {site.name!r}: a training batch had non-finite values (NaN/Inf); its "
                    f"running statistics and step were left unchanged (the last good ones are kept). The "
                    f"batch's output is not finite: check the loss. (Warned once per layer; "
                    f"renorm_fx.diagnostics() counts them.)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def train(self, mode: bool = True) -> "RenormGraphModule":
        if "renorm_sites" in self.__dict__:  # not while GraphModule.__init__ runs
            self.report_nonfinite()
        return super().train(mode)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.report_nonfinite()
        return super().state_dict(*args, **kwargs)

    @property
    def eval_code(self) -> str:
        """The eval-mode forward's source."""
        return self.eval_graph.python_code(root_module="self").src

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Step buffers this module added for functional batch-norms are absent from the
        # original model's checkpoints: keep their current value instead of failing.
        for site in self.renorm_sites.values():
            if site.step.endswith(STEP_SUFFIX) and prefix + site.step not in state_dict:
                state_dict[prefix + site.step] = self.get_buffer(site.step)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- copies: rebuilt from the two traces, so the rewrite is redone exactly ------------
    def _deepcopy_init(self) -> Any:
        def init(res: "RenormGraphModule", fake_mod: nn.Module, graph: fx.Graph) -> None:
            body = fake_mod.__dict__
            RenormGraphModule.__init__(res, fake_mod, body["source_graph"], body["eval_graph"],
                                       body["renorm_options"])

        return init

    def __reduce__(self) -> tuple[Any, ...]:
        # As GraphModule does, pickle code, not graphs: both traces only call modules
        # and functions, so retracing their code on load reproduces them.
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "eval_graph", "source_graph")}
        source = fx.GraphModule(self, self.source_graph).__reduce__()[1]
        evalm = fx.GraphModule(self, self.eval_graph).__reduce__()[1]
        return (_rebuild, (body, source[0]["_code"], source[1], evalm[0]["_code"], evalm[1]))

    def __copy__(self) -> "RenormGraphModule":
        res = RenormGraphModule(self, self.source_graph, self.eval_graph, self.renorm_options)
        res.train(self.training)
        return res


def _rebuild(body: dict, source_src: str, source_imports: str, eval_src: str, eval_imports: str) -> RenormGraphModule:
    source = reduce_graph_module(dict(body, _code=source_src), source_imports)
    evalm = reduce_graph_module(dict(body, _code=eval_src), eval_imports)
    module = RenormGraphModule(source, source.graph, evalm.graph, body["renorm_options"])
    module.train(body.get("training", True))
    return module
