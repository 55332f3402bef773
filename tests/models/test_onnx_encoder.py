import copy
import sys

import onnx
import pytest
import torch

from pipeline.models.onnx_encoder import ENCODER_FILE, OnnxEncoder, export_encoder
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import SASRec, SASRecConfig
from pipeline.models.variants import load_variant, save_variant


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


def _weight_bytes(path) -> int:
    """Bytes of the graph's stored tensors (a tiny model's file is mostly graph, not weights)."""
    return sum(len(i.raw_data) or 4 * len(i.float_data) for i in onnx.load(str(path)).graph.initializer)


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
    got = OnnxEncoder(fp32_file)(embedded, lengths)
    assert got.shape == (batch, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_stored_half_and_computed_as_eager_does(model, fp32_file, tmp_path, dtype):
    rounded = copy.deepcopy(model)
    rounded.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    path = export_encoder(rounded, tmp_path / ENCODER_FILE, stored_dtype=dtype)
    assert _weight_bytes(path) < 0.55 * _weight_bytes(fp32_file)
    assert {i.data_type for i in onnx.load(str(path)).graph.initializer if len(i.dims) >= 2} == {
        {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]}
    embedded, lengths = _inputs(rounded, 6, 12)
    with torch.no_grad():
        expected = rounded.encode_last(embedded, lengths)
    torch.testing.assert_close(OnnxEncoder(path)(embedded, lengths), expected, atol=1e-4, rtol=1e-4)


def test_int8_encoder_is_smaller_and_close(model, fp32_file, tmp_path):
    path = export_encoder(model, tmp_path / ENCODER_FILE, int8=True)
    assert _weight_bytes(path) < 0.4 * _weight_bytes(fp32_file)
    assert any(node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for node in onnx.load(str(path)).graph.node)
    embedded, lengths = _inputs(model, 32, 12)
    with torch.no_grad():
        expected = model.encode_last(embedded, lengths)
    got = OnnxEncoder(path)(embedded, lengths)
    # int8 weights and activations: close, not equal (relative error of the user vectors, measured ~1%)
    relative = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max()
    assert 0 < relative < 0.05
    with pytest.raises(ValueError, match="int8"):
        export_encoder(model, tmp_path / "x.onnx", int8=True, stored_dtype=torch.float16)


def test_the_session_follows_the_torch_thread_count(model, fp32_file):
    embedded, lengths = _inputs(model, 3, 12)
    before = torch.get_num_threads()
    encoder = OnnxEncoder(fp32_file)
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


def test_missing_and_bad_files_fail_clearly(tmp_path, monkeypatch, fp32_file):
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
        OnnxEncoder(fp32_file)


def test_a_variant_directory_with_an_encoder_is_served_through_it(model, tmp_path):
    directory = save_variant(model, tmp_path / "fp32", "fp32")
    histories = [[1, 2, 3], [5] * 12, list(range(1, 30)), [7]]
    eager_items, eager_scores = Recommender.load(directory).recommend(histories, k=10)
    assert load_variant(directory).encoder is None
    export_encoder(load_variant(directory), directory / ENCODER_FILE)
    loaded = load_variant(directory)
    assert isinstance(loaded.encoder, OnnxEncoder)
    items, scores = Recommender.load(directory).recommend(histories, k=10)
    torch.testing.assert_close(scores, eager_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(items, eager_items)
    (directory / ENCODER_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a loadable ONNX encoder"):
        load_variant(directory)
