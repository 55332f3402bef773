"""The user-vector computation as an ONNX graph, run by ONNX Runtime on CPU.

`SASRec.encode_last` (input vectors and lengths -> user vectors) is exported with
`torch.onnx.export` (dynamic batch and length axes; the weights inside the one
file, no pickle) into a variant's directory as `encoder.onnx`. The item lookup
before it and the scoring after it stay the variant's own, so any item
representation (quantized table, factors) composes with the ONNX encoder.

At batch 1 a small Transformer costs its op dispatches, not its FLOPs: ONNX
Runtime runs the fused graph with far less per-op overhead than eager PyTorch
(benchmarks/encoder_runtime.py measures it). With `int8=True` the MatMuls are
quantized by `onnxruntime.quantization.quantize_dynamic` (int8 weights,
activations quantized per call), which pays off where the FLOPs do (batch 256,
wider models).

onnx/onnxscript are needed to export (the compress stage), onnxruntime to run
(serving); both are imported only when used.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.io import atomic_path
from pipeline.models.sasrec import SASRec

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
INPUT_NAMES = ("embedded", "lengths")
OUTPUT_NAME = "user"
OPSET = 18


class _EncoderGraph(nn.Module):
    def __init__(self, model: SASRec):
        super().__init__()
        self.model = model

    def forward(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.encode_last(embedded, lengths)


def export_encoder(model: SASRec, target: Path, int8: bool = False, stored_dtype: torch.dtype = torch.float32) -> Path:
    """`model.encode_last` as an ONNX file at `target` (atomic).

    `int8`: MatMul weights quantized to int8 (activations per call). `stored_dtype` float16 or
    bfloat16: the float weights are stored at that precision and cast to fp32 inside the graph
    (ONNX Runtime folds the casts once, at session start), so a half-precision variant's encoder
    is half the size and computes exactly what its PyTorch path does (half-rounded weights in fp32).
    """
    model = model.cpu().eval()
    return export_graph(_EncoderGraph(model).eval(), model.cfg.d_model, model.cfg.max_len, target, int8, stored_dtype)


def export_graph(graph: nn.Module, d_model: int, max_len: int, target: Path, int8: bool = False,
                 stored_dtype: torch.dtype = torch.float32) -> Path:
    """Any module of (embedded (B, L, d), lengths (B,)) -> (B, d) as ONNX, batch and length dynamic."""
    if int8 and stored_dtype != torch.float32:
        raise ValueError("an int8 encoder stores its weights in int8: leave stored_dtype at float32")
    for logger_name in ("torch.onnx", "onnxscript", "onnx_ir"):  # the exporter's progress lines are not news
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    example = (torch.zeros(2, min(3, max_len), d_model), torch.tensor([1, 2]))
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1, max=max_len)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "encoder_fp32.onnx"
        program = torch.onnx.export(graph, example, None, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                    opset_version=OPSET, dynamic_shapes={"embedded": {0: batch, 1: length}, "lengths": {0: batch}},
                                    dynamo=True, external_data=False, verbose=False)
        program.save(str(fp32_path), external_data=False)
        _rewrite(fp32_path, stored_dtype)
        with atomic_path(target) as out:
            if int8:
                _quantize_int8(fp32_path, out)
            else:
                out.write_bytes(fp32_path.read_bytes())
    return target


def _quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs every tensor it leaves alone, and a pre-processing hint, to the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        # Per output channel: one scale per weight row, as torchao's int8 (measured top-10 overlap
        # with fp32 on the default data 0.994, per tensor 0.993).
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def _rewrite(path: Path, stored_dtype: torch.dtype) -> None:
    """Drop the exporter's per-node metadata (source stack traces: a quarter of a small model's bytes) and
    store every float weight (not scalars) as `stored_dtype`, with a Cast to float where it is read."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.ClearField("metadata_props")
        node.doc_string = ""
    if stored_dtype != torch.float32:
        element_type = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[stored_dtype]
        casts = []
        for initializer in proto.graph.initializer:
            if initializer.data_type != onnx.TensorProto.FLOAT or int(np.prod(initializer.dims)) <= 1:
                continue
            values = torch.from_numpy(onnx.numpy_helper.to_array(initializer).copy()).to(stored_dtype)
            name = initializer.name
            initializer.name = f"{name}__stored"
            initializer.data_type = element_type
            initializer.raw_data = values.view(torch.int16).numpy().tobytes()
            initializer.ClearField("float_data")
            casts.append(onnx.helper.make_node("Cast", [initializer.name], [name], to=onnx.TensorProto.FLOAT))
        nodes = [*casts, *proto.graph.node]  # a graph's nodes are in topological order: the casts come first
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


class OnnxEncoder:
    """An `encoder.onnx` on ONNX Runtime's CPU provider: (embedded, lengths) -> user vectors.

    The session uses as many intra-op threads as torch is set to when it is called, so one knob
    (`torch.set_num_threads`) governs both runtimes; a change rebuilds the session once.
    """

    def __init__(self, path: Path):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(f"{path} needs onnxruntime to run: pip install onnxruntime (or remove the file to use "
                              "the PyTorch encoder)") from error
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX encoder at {path}")
        self.path = path
        self._runtime = onnxruntime
        self._model_bytes = path.read_bytes()
        self._threads = 0
        self._session = self._new_session(torch.get_num_threads())  # a broken file fails here, at load time

    @property
    def threads(self) -> int:
        """Intra-op threads of the current session."""
        return self._threads

    def __deepcopy__(self, memo: dict) -> OnnxEncoder:
        return self  # an immutable runtime object: copies of the model share it (sessions are thread-safe)

    def _new_session(self, threads: int):
        options = self._runtime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = self._runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = self._runtime.InferenceSession(self._model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise ValueError(f"{self.path} is not a loadable ONNX encoder: {error}") from error
        names = tuple(i.name for i in session.get_inputs())
        if names != INPUT_NAMES:
            raise ValueError(f"{self.path}: inputs {names}, expected {INPUT_NAMES}")
        self._threads = threads
        return session

    def __call__(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        if threads != self._threads:
            self._session = self._new_session(threads)
        feeds = {"embedded": np.ascontiguousarray(embedded.detach().cpu().float().numpy()),
                 "lengths": lengths.detach().cpu().numpy().astype(np.int64, copy=False)}
        return torch.from_numpy(self._session.run(None, feeds)[0])
