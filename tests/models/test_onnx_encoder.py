import copy
import shutil
import sys

import onnx
import pytest
import torch

from pipeline.compression.pruning import apply_masks, magnitude_masks, prune_structured
from pipeline.models.onnx_encoder import ENCODER_FILE, OnnxEncoder, export_encoder
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import WEIGHTS_FILE, SASRec, SASRecConfig
from pipeline.models.variants import (
    ENCODER_MAX_BATCH_KEY,
    SMALL_BATCH_ENCODER_THREADS,
    export_variant_encoder,
    load_variant,
    save_variant,
    size_on_disk,
)


@pytest.fixture(scope="module")
def model() -> SASRec:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=60, d_model=16, n_layers=2, n_heads=2, max_len=12, dropout=0.0)).eval()
    with torch.no_grad():  # weights of a trained model's scale, not init's 0.02: differences would hide in tiny values
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def fp32_file(model, tmp_path_factory):
    return export_encoder(model, tmp_path_factory.mktemp("onnx") / ENCODER_FILE)


def _stored_tensor_bytes(path) -> int:
    """Bytes of tensor data inside the file (left-out weights are external placeholders, 0 bytes here)."""
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    return sum(len(i.raw_data) + 4 * len(i.float_data) + 8 * len(i.int64_data) + 4 * len(i.int32_data) for i in stored)


def _stored_tensors(path) -> list[str]:
    """Names of the tensors inside the file with more than 2 values (scalars and shape constants aside)."""
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    return [i.name for i in stored if i.data_location != onnx.TensorProto.EXTERNAL and int(torch.tensor(list(i.dims)).prod()) > 2]


def _float_weight_values(model: SASRec) -> int:
    return sum(p.numel() for name, p in model.state_dict().items() if name != "item_embedding.weight")


def _inputs(model: SASRec, batch: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    lengths[0] = width
    items = torch.randint(1, model.cfg.n_items + 1, (batch, width), generator=generator)
    items[torch.arange(width) >= lengths.view(-1, 1)] = 0
    return model.embed(items).detach(), lengths


@pytest.mark.parametrize(("batch", "width"), [(1, 12), (1, 1), (7, 12), (5, 4)])
def test_fp32_encoder_equals_the_eager_encoder(model, fp32_file, batch, width):
    """Dynamic batch and length axes; the same user vectors as PyTorch to 1e-4."""
    embedded, lengths = _inputs(model, batch, width)
    with torch.no_grad():
        expected = model.encode_last(embedded, lengths)
    got = OnnxEncoder(fp32_file, model.state_dict())(embedded, lengths)
    assert got.shape == (batch, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_file_holds_the_graph_only(model, fp32_file):
    """No weight bytes in encoder.onnx: only scalars and shape constants stay (a few hundred bytes)."""
    assert _stored_tensor_bytes(fp32_file) < 0.01 * 4 * _float_weight_values(model)
    assert _stored_tensors(fp32_file) == []
    with pytest.raises(ValueError, match="graph only"):
        OnnxEncoder(fp32_file)
    with pytest.raises(ValueError, match="has no tensor"):
        OnnxEncoder(fp32_file, {k: v for k, v in model.state_dict().items() if "ffn" not in k})


def _pruned(model: SASRec) -> SASRec:
    pruned = prune_structured(model, 0.5)
    apply_masks(pruned, magnitude_masks(pruned, 0.5))
    return pruned


@pytest.mark.parametrize(("kind", "tolerance"), [("fp32", 1e-5), ("fp16", 1e-5), ("bf16", 1e-5), ("pruned", 1e-5),
                                                 # int8 activations (quantized per call) on the same int8 weights
                                                 ("int8", 0.03), ("int4", 0.03)])
def test_a_variant_stores_each_weight_once_and_its_encoder_computes_what_torch_does(model, tmp_path, kind, tolerance):
    """The variant's size on disk grows by the graph only (not a second copy of the Transformer); the encoder
    loads from model.safetensors after the directory is moved; its user vectors are the PyTorch path's."""
    source = _pruned(model) if kind == "pruned" else model
    directory = save_variant(source, tmp_path / kind, kind)
    without = size_on_disk(directory)
    export_variant_encoder(directory)
    graph = (directory / ENCODER_FILE).stat().st_size
    assert size_on_disk(directory) == without + graph
    assert _stored_tensors(directory / ENCODER_FILE) == []
    assert _stored_tensor_bytes(directory / ENCODER_FILE) < 0.02 * (directory / WEIGHTS_FILE).stat().st_size
    if kind in ("int8", "int4"):
        assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger")
                   for n in onnx.load(str(directory / ENCODER_FILE), load_external_data=False).graph.node)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(directory, moved)
    served = load_variant(moved)
    assert isinstance(served.encoder, OnnxEncoder)
    eager = copy.deepcopy(served)
    eager.encoder = None
    generator = torch.Generator().manual_seed(1)
    items = torch.randint(1, model.cfg.n_items + 1, (32, 12), generator=generator)
    lengths = torch.randint(1, 13, (32,), generator=generator)
    with torch.no_grad():
        got, expected = served.last_hidden(items, lengths), eager.last_hidden(items, lengths)
    relative = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max()
    assert relative < tolerance


def test_int8_encoder_of_a_plain_model_keeps_its_own_int8_weights_and_is_close(model, tmp_path):
    """Without the model's int8 tensors (a plain fp32 model, as the benchmark exports it) the quantizer's int8
    weights stay in the file, a quarter of the fp32 bytes; the floats (biases, norms) are still left out."""
    path = export_encoder(model, tmp_path / ENCODER_FILE, int8=True)
    assert 0 < _stored_tensor_bytes(path) < 0.4 * 4 * _float_weight_values(model)
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    assert any(node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for node in nodes)
    embedded, lengths = _inputs(model, 32, 12)
    with torch.no_grad():
        expected = model.encode_last(embedded, lengths)
    got = OnnxEncoder(path, model.state_dict())(embedded, lengths)
    # int8 weights and activations: close, not equal (relative error of the user vectors, measured ~1%)
    relative = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max()
    assert 0 < relative < 0.05


def test_the_session_follows_the_torch_thread_count(model, fp32_file):
    embedded, lengths = _inputs(model, 3, 12)
    before = torch.get_num_threads()
    encoder = OnnxEncoder(fp32_file, model.state_dict())
    try:
        torch.set_num_threads(1)
        one = encoder(embedded, lengths)
        assert encoder.threads == 1
        torch.set_num_threads(2)
        torch.testing.assert_close(encoder(embedded, lengths), one)
        assert encoder.threads == 2
    finally:
        torch.set_num_threads(before)
    assert copy.deepcopy(encoder) is encoder  # copies of a model share the immutable session


def test_a_capped_encoder_has_its_own_session_of_at_most_that_many_threads(model, fp32_file):
    embedded, lengths = _inputs(model, 3, 12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        encoder = OnnxEncoder(fp32_file, model.state_dict())
        capped = encoder.capped(1)
        torch.testing.assert_close(capped(embedded, lengths), encoder(embedded, lengths))
        assert (capped.threads, encoder.threads) == (1, 2)
        torch.set_num_threads(1)
        capped(embedded, lengths)
        assert capped.threads == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="max_threads"):
        OnnxEncoder(fp32_file, model.state_dict(), max_threads=0)
    with pytest.raises(ValueError, match="max_threads"):
        capped.capped(0)


def test_missing_and_bad_files_fail_clearly(tmp_path, monkeypatch, fp32_file, model):
    with pytest.raises(FileNotFoundError, match="no ONNX encoder"):
        OnnxEncoder(tmp_path / ENCODER_FILE)
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="not a loadable ONNX encoder"):
        OnnxEncoder(tmp_path / "garbage.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    other = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="expected \\('embedded', 'lengths'\\)"):
        OnnxEncoder(tmp_path / "other.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ImportError, match="needs onnxruntime"):
        OnnxEncoder(fp32_file, model.state_dict())


def test_a_variant_directory_with_an_encoder_is_served_through_it(model, tmp_path):
    directory = save_variant(model, tmp_path / "fp32", "fp32")
    histories = [[1, 2, 3], [5] * 12, list(range(1, 30)), [7]]
    eager_items, eager_scores = Recommender.load(directory).recommend(histories, k=10)
    assert load_variant(directory).encoder is None
    export_encoder(load_variant(directory), directory / ENCODER_FILE)
    loaded = load_variant(directory)
    assert isinstance(loaded.encoder, OnnxEncoder) and loaded.encoder.max_threads is None  # every batch: torch's threads
    items, scores = Recommender.load(directory).recommend(histories, k=10)
    torch.testing.assert_close(scores, eager_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(items, eager_items)
    (directory / ENCODER_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a loadable ONNX encoder"):
        load_variant(directory)


def test_runtime_auto_runs_onnx_up_to_its_batch_and_torch_above_with_the_same_results(model, fp32_file, tmp_path):
    """variant.json's encoder_max_batch (compress.runtime auto): batches up to it on the encoder, larger ones
    on encode_last; a user gets the same vector (1e-4) and the same top-10 either way."""
    directory = save_variant(model, tmp_path / "fp32", "fp32", extra={ENCODER_MAX_BATCH_KEY: 3})
    shutil.copy(fp32_file, directory / ENCODER_FILE)  # the model's own graph (its weights are the fp32 variant's)
    auto = load_variant(directory)
    assert auto.encoder_max_batch == 3
    assert auto.encoder.max_threads == SMALL_BATCH_ENCODER_THREADS  # small batches only: a session of one thread
    assert [auto.runtime_for(b) for b in (1, 3, 4, 256)] == ["onnx", "onnx", "torch", "torch"]
    assert auto.runtime_for(1, "cuda") == "torch"
    calls = []
    encoder = auto.encoder
    auto.encoder = lambda embedded, lengths: calls.append(len(lengths)) or encoder(embedded, lengths)
    histories = [[1, 2, 3], [5] * 12, list(range(1, 30)), [7], [9, 8, 7, 6], list(range(60, 40, -1)), [2, 2], [59]]
    recommender = Recommender(auto)
    small = [recommender.recommend(histories[i:i + 3], k=10) for i in range(0, len(histories), 3)]
    assert calls == [3, 3, 2]
    large_items, large_scores = recommender.recommend(histories, k=10)
    assert calls == [3, 3, 2]  # 8 users: PyTorch
    torch.testing.assert_close(torch.cat([s for _, s in small]), large_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.cat([i for i, _ in small]), large_items)
    inputs = [torch.tensor([h[-12:] + [0] * (12 - len(h[-12:])) for h in histories]), torch.tensor([min(len(h), 12) for h in histories])]
    with torch.no_grad():
        torch.testing.assert_close(encoder(auto.embed(inputs[0]), inputs[1]), auto.last_hidden(*inputs), atol=1e-4, rtol=1e-4)
    assert load_variant(save_variant(model, tmp_path / "onnx", "fp32")).encoder_max_batch is None  # runtime onnx: every batch
