"""The user-vector computation as an ONNX graph, run by ONNX Runtime on CPU.

`SASRec.encode_last` (input vectors and lengths -> user vectors) is exported with
`torch.onnx.export` (dynamic batch and length axes, no pickle) into a variant's directory as
`encoder.onnx`. The item lookup before it and the scoring after it stay the variant's own, so
any item representation (quantized table, factors, codes) composes with the ONNX encoder.

**The weights are stored once, in the variant's model.safetensors.** `encoder.onnx` holds the
graph only: each weight initializer is left as an empty external-data placeholder, and the
file's metadata (`WEIGHTS_KEY`) names, for each, the model tensor it is (by state-dict name,
transposed or not, as which dtype and shape). `OnnxEncoder(path, tensors)` builds those
initializers from the loaded model's tensors and hands them to ONNX Runtime in memory
(`SessionOptions.add_external_initializers`), before graph optimization, so constant folding and
weight pre-packing work as with weights inside the file. A weight is matched at export by its
values (exactly, or for int8 to within half a quantization step), so the exporter's renaming,
transposing and de-duplication of initializers do not matter.

At batch 1 a small Transformer costs its op dispatches, not its FLOPs: ONNX Runtime runs the
fused graph with far less per-op overhead than eager PyTorch (benchmarks/encoder_runtime.py).
With `int8=True` the MatMuls are quantized by `onnxruntime.quantization.quantize_dynamic` (int8
weights, activations quantized per call); where the model's own int8 weights exist (a torchao
layer's `<weight>.__qdata`, `.__scale`, `.__zero_point`), those are the ones supplied, so the
int8 graph computes with exactly the variant's stored int8 weights.

onnx/onnxscript are needed to export (the compress stage), onnxruntime to run (serving: the
metadata is read from the file's bytes here, without the onnx package); both are imported only
when used.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Mapping
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
WEIGHTS_KEY = "leanrec.weights"  # metadata: JSON list of {name, tensor, transpose, dtype, shape}
# Where a left-out weight "is": no such file exists; the tensors come from the model at load time.
PLACEHOLDER = "supplied-at-load-from-model.safetensors"
INNER = ".__"  # "<weight>.__qdata": an inner tensor of a torchao quantized weight (pipeline.models.variants)
_DTYPES = {"float32": (torch.float32, 1), "int8": (torch.int8, 3)}  # name -> (torch dtype, onnx TensorProto type)


class _EncoderGraph(nn.Module):
    def __init__(self, model: SASRec):
        super().__init__()
        self.model = model

    def forward(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.encode_last(embedded, lengths)


def export_encoder(model: SASRec, target: Path, int8: bool = False,
                   tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """`model.encode_last` as an ONNX graph at `target` (atomic), its weights left out.

    `tensors`: what the weights will be supplied from at load time, by name (default: the model's
    state dict; a variant passes `pipeline.models.variants.encoder_tensors`, which holds a torchao
    layer's int8 tensors). `int8`: MatMul weights int8, activations quantized per call.
    """
    model = model.cpu().eval()
    return export_graph(_EncoderGraph(model).eval(), model.cfg.d_model, model.cfg.max_len, target, int8,
                        model.state_dict() if tensors is None else tensors)


def export_graph(graph: nn.Module, d_model: int, max_len: int, target: Path, int8: bool,
                 tensors: Mapping[str, torch.Tensor]) -> Path:
    """Any module of (embedded (B, L, d), lengths (B,)) -> (B, d) as ONNX, batch and length dynamic,
    every initializer found in `tensors` left out of the file (see the module docstring)."""
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
        _strip_metadata(fp32_path)
        if int8:
            quantized = Path(tmp) / "encoder_int8.onnx"
            _quantize_int8(fp32_path, quantized)
            fp32_path = quantized
        proto = _leave_out_weights(fp32_path, tensors)
        with atomic_path(target) as out:
            out.write_bytes(proto.SerializeToString())
    return target


def _quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs every tensor it leaves alone, and a pre-processing hint, to the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        # Per output channel: one scale per weight row, as torchao's int8.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def _strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node metadata (source stack traces: a quarter of a small model's bytes)."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.ClearField("metadata_props")
        node.doc_string = ""
    onnx.save(proto, str(path))


def _leave_out_weights(path: Path, tensors: Mapping[str, torch.Tensor]):
    """The model at `path` with every initializer that is a tensor of `tensors` made an empty placeholder,
    and the list of what each one is in the metadata. Scalars and shape constants stay in the graph."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)  # before: the checker wants a left-out tensor's file to exist
    initializers = {i.name: i for i in proto.graph.initializer}
    floats = {k: t.detach().cpu() for k, t in tensors.items() if t.dtype.is_floating_point}
    entries: list[dict] = []
    for name, init in initializers.items():
        if init.data_type == onnx.TensorProto.INT8 and name.endswith("_quantized"):
            base = name[: -len("_quantized")]
            found = _match_quantized(onnx.numpy_helper.to_array(init), onnx.numpy_helper.to_array(initializers[f"{base}_scale"]),
                                     onnx.numpy_helper.to_array(initializers[f"{base}_zero_point"]), tensors)
            if found is not None:
                weight, transpose = found
                dims = list(init.dims)
                entries += [{"name": name, "tensor": f"{weight}{INNER}qdata", "transpose": transpose, "dtype": "int8", "shape": dims},
                            {"name": f"{base}_scale", "tensor": f"{weight}{INNER}scale", "transpose": False, "dtype": "float32",
                             "shape": [dims[1]]},
                            {"name": f"{base}_zero_point", "tensor": f"{weight}{INNER}zero_point", "transpose": False,
                             "dtype": "int8", "shape": [dims[1]]}]
            continue
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) <= 1:
            continue
        found = _match_float(torch.from_numpy(onnx.numpy_helper.to_array(init).copy()), floats)
        if found is not None:
            entries.append({"name": name, "tensor": found[0], "transpose": found[1], "dtype": "float32", "shape": list(init.dims)})
    kept = sorted(set(initializers) - {e["name"] for e in entries})
    big = [n for n in kept if int(np.prod(initializers[n].dims)) > 16]
    if big:
        logger.warning("%s: %d initializers are no tensor of the model and stay in the file: %s", path.name, len(big), big[:5])
    for entry in entries:
        init = initializers[entry["name"]]
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.ClearField("int32_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        init.external_data.add(key="location", value=PLACEHOLDER)
    proto.metadata_props.add(key=WEIGHTS_KEY, value=json.dumps(entries, separators=(",", ":")))
    return proto


def _match_float(values: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> tuple[str, bool] | None:
    """The tensor `values` is exactly, as (name, transposed), or None."""
    for key, tensor in tensors.items():
        if tensor.numel() != values.numel():
            continue
        if tensor.shape == values.shape and torch.equal(tensor.float(), values):
            return key, False
        if tensor.dim() == 2 and tensor.T.shape == values.shape and torch.equal(tensor.float().T, values):
            return key, True
    return None


def _match_quantized(quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                     tensors: Mapping[str, torch.Tensor]) -> tuple[str, bool] | None:
    """The torchao int8 weight (name, transposed) whose values ONNX Runtime's (K, N) int8 weight quantizes, or None.

    ONNX Runtime rounded the variant's dequantized weight again: the two agree to half its step."""
    if quantized.ndim != 2:
        return None
    approx = (quantized.astype(np.float32) - zero_point.astype(np.float32)) * scale.astype(np.float32)  # (K, N)
    tolerance = 0.5 * float(scale.max()) * 1.001 + 1e-7
    best: tuple[float, str] | None = None
    for key in tensors:
        if not key.endswith(f"{INNER}qdata"):
            continue
        weight = key[: -len(f"{INNER}qdata")]
        qdata = tensors[key]
        if tuple(qdata.T.shape) != quantized.shape:
            continue
        values = ((qdata.float() - tensors[f"{weight}{INNER}zero_point"].float()) * tensors[f"{weight}{INNER}scale"].float()).T
        error = float((values - torch.from_numpy(approx)).abs().max())
        if error <= tolerance and (best is None or error < best[0]):
            best = (error, weight)
    return None if best is None else (best[1], True)


def weight_entries(model_bytes: bytes) -> list[dict]:
    """The metadata list of left-out weights of an encoder file (empty for one that holds its weights),
    read from the protobuf's top-level fields without the onnx package (serving has onnxruntime only)."""
    for field, value in _fields(model_bytes):
        if field == 14:  # ModelProto.metadata_props: StringStringEntryProto {key = 1, value = 2}
            entry = dict(_fields(value))
            if entry.get(1) == WEIGHTS_KEY.encode():
                return json.loads(entry.get(2, b"[]").decode("utf-8"))
    return []


def _fields(data: bytes):
    """(field number, bytes) of each length-delimited field at one level of a protobuf message."""
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, position = _varint(data, position)
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        elif wire == 2:
            size, position = _varint(data, position)
            if position + size > len(data):
                raise ValueError("truncated protobuf")
            yield field, data[position:position + size]
            position += size
        else:
            raise ValueError(f"not a protobuf message (wire type {wire})")


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated protobuf")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7


def supplied_weights(entries: list[dict], tensors: Mapping[str, torch.Tensor] | None, path: Path) -> dict[str, np.ndarray]:
    """The left-out initializers of an encoder file built from the model's `tensors` (see `weight_entries`)."""
    if entries and tensors is None:
        raise ValueError(f"{path} holds the encoder's graph only: its weights come from the model "
                         "(load it with pipeline.models.variants.load_variant)")
    weights = {}
    for entry in entries:
        if entry["tensor"] not in tensors:
            raise ValueError(f"{path}: the model has no tensor {entry['tensor']!r} for the encoder's {entry['name']!r}")
        tensor = tensors[entry["tensor"]].detach().cpu()
        if entry["transpose"]:
            tensor = tensor.T
        dtype = _DTYPES[entry["dtype"]][0]
        if tensor.numel() != int(np.prod(entry["shape"])):
            raise ValueError(f"{path}: the model's {entry['tensor']!r} has {tensor.numel()} values, the encoder's "
                             f"{entry['name']!r} needs shape {entry['shape']}")
        weights[entry["name"]] = np.ascontiguousarray(tensor.to(dtype).reshape(entry["shape"]).numpy()).copy()
    return weights


def _checked_max_threads(max_threads: int | None) -> int | None:
    if max_threads is not None and max_threads < 1:  # ONNX Runtime would read 0 as "all cores"
        raise ValueError(f"max_threads must be at least 1, got {max_threads}")
    return max_threads


class OnnxEncoder:
    """An `encoder.onnx` on ONNX Runtime's CPU provider: (embedded, lengths) -> user vectors.

    The session uses as many intra-op threads as torch is set to when it is called (at most
    `max_threads` where set), so one knob (`torch.set_num_threads`) governs both runtimes; a change
    rebuilds the session once.
    """

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor] | None = None, max_threads: int | None = None):
        """`tensors`: the model's, by name, for a file that holds the graph only (`export_encoder`).
        `max_threads`: a cap on the session's intra-op threads (None: torch's thread count)."""
        self.max_threads = _checked_max_threads(max_threads)
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
        try:
            entries = weight_entries(self._model_bytes)
        except ValueError as error:
            raise ValueError(f"{path} is not a loadable ONNX encoder: {error}") from error
        # Kept for the session's lifetime (ONNX Runtime reads them in place) and for a rebuilt session.
        self._weights = supplied_weights(entries, tensors, path)
        self._threads = 0
        self._session = self._new_session(self._wanted_threads())  # a broken file fails here, at load time

    @property
    def supplied(self) -> Mapping[str, np.ndarray]:
        """The initializers this file leaves out, as built from the model's tensors (empty for a file with its weights)."""
        return dict(self._weights)

    @property
    def threads(self) -> int:
        """Intra-op threads of the current session."""
        return self._threads

    def __deepcopy__(self, memo: dict) -> OnnxEncoder:
        return self  # an immutable runtime object: copies of the model share it (sessions are thread-safe)

    def capped(self, max_threads: int | None) -> OnnxEncoder:
        """This encoder with its own session of at most `max_threads` intra-op threads (the file and weights shared)."""
        other = copy.copy(self)
        other.max_threads = _checked_max_threads(max_threads)
        other._session = other._new_session(other._wanted_threads())
        return other

    def _wanted_threads(self) -> int:
        threads = torch.get_num_threads()
        return threads if self.max_threads is None else min(threads, self.max_threads)

    def _new_session(self, threads: int):
        options = self._runtime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = self._runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._weights:
            names = list(self._weights)
            self._values = [self._runtime.OrtValue.ortvalue_from_numpy(self._weights[n]) for n in names]
            options.add_external_initializers(names, self._values)
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
        threads = self._wanted_threads()
        if threads != self._threads:
            self._session = self._new_session(threads)
        feeds = {"embedded": np.ascontiguousarray(embedded.detach().cpu().float().numpy()),
                 "lengths": lengths.detach().cpu().numpy().astype(np.int64, copy=False)}
        return torch.from_numpy(self._session.run(None, feeds)[0])
