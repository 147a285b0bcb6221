"""Export a trained model for serving: ONNX, torch.export, AOTInductor, TorchScript (trace).

`export(model, format, path, example_batch)` writes one artefact; `load(format, path)` gives back a
callable that maps a batch dict to logits, as the model does, in any process.

- "onnx": through torch.onnx (the torch.export-based exporter) on the plain reference path. The graph's
  inputs are named as the batch dict's keys; the batch dim of every input and the history dim of
  every input whose name starts with "hist" are dynamic. Runs in onnxruntime.
- "torch-export": a `torch.export` program (.pt2) with the same dynamic dims. On CUDA the fused
  kernels stay in the graph as fastdin's torch.library custom ops (fastdin::attention_pool, ...),
  which the loading process must register by importing fastdin; on the CPU the PyTorch path is traced.
- "aoti": that program compiled ahead of time by AOTInductor into a package (.pt2) that runs
  without Python model code (a C++ compiler is needed to build it, not to load it).
- "torchscript": `torch.jit.trace` (positional inputs; their names go to PATH.inputs beside it,
  which `load` reads). `torch.jit.script` is not supported: the modules use Python
  features TorchScript does not compile (f-strings in error messages, NamedTuple `DiceParams` with
  tensors and floats dispatched by isinstance, Optional module attributes, `torch.library` custom
  ops called through Python), so it fails at `Dice` and in `DIN.forward`.

The model is exported in eval mode (running Dice statistics); the caller's mode is restored.
"""
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

FORMATS = ("onnx", "torch-export", "aoti", "torchscript")
Batch = Mapping[str, Tensor]


class PositionalModel(nn.Module):
    """The model called with the batch's tensors in the order of `names` (ONNX and TorchScript take
    positional inputs; the names become the ONNX graph's input names)."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(dict(zip(self.names, tensors)))


def example_batch_for(model: nn.Module, batch_size: int = 4, history: int = 6) -> Dict[str, Tensor]:
    """A small valid batch for a `fastdin.DIN` (ids within its tables, every history length used).

    Export traces with it; batch_size and history differ (and are > 1), so that neither dim is
    specialised to a constant or unified with the other.
    """
    tables = model.embeddings
    g = torch.Generator().manual_seed(0)

    def ids(table: str, *shape: int) -> Tensor:
        return torch.randint(1, tables[table].num_embeddings, shape, generator=g)

    lengths = torch.arange(batch_size) % history + 1
    valid = torch.arange(history) < lengths[:, None]
    batch = {"item": ids("item", batch_size), "category": ids("category", batch_size),
             "hist_items": ids("item", batch_size, history) * valid,
             "hist_categories": ids("category", batch_size, history) * valid, "lengths": lengths}
    user_fields = sorted(name for name in tables if name.startswith("user_"))
    if user_fields:
        batch["user_sparse"] = torch.stack([ids(name, batch_size) for name in user_fields], 1)
    if getattr(model, "num_dense", 0):
        batch["dense"] = torch.rand(batch_size, model.num_dense, generator=g)
    return batch


def _dynamic_dims(batch: Batch):
    """Per input: dim 0 is the batch, dim 1 of a "hist*" input is the history length."""
    rows, history = torch.export.Dim("batch", min=1), torch.export.Dim("history", min=1)
    return {name: ({0: rows, 1: history} if name.startswith("hist") and t.dim() == 2 else {0: rows})
            for name, t in batch.items()}


def _check_example(batch) -> Dict[str, Tensor]:
    if not isinstance(batch, Mapping) or not all(isinstance(t, Tensor) for t in batch.values()):
        raise TypeError(f"example_batch must be a dict of tensors (a batch as the model takes it), got {type(batch).__name__}")
    batch = {name: t for name, t in batch.items() if name != "label"}  # the label is no model input
    sizes = {t.shape[0] for t in batch.values() if t.dim() > 0}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"example_batch's tensors must share one batch size of at least 2 (dim 0), got {sorted(sizes)}")
    return batch


@contextmanager
def _eval_mode(model: nn.Module, backend: Optional[str] = None):
    """Eval mode, and optionally every fastdin module's backend set, for the export; restored after."""
    was_training = model.training
    saved = {m: m.backend for m in model.modules() if hasattr(m, "backend")}
    model.eval()
    if backend is not None:
        for m in saved:
            m.backend = backend
    try:
        yield model
    finally:
        model.train(was_training)
        for m, b in saved.items():
            m.backend = b


def export(model: nn.Module, format: str, path: Union[str, Path], example_batch: Optional[Batch] = None) -> Path:
    """Write `model` (a module mapping a batch dict to logits [B]) in `format` to `path`; returns path.

    example_batch: a batch to trace with (default `example_batch_for(model)`); its batch size and
    history length only fix the example, both stay dynamic (not for "torchscript", whose trace fixes
    every shape check it passed through but keeps B and T symbolic in the tensor ops).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path {path}: the folder {path.parent} does not exist")
    batch = _check_example(example_batch_for(model) if example_batch is None else example_batch)
    names = list(batch)
    # ONNX takes the plain reference ops; the other formats keep each module's backend choice
    with _eval_mode(model, "reference" if format == "onnx" else None), torch.no_grad():
        if format == "onnx":
            dims = _dynamic_dims(batch)
            with warnings.catch_warnings():
                # torch's own notes on naming ("axis name ... will not be used"), not about the model
                warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
                program = torch.onnx.export(
                    PositionalModel(model, names).eval(), tuple(batch.values()), dynamo=True,
                    dynamic_shapes=(tuple(dims[n] for n in names),), input_names=names, output_names=["logits"],
                )
            program.save(str(path))
        elif format == "torchscript":
            with warnings.catch_warnings():
                # under jit.trace every shape check compares traced sizes and warns; the checks
                # only guard the example's shapes, the traced ops keep B and T symbolic
                warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean",
                                        category=torch.jit.TracerWarning, module=r"fastdin\.")
                traced = torch.jit.trace(PositionalModel(model, names).eval(), tuple(batch.values()))
            traced.save(str(path))
            path.with_name(path.name + ".inputs").write_text("\n".join(names) + "\n")
        else:
            program = torch.export.export(model, (batch,), dynamic_shapes={"batch": _dynamic_dims(batch)})
            if format == "torch-export":
                torch.export.save(program, str(path))
            else:
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def load(format: str, path: Union[str, Path]) -> Callable[[Batch], Tensor]:
    """The artefact at `path` as a callable batch dict -> logits [B] (CPU tensors in, a tensor out)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {path}: no such file")
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        return lambda batch: torch.from_numpy(session.run(None, {n: batch[n].numpy() for n in inputs})[0])
    if format == "torchscript":
        module = torch.jit.load(str(path))
        inputs = path.with_name(path.name + ".inputs").read_text().split()
        return lambda batch: module(*(batch[n] for n in inputs))
    import fastdin  # noqa: F401  registers fastdin's custom ops, which a CUDA program may call

    if format == "torch-export":
        module = torch.export.load(str(path)).module()
        return lambda batch: module({n: t for n, t in batch.items() if n != "label"})
    runner = torch._inductor.aoti_load_package(str(path))
    return lambda batch: runner({n: t for n, t in batch.items() if n != "label"})
