"""Compressed variants of a trained SASRec teacher, saved and loaded through one format.

A variant directory holds `variant.json` (what kind, from which teacher, its
settings), `model_config.json` and `model.safetensors`, and optionally `encoder.onnx`
(pipeline/models/onnx_encoder.py: the user-vector computation for ONNX Runtime, used
on CPU; the graph only, its weights supplied from model.safetensors at load time);
`load_variant` rebuilds the module and `pipeline.models.recommender.Recommender` serves any of them.

Kinds (the compress stage, pipeline/compression/compress.py, applies them to the teacher,
a pruned copy or a distilled student):
- `fp16` / `bf16`: every weight stored at half precision; on CPU they are
  computed in fp32 after loading (half-precision matmuls are not faster there),
  so they save disk and memory at rest, not latency.
- `int8_table` / `int4_table`: the item-embedding table quantized row-wise
  (pipeline/models/quantize.py); rows are dequantized on lookup; int8 tables are scored
  as codes (pipeline/models/scoring.py), int4 tables dequantized once at load time.
- `lowrank`: the item table factorised by truncated SVD, E ~= U V with
  U (n_items+1, r) and V (r, d); scoring is (h V^T) U^T, fewer FLOPs than h E^T
  when r < d.
- `int8`: the Transformer's Linear layers quantized to int8 weights with torchao
  (`quantize_` + `Int8WeightOnlyConfig`, PyTorch's supported quantization path;
  `torch.ao.quantization` is deprecated) plus the row-wise int8 item table; the
  few remaining float tensors (positions, LayerNorms, biases) are stored in
  fp16. torchao weights are tensor subclasses, which safetensors cannot hold: their
  inner tensors (int8 `qdata`, `scale`, `zero_point`) are stored as plain tensors
  and copied back into freshly quantized layers at load time (no pickle). On CPU the
  layers are then dequantized to fp32 (`dequantize_linears`): int8 weight-only matmuls
  are slower than fp32 there, so the int8 weights save bytes at rest, and a CPU
  speed-up comes from the variant's int8 ONNX encoder instead (which computes with
  the same stored int8 weights).
- `int4`: the same int8 Linear layers with the item table row-wise int4 (two
  values per byte).
- `pruned`: a structurally narrowed model whose thinned matrices are stored as
  bitmask + non-zero values (pipeline/compression/pruning.py), densified at load time.
- `pq`: the item table as product-quantized item codes (pipeline/models/codes.py,
  pipeline/models/coded.py): m uint8 codes per item into m shared fp32 codebooks; input
  lookup and output scoring both go through the codes (scores = sums of sub-space
  lookup-table entries), the dense table is never built. Only a `CodedSASRec` (codes
  assigned, typically fine-tuned, by the compress stage) saves as this kind.
- `pq_int8`: `pq` with the codebooks stored int8, row-wise over each (sub-space, dimension)
  pair: one scale and offset per K centroid values (per centroid they would cost more than
  its d / m values); dequantized to fp32 at load time, so it serves as `pq` does.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.io import Layout, atomic_path, write_json
from pipeline.models.coded import CODES_PREFIX, CodedSASRec
from pipeline.models.codes import PADDING_CODE, ItemCodes
from pipeline.models.onnx_encoder import ENCODER_FILE, INNER, OnnxEncoder, export_encoder
from pipeline.models.quantize import RowwiseQuantized, quantize_rowwise
from pipeline.models.sasrec import CONFIG_FILE, WEIGHTS_FILE, SASRec, SASRecConfig, load_model
from pipeline.models.scoring import ExcludeArg, dense_top_k, rowwise_int8_top_k
from pipeline.models.sparse import densify_state, prunable_weights, sparsify_state

VARIANT_FILE = "variant.json"
VARIANTS_DIR = "variants"  # models/<run>/variants/<name>/: one directory per variant


def variants_dir(layout: Layout, run_name: str) -> Path:
    return layout.model_dir(run_name) / VARIANTS_DIR


TABLE_KEY = "item_embedding.weight"
KINDS = ("fp32", "fp16", "bf16", "int8_table", "int4_table", "lowrank", "int8", "int4", "pruned", "pq", "pq_int8")
CODED_KINDS = {"pq": 32, "pq_int8": 8}  # value = bits of the stored codebooks
TORCHAO_KINDS = {"int8": 8, "int4": 4}  # Linear layers in torchao int8; value = bits of the item table


def _quantize_linears_int8(model: nn.Module) -> None:
    """int8 weights for every Linear of the Transformer blocks, in place (torchao)."""
    # torchao logs that its CUDA-only kernels are missing on a CPU machine: expected here, not news.
    torchao_logger = logging.getLogger("torchao")
    level = torchao_logger.level
    torchao_logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    finally:
        torchao_logger.setLevel(level)
    quantize_(model.blocks, Int8WeightOnlyConfig())


class QuantizedTableSASRec(SASRec):
    """SASRec whose item table is stored row-wise quantized.

    int8: the table stays quantized in memory; input lookups dequantize just the looked-up rows and
    `top_k` scores the codes directly (scoring.rowwise_int8_top_k). Only `item_weights` (full score
    matrices for evaluation, training losses) dequantizes the whole table, on each call.
    int4: dequantized once at load time and scored as a dense table (no faster int4 scorer yet)."""

    def __init__(self, cfg: SASRecConfig, table: RowwiseQuantized):
        super().__init__(cfg)
        del self.item_embedding  # replaced by the quantized table below
        self.bits, self.dim = table.bits, table.dim
        # Buffers (not persisted: variant files store them as table.*) so .to(device) moves them.
        self.register_buffer("table_codes", table.codes, persistent=False)
        self.register_buffer("table_scale", table.scale, persistent=False)
        self.register_buffer("table_offset", table.offset, persistent=False)
        if table.bits != 8:
            self.register_buffer("dense_table", table.dequantize(), persistent=False)

    @property
    def table(self) -> RowwiseQuantized:
        return RowwiseQuantized(self.table_codes, self.table_scale, self.table_offset, self.bits, self.dim)

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        return self.table.dequantize(items) if self.bits == 8 else self.dense_table[items]

    def item_weights(self) -> torch.Tensor:
        return self.table.dequantize() if self.bits == 8 else self.dense_table

    def top_k(self, user_vectors: torch.Tensor, k: int, exclude: ExcludeArg = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits == 8:
            return rowwise_int8_top_k(user_vectors, self.table, k, exclude)
        return super().top_k(user_vectors, k, exclude)


class LowRankSASRec(SASRec):
    """SASRec whose item table is the product of two thin factors."""

    def __init__(self, cfg: SASRecConfig, rank: int):
        super().__init__(cfg)
        del self.item_embedding
        self.item_factors = nn.Parameter(torch.zeros(cfg.n_items + 1, rank))
        self.basis = nn.Parameter(torch.zeros(rank, cfg.d_model))

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_factors[items] @ self.basis

    def item_weights(self) -> torch.Tensor:
        return self.item_factors @ self.basis

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.basis.T) @ self.item_factors.T

    def top_k(self, user_vectors: torch.Tensor, k: int, exclude: ExcludeArg = None) -> tuple[torch.Tensor, torch.Tensor]:
        # The same product as `logits`, (h V^T) U^T: the (n_items + 1, d) table is never formed.
        return dense_top_k(user_vectors @ self.basis.T, self.item_factors, k, exclude)


def factorise(table: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation (truncated SVD): table ~= factors @ basis."""
    if not 1 <= rank <= min(table.shape):
        raise ValueError(f"rank must be between 1 and {min(table.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(table.detach().float(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def _is_subclass(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


@torch.no_grad()
def _load_quantized(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy stored tensors into a model whose Linear layers were just quantized (same shapes)."""
    expected = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name == "dense_table" or name.startswith("table_"):  # the quantized table: loaded from table.*
            continue
        if _is_subclass(tensor):
            for inner in tensor.__tensor_flatten__()[0]:
                key = f"{name}{INNER}{inner}"
                getattr(tensor, inner).copy_(state[key])
                expected.add(key)
        else:
            tensor.copy_(state[name].to(tensor.dtype))
            expected.add(name)
    unexpected = {k for k in state if not k.startswith("table.")} - expected
    if unexpected:
        raise ValueError(f"stored tensors the model does not have: {sorted(unexpected)[:5]}")


def _inner_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A torchao quantized weight's inner tensors by stored name, `<name>.__qdata` etc. (as model.safetensors holds them)."""
    return {f"{name}{INNER}{inner}": getattr(tensor, inner) for inner in tensor.__tensor_flatten__()[0]}


def _other_weights(teacher: SASRec) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items() if k != TABLE_KEY}


def build_variant_state(teacher: SASRec, kind: str, rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors to save and the settings that go into variant.json."""
    if isinstance(teacher, LowRankSASRec):  # already factorised (and perhaps fine-tuned): saved as it is
        if kind != "lowrank":
            raise ValueError(f"a low-rank model can only be saved as kind 'lowrank', not {kind!r}")
        return ({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()},
                {"rank": teacher.item_factors.shape[1]})
    if isinstance(teacher, CodedSASRec):
        return _coded_state(teacher, kind)
    if kind in CODED_KINDS:
        raise ValueError(f"kind {kind!r} needs a CodedSASRec (pipeline.models.coded.code_teacher assigns the codes)")
    table = teacher.item_embedding.weight.detach().cpu()
    if kind == "fp32":
        return {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}, {}
    if kind in ("fp16", "bf16"):
        dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        return {k: v.detach().cpu().to(dtype).contiguous() for k, v in teacher.state_dict().items()}, {}
    if kind in ("int8_table", "int4_table"):
        bits = 8 if kind == "int8_table" else 4
        return {**_other_weights(teacher), **quantize_rowwise(table, bits).state_dict("table")}, {"bits": bits}
    if kind in TORCHAO_KINDS:
        bits = TORCHAO_KINDS[kind]
        model = copy.deepcopy(teacher).cpu().eval()
        _quantize_linears_int8(model)
        others: dict[str, torch.Tensor] = {}
        for name, tensor in model.state_dict().items():
            if name == TABLE_KEY:
                continue
            if _is_subclass(tensor):
                others.update({key: inner.contiguous() for key, inner in _inner_tensors(name, tensor).items()})
            else:
                others[name] = tensor.detach().half().contiguous()  # positions, LayerNorms, biases: 2% of the bytes
        return {**others, **quantize_rowwise(table, bits).state_dict("table")}, {"bits": bits, "linear": "torchao_int8_weight_only"}
    if kind == "pruned":
        state = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
        sparse = [name for name in prunable_weights(teacher) if bool((state[name] == 0).any())]
        return sparsify_state(state, sparse), {"sparse_tensors": sparse}
    if kind == "lowrank":
        if rank is None:
            raise ValueError("lowrank needs a rank")
        factors, basis = factorise(table, rank)
        return {**_other_weights(teacher), "item_factors": factors, "basis": basis}, {"rank": rank}
    raise ValueError(f"unknown variant kind {kind!r}; choose one of {KINDS}")


def _coded_state(model: CodedSASRec, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    if kind not in CODED_KINDS:
        raise ValueError(f"a coded model can only be saved as kind 'pq' or 'pq_int8', not {kind!r}")
    codes = model.item_codes()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(f"{CODES_PREFIX}.")}
    state[f"{CODES_PREFIX}.codes"] = codes.codes.detach().cpu().contiguous()
    codebooks = codes.codebooks.detach().cpu().float().contiguous()
    if kind == "pq":
        state[f"{CODES_PREFIX}.codebooks"] = codebooks
    else:
        state.update(quantize_rowwise(_by_dimension(codebooks), 8).state_dict(f"{CODES_PREFIX}.codebooks"))
    return state, {"n_subspaces": codes.n_subspaces, "codebook_size": codes.codebook_size, "codebook_bits": CODED_KINDS[kind]}


def _by_dimension(codebooks: torch.Tensor) -> torch.Tensor:
    """(m, K, d / m) -> (m * d / m, K): one row per (sub-space, dimension), the unit int8 codebooks are quantized in."""
    return codebooks.permute(0, 2, 1).reshape(-1, codebooks.shape[1]).contiguous()


def _load_coded(cfg: SASRecConfig, variant: dict, state: dict[str, torch.Tensor]) -> CodedSASRec:
    m, size = variant["n_subspaces"], variant["codebook_size"]
    model = CodedSASRec(cfg, m, size)
    if variant["kind"] == "pq_int8":
        prefix = f"{CODES_PREFIX}.codebooks"
        quantized = RowwiseQuantized.from_state_dict(state, prefix, 8, size)
        state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}.")}
        codebooks = quantized.dequantize().reshape(m, cfg.d_model // m, size).permute(0, 2, 1).contiguous()
        codebooks[:, PADDING_CODE] = 0.0  # the grid need not hold 0 exactly; the padding centroid must be exactly zero
        state[prefix] = codebooks
    codes = ItemCodes.from_state_dict(state, CODES_PREFIX)  # checks every code is inside its codebook
    model.load_state_dict({**state, **codes.state_dict(CODES_PREFIX)})
    return model


def save_variant(teacher: SASRec, directory: Path, kind: str, rank: int | None = None, extra: dict | None = None) -> Path:
    """`teacher` compressed as `kind` into `directory`; `extra` is recorded in variant.json."""
    state, settings = build_variant_state(teacher, kind, rank)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(teacher.cfg.to_dict(), directory / CONFIG_FILE)
    write_json({"kind": kind, **settings, **(extra or {})}, directory / VARIANT_FILE)
    return directory


def load_variant(directory: Path, device: torch.device | str = "cpu", with_encoder: bool = True) -> SASRec:
    """Any saved model: a teacher directory (no variant.json) or a variant directory.

    On CPU, a directory's `encoder.onnx` (pipeline/models/onnx_encoder.py) computes the user vectors
    (for batches of up to variant.json's `encoder_max_batch` users where it has one: `compress.runtime:
    auto`; PyTorch above) and torchao int8 Linear layers are dequantized to fp32 (see `dequantize_linears`).
    `with_encoder=False`: the model alone, its encoder.onnx not read (a rebuild reusing the model writes a new one).
    """
    variant = _recorded(directory)
    model = _load_module(directory, variant, device)
    if torch.device(device).type == "cpu":
        # The encoder's weights are the model's own (encoder.onnx holds the graph only): taken before the
        # int8 layers are dequantized, so an int8 graph gets the stored int8 values.
        tensors = encoder_tensors(model) if with_encoder and (directory / ENCODER_FILE).exists() else None
        dequantize_linears(model)
        if tensors is not None:
            max_batch = variant.get(ENCODER_MAX_BATCH_KEY)
            threads = None if max_batch is None else SMALL_BATCH_ENCODER_THREADS
            model.encoder = OnnxEncoder(directory / ENCODER_FILE, tensors, max_threads=threads)
            model.encoder_max_batch = max_batch
    return model


ENCODER_MAX_BATCH_KEY = "encoder_max_batch"  # variant.json: the largest batch the ONNX encoder computes (absent: all)
# ONNX Runtime's intra-op threads where it computes small batches only (`compress.runtime: auto`): on 2 cores one
# thread was as fast up to batch 16, and a session with a thread pool slowed the PyTorch calls of the large
# batches beside it (docs/benchmarks.md, "ONNX Runtime's threads beside PyTorch's").
SMALL_BATCH_ENCODER_THREADS = 1


def _recorded(directory: Path) -> dict:
    """variant.json's settings; {} for a teacher directory (it has none)."""
    path = directory / VARIANT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def encoder_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an encoder.onnx's weights are supplied from, by state-dict name; a torchao int8 weight as
    its inner tensors `<name>.__qdata`, `.__scale`, `.__zero_point` (as model.safetensors stores them)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if _is_subclass(tensor):
            tensors.update(_inner_tensors(name, tensor))
        else:
            tensors[name] = tensor
    return tensors


def export_variant_encoder(directory: Path) -> Path:
    """encoder.onnx for the model saved in `directory`, computing what its PyTorch encoder computes on CPU.

    The graph only (pipeline/models/onnx_encoder.py): its weights are this model's tensors, supplied
    from model.safetensors at load time, so the directory stores each weight once. The int8 kinds get
    int8 MatMuls with their own stored int8 weights; every other kind its fp32 (or half-rounded,
    pruned) weights as loaded.
    """
    model = _load_module(directory, _recorded(directory), "cpu")
    tensors = encoder_tensors(model)
    int8 = any(INNER in name for name in tensors)
    dequantize_linears(model)
    return export_encoder(model, directory / ENCODER_FILE, int8=int8, tensors=tensors)


def dequantize_linears(model: nn.Module) -> None:
    """torchao int8 Linear weights -> fp32 in place: on CPU, int8 weight-only matmuls are slower than fp32.

    benchmarks/encoder_runtime.py (small preset, 1 thread): with Int8WeightOnlyConfig layers the user
    vector takes 1.4x as long as fp32 at batch 1 and as long at batch 256 (2 threads, a loaded
    machine: 8.4x and 1.07x). The stored int8 values are kept exactly (dequantized, not
    re-rounded); CUDA keeps the int8 layers.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and _is_subclass(module.weight):
                module.weight = nn.Parameter(module.weight.dequantize().float().contiguous(), requires_grad=False)


def _load_module(directory: Path, variant: dict, device: torch.device | str) -> SASRec:
    """The model in `directory` as saved; `variant` is its variant.json ({}: a teacher directory)."""
    if not variant:
        return load_model(directory, device)
    cfg = SASRecConfig(**json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
    kind = variant["kind"]
    state = load_file(str(directory / WEIGHTS_FILE))
    if kind in ("fp32", "fp16", "bf16"):
        model = SASRec(cfg)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    elif kind in ("int8_table", "int4_table"):
        table = RowwiseQuantized.from_state_dict(state, "table", variant["bits"], cfg.d_model)
        model = QuantizedTableSASRec(cfg, table)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("table.")})
    elif kind in TORCHAO_KINDS:
        table = RowwiseQuantized.from_state_dict(state, "table", variant["bits"], cfg.d_model)
        model = QuantizedTableSASRec(cfg, table)
        _quantize_linears_int8(model)
        _load_quantized(model, state)
    elif kind == "lowrank":
        model = LowRankSASRec(cfg, variant["rank"])
        model.load_state_dict(state)
    elif kind in CODED_KINDS:
        model = _load_coded(cfg, variant, state)
    elif kind == "pruned":
        model = SASRec(cfg)
        shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
        model.load_state_dict(densify_state(state, shapes))
    else:
        raise ValueError(f"{directory}: unknown variant kind {kind!r}")
    return model.to(device).eval()


def size_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
