"""The compress stage and the compression report on a tiny trained teacher."""

import json
import re
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from pipeline.compression.compress import (
    ENCODER_FORMAT,
    compress_variant,
    fine_tune_loss,
    pq_codebook_size,
    run_compress,
    variant_fingerprint,
)
from pipeline.compression.distill import build_student, distillation_loss
from pipeline.compression.pruning import magnitude_masks, prune_structured
from pipeline.core.config import params_from_dict
from pipeline.core.errors import CompressError
from pipeline.data.sequences import evaluation_batches, load_sequences, training_batches
from pipeline.evaluation.compression_report import REPORT_JSON, REPORT_PNG, run_compression_report, runtime_columns
from pipeline.evaluation.metrics import evaluate
from pipeline.models.coded import CodedSASRec
from pipeline.models.onnx_encoder import ENCODER_FILE, OnnxEncoder, weight_entries
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import WEIGHTS_FILE, SASRec, SASRecConfig, load_model, save_model
from pipeline.models.sparse import densify_state, sparsify_state
from pipeline.models.variants import VARIANT_FILE, load_variant, save_variant, size_on_disk
from pipeline.training.losses import next_item_loss
from pipeline.training.train import run_train
from tests.helpers import build_features, copy_features

TINY_TRAIN = ["train.d_model=32", "train.n_heads=2", "train.n_layers=2", "train.max_len=20", "train.epochs=6",
              "train.num_threads=1", "train.baselines=[]"]
TINY_COMPRESS = ["compress.runtime=onnx", "compress.variants=[fp32,fp16,bf16,int8,int4,pruned,distilled,lowrank,distilled+int8,pq,pq+int8]",
                 "compress.lowrank.finetune_epochs=0",
                 "compress.distill.d_model=16", "compress.distill.epochs=6", "compress.lowrank.rank=16",
                 "compress.pruning.finetune_epochs=2", "compress.latency_requests=20", "compress.throughput_batch_size=64",
                 "compress.pq.n_subspaces=4", "compress.pq.codebook_size=32", "compress.pq.finetune_epochs=3"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny teacher trained with MLflow tracking, every variant built, and the report written.

    About a minute to build on 2 cores, so the tests using it are slow: CI runs them, the fast loop
    keeps this module's unit tests."""
    root = tmp_path_factory.mktemp("compress")
    layout = build_features(root)
    params = params_from_dict({}, [*TINY_TRAIN, *TINY_COMPRESS, f"tracking.tracking_uri=sqlite:///{root}/mlflow.db"])
    train = run_train(params.train, params.tracking, layout, seed=0)
    built = run_compress(params.compress, layout, "main", seed=0)
    report = run_compression_report(params.compress, params.evaluate, params.train, params.tracking, layout, seed=0)
    data = load_sequences(layout.features_dir)
    batch = next(evaluation_batches(data, "test", 10_000, 20))
    histories = [row[: int(n)].tolist() for row, n in zip(batch.inputs, batch.lengths)]
    return {"layout": layout, "params": params, "built": built, "report": report, "histories": histories,
            "train_run_id": train.mlflow_run_id, "teacher": load_model(layout.model_dir("main"))}


def _overlap_at_10(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (10 * len(a))


@pytest.mark.parametrize(
    ("name", "min_overlap"),
    # A little under what each reaches on this teacher (measured on the merged branches: see the test's last run);
    # a broken variant falls far below.
    [("fp32", 0.999), ("fp16", 0.98), ("bf16", 0.95), ("int8", 0.95), ("int4", 0.85), ("lowrank", 0.9),
     ("pruned", 0.4), ("distilled", 0.3), ("distilled+int8", 0.3), ("pq", 0.6), ("pq+int8", 0.6)],
)
@pytest.mark.slow
def test_every_variant_loads_and_agrees_with_the_teacher(compressed, name, min_overlap):
    teacher = Recommender(compressed["teacher"])
    variant = Recommender.load(compressed["built"][name]["path"])
    histories = compressed["histories"]
    top_teacher, _ = teacher.recommend(histories, 10)
    top_variant, _ = variant.recommend(histories, 10)
    assert top_variant.shape == (len(histories), 10)
    assert _overlap_at_10(top_teacher, top_variant) >= min_overlap


@pytest.mark.slow
def test_report_sizes_are_the_files_on_disk(compressed):
    layout, report = compressed["layout"], compressed["report"]
    on_disk = json.loads((layout.reports_dir / REPORT_JSON).read_text())
    assert set(on_disk["models"]) == {"teacher", *compressed["params"].compress.variants}
    for row in on_disk["models"].values():
        directory = layout.root / row["path"]
        assert row["size_bytes"] == size_on_disk(directory) == sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        assert row["size_ratio"] == pytest.approx(on_disk["models"]["teacher"]["size_bytes"] / row["size_bytes"])
        assert row["latency_p50_ms"] > 0 and row["throughput_users_s"] > 0 and row["bytes_per_item"] > 0
    assert report["models"]["teacher"]["bytes_per_item"] == 32 * 4  # fp32 rows of d_model=32
    assert report["models"]["int8"]["bytes_per_item"] == 32 + 8  # int8 codes + fp32 scale and offset
    assert report["models"]["int4"]["bytes_per_item"] == 16 + 8  # two codes per byte
    # item codes: one byte per item and sub-space (4 of 8 dims each) plus the codebooks, fp32, or int8 with an
    # fp32 scale and offset per (sub-space, dimension)
    rows = compressed["teacher"].cfg.n_items + 1
    assert report["models"]["pq"]["bytes_per_item"] * rows == pytest.approx(rows * 4 + 4 * 32 * 8 * 4)
    assert report["models"]["pq+int8"]["bytes_per_item"] * rows == pytest.approx(rows * 4 + 4 * 32 * 8 + 4 * 8 * 2 * 4)
    assert (layout.reports_dir / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| distilled+int8 |" in (layout.reports_dir / "compression.md").read_text()


@pytest.mark.slow
def test_quantized_and_distilled_variants_are_smaller(compressed):
    root, rows = compressed["layout"].root, compressed["report"]["models"]

    def weights(name: str) -> int:  # the stored model, without the ONNX encoder beside it
        return (root / rows[name]["path"] / WEIGHTS_FILE).stat().st_size

    assert weights("fp16") < 0.55 * weights("teacher")
    assert weights("int8") < weights("fp16")
    assert weights("int4") < weights("int8")
    assert weights("distilled+int8") < weights("distilled") < weights("fp32")
    # each encoder.onnx is the graph only: its weights are the variant's model.safetensors, stored once
    for name in rows:
        if name != "teacher":
            path = root / rows[name]["path"] / ENCODER_FILE
            stored = onnx.load(str(path), load_external_data=False).graph.initializer
            assert sum(len(i.raw_data) + 4 * len(i.float_data) for i in stored) < 1024, name
        assert rows[name]["size_bytes"] == size_on_disk(root / rows[name]["path"])  # the encoder counts


@pytest.mark.parametrize(("name", "min_overlap"), [("fp32", 0.999), ("fp16", 0.999), ("bf16", 0.999), ("pruned", 0.999),
                                                   ("lowrank", 0.999), ("distilled", 0.999),
                                                   # int8 MatMuls in ONNX Runtime vs torchao's int8 weights in fp32
                                                   # (measured on this teacher: int8 0.9986, int4 0.9983,
                                                   # distilled+int8 0.9993; the fp32 graphs 1.0)
                                                   ("int8", 0.95), ("int4", 0.95), ("distilled+int8", 0.95)])
@pytest.mark.slow
def test_each_variant_is_served_through_its_onnx_encoder(compressed, name, min_overlap):
    """runtime onnx: every variant has encoder.onnx, used on CPU, computing what its PyTorch path computes."""
    directory = compressed["layout"].root / compressed["report"]["models"][name]["path"]
    assert compressed["report"]["models"][name]["runtime"] == "onnx"
    onnx_model = load_variant(directory)
    assert isinstance(onnx_model.encoder, OnnxEncoder)
    eager_model = load_variant(directory)
    eager_model.encoder = None
    histories = compressed["histories"]
    onnx_items, onnx_scores = Recommender(onnx_model).recommend(histories, 10)
    eager_items, eager_scores = Recommender(eager_model).recommend(histories, 10)
    assert _overlap_at_10(onnx_items, eager_items) >= min_overlap
    if min_overlap > 0.99:  # fp32 graphs: the same scores to 1e-4
        torch.testing.assert_close(onnx_scores, eager_scores, atol=1e-4, rtol=1e-4)
    assert compressed["report"]["models"]["teacher"]["runtime"] == "torch"


@pytest.mark.slow
def test_runtime_torch_builds_no_encoder(compressed, tmp_path):
    layout = copy_features(compressed["layout"], tmp_path)
    shutil.copytree(compressed["layout"].model_dir("main"), layout.model_dir("main"), ignore=shutil.ignore_patterns("variants"))
    torch_only = params_from_dict({}, [*TINY_COMPRESS, "compress.runtime=torch"]).compress
    built = compress_variant(torch_only, layout, "main", "fp16", seed=0)
    assert not (Path(built["path"]) / ENCODER_FILE).exists()
    assert load_variant(Path(built["path"])).encoder is None


@pytest.mark.slow
def test_a_changed_settings_section_rebuilds_only_the_variants_that_read_it(compressed, tmp_path):
    source = compressed["layout"]
    layout = copy_features(source, tmp_path)
    shutil.copytree(source.model_dir("main"), layout.model_dir("main"), ignore=shutil.ignore_patterns("checkpoints"))
    names = ["fp16", "pruned", "distilled", "distilled+int8"]
    variants = layout.model_dir("main") / "variants"
    before = {name: (variants / name / VARIANT_FILE).stat().st_mtime_ns for name in names}
    same = params_from_dict({}, [*TINY_COMPRESS, f"compress.variants=[{','.join(names)}]"]).compress
    assert all(result.get("kept") for result in run_compress(same, layout, "main", seed=0).values())
    longer = params_from_dict({}, [*TINY_COMPRESS, f"compress.variants=[{','.join(names)}]",
                                   "compress.distill.epochs=7"]).compress
    rebuilt = run_compress(longer, layout, "main", seed=0)
    assert {name for name, result in rebuilt.items() if result.get("kept")} == {"fp16", "pruned"}
    assert all((variants / name / VARIANT_FILE).stat().st_mtime_ns == before[name] for name in ("fp16", "pruned"))
    student = json.loads((variants / "distilled" / VARIANT_FILE).read_text())
    assert student["student"]["epochs"] == 7
    assert json.loads((variants / "distilled+int8" / VARIANT_FILE).read_text())["reused"].endswith("distilled")
    assert not compress_variant(longer, layout, "main", "fp16", seed=1).get("kept")  # a new seed: a new variant


@pytest.mark.slow
def test_pruning_really_shrinks_the_saved_model(compressed, tmp_path):
    pruned_dir = compressed["layout"].root / compressed["report"]["models"]["pruned"]["path"]
    model = load_variant(pruned_dir)
    teacher = compressed["teacher"]
    assert model.cfg.n_heads == 1 and model.cfg.hidden_ffn_dim == teacher.cfg.hidden_ffn_dim // 2
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 16, 32)  # one head of 16 kept of two
    dense_dir = save_variant(model, tmp_path / "dense", "fp32")  # the same narrowed weights, stored dense
    teacher_bytes = compressed["report"]["models"]["teacher"]["size_bytes"]
    # narrowing alone drops half the block weights; the bitmask storage then nearly halves the thinned matrices
    assert size_on_disk(dense_dir) < 0.7 * teacher_bytes
    assert (pruned_dir / WEIGHTS_FILE).stat().st_size < 0.65 * (dense_dir / WEIGHTS_FILE).stat().st_size
    variant = json.loads((pruned_dir / VARIANT_FILE).read_text())
    assert variant["measured_sparsity"] >= 0.49  # 50% of the remaining matrices zeroed and kept at zero by fine-tuning


def test_structured_pruning_keeps_the_strongest_heads_and_channels():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=20, d_model=16, n_layers=1, n_heads=4, max_len=8)).eval()
    with torch.no_grad():  # make head 2 and FFN channel 5 dominant; everything else tiny
        for p in model.blocks.parameters():
            p.mul_(0.01)
        qkv = model.blocks[0].attn.qkv.weight.view(3, 4, 4, 16)
        qkv[:, 2] = 1.0
        model.blocks[0].ffn[0].weight[5] = 1.0
        model.blocks[0].ffn[2].weight[:, 5] = 1.0
    pruned = prune_structured(model, 0.75)
    assert pruned.cfg.n_heads == 1 and pruned.cfg.ffn_dim == 16
    assert torch.equal(pruned.blocks[0].attn.qkv.weight.view(3, 4, 16), model.blocks[0].attn.qkv.weight.view(3, 4, 4, 16)[:, 2])
    assert (pruned.blocks[0].ffn[0].weight == 1.0).all(dim=1).sum() == 1
    items = torch.randint(1, 21, (3, 8))
    assert pruned(items).shape == (3, 8, 16)


def test_sparse_storage_round_trips_exactly():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=30, d_model=16, n_layers=1, n_heads=2, max_len=8))
    masks = magnitude_masks(model, 0.7)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mask in masks.items():
        state[name] *= mask
        assert 0.69 <= 1 - mask.float().mean() <= 0.71
    stored = sparsify_state(state, masks)
    restored = densify_state(stored, {k: v.shape for k, v in state.items()})
    assert all(torch.equal(restored[k], state[k]) for k in state)
    dense_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k in masks)
    sparse_bytes = sum(v.numel() * v.element_size() for k, v in stored.items() if k.split(".__")[0] in masks)
    assert sparse_bytes < 0.35 * dense_bytes  # 30% of values + 1 bit each


def test_distillation_loss_is_zero_for_a_perfect_student_and_positive_otherwise(tmp_path):
    layout = build_features(tmp_path)
    data = load_sequences(layout.features_dir)
    batch = next(training_batches(data, 16, 20, seed=0, epoch=0))
    torch.manual_seed(0)
    teacher = SASRec(SASRecConfig(n_items=data.n_items, d_model=16, n_layers=1, n_heads=1, max_len=20, dropout=0.0)).eval()
    soft_only = distillation_loss(teacher, temperature=2.0, alpha=0.0, top_k=None)
    assert float(soft_only(teacher, batch)[0]) == pytest.approx(0.0, abs=1e-4)
    student = build_student(teacher, d_model=8, n_layers=1, n_heads=1).eval()
    assert float(soft_only(student, batch)[0]) > 0.01
    top_k = distillation_loss(teacher, temperature=2.0, alpha=0.0, top_k=5)
    assert float(top_k(teacher, batch)[0]) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_distilled_student_trains_and_loads(compressed):
    directory = compressed["layout"].root / compressed["report"]["models"]["distilled"]["path"]
    variant = json.loads((directory / VARIANT_FILE).read_text())
    student = load_variant(directory)
    assert (student.cfg.d_model, student.cfg.n_layers) == (16, 1)
    history = variant["history"]
    assert history[0]["epoch"] == -1 and max(r["valid_ndcg10"] for r in history[1:]) > history[0]["valid_ndcg10"]
    # distilled+int8 quantizes the same student instead of training another one
    assert json.loads((directory.parent / "distilled+int8" / VARIANT_FILE).read_text())["reused"].endswith("distilled")


@pytest.mark.slow
def test_variants_are_mlflow_child_runs_of_the_training_run(compressed):
    import mlflow

    report, parent = compressed["report"], compressed["train_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{compressed['layout'].root}/mlflow.db")
    assert report["models"]["teacher"]["mlflow_run_id"] == parent
    for name in compressed["params"].compress.variants:
        run = client.get_run(report["models"][name]["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["leanrec.variant"] == name
        assert run.info.experiment_id == client.get_run(parent).info.experiment_id
        assert run.data.metrics["ndcg_at_10"] == pytest.approx(report["models"][name]["ndcg@10"])
        assert not [v for v in run.data.params.values() if re.fullmatch(r"-?\d+\.\d{7,}", v)], run.data.params  # readable
    # The teacher's figures under the same keys as its variants', so the runs table compares them.
    teacher = client.get_run(parent).data.metrics
    for key in ("ndcg_at_10", "hr_at_10", "size_bytes", "latency_p50_ms"):
        assert teacher[key] == pytest.approx(report["models"]["teacher"][key.replace("_at_", "@")])
    artifacts = [a.path for a in client.list_artifacts(parent, "reports")]
    assert "reports/compression.png" in artifacts


@pytest.mark.slow
def test_rerunning_the_report_updates_the_same_child_runs(compressed):
    c = compressed
    again = run_compression_report(c["params"].compress, c["params"].evaluate, c["params"].train, c["params"].tracking,
                                   c["layout"], seed=0)
    assert {n: r["mlflow_run_id"] for n, r in again["models"].items()} == {n: r["mlflow_run_id"] for n, r in c["report"]["models"].items()}


@pytest.mark.slow
def test_compress_needs_a_teacher_and_a_known_variant(tmp_path, compressed):
    layout = build_features(tmp_path)
    params = compressed["params"]
    with pytest.raises(CompressError, match="no SASRec teacher"):
        compress_variant(params.compress, layout, "main", "int8", seed=0)
    with pytest.raises(CompressError, match="unknown variant"):
        compress_variant(params.compress, compressed["layout"], "main", "int3", seed=0)
    bad_rank = params_from_dict({}, ["compress.lowrank.rank=32"]).compress
    with pytest.raises(CompressError, match="rank=32 must be below"):
        compress_variant(bad_rank, compressed["layout"], "main", "lowrank", seed=0)
    # a failed build leaves the existing variant as it was
    assert (compressed["layout"].model_dir("main") / "variants" / "lowrank" / VARIANT_FILE).exists()


@pytest.mark.slow
def test_pq_fine_tunes_from_the_teachers_codes_and_pq_int8_reuses_it(compressed):
    layout, report = compressed["layout"], compressed["report"]
    directory = layout.root / report["models"]["pq"]["path"]
    variant = json.loads((directory / VARIANT_FILE).read_text())
    assert (variant["kind"], variant["n_subspaces"], variant["codebook_size"]) == ("pq", 4, 32)
    assert 0 < variant["assignment"]["relative_squared_error"] < 1
    history = variant["history"]
    assert history[0]["epoch"] == -1 and max(r["valid_ndcg10"] for r in history[1:]) > history[0]["valid_ndcg10"]
    model = load_variant(directory)
    assert isinstance(model, CodedSASRec)
    # the saved model is the best-validation one
    valid = evaluate(lambda b: model.score(b.inputs, b.lengths), load_sequences(layout.features_dir), "valid", ks=(10,),
                     batch_size=256, max_len=model.cfg.max_len, sampled_strategies=(), seed=0, progress=False)
    assert valid["full/NDCG@10"] == pytest.approx(max(r["valid_ndcg10"] for r in history), abs=1e-6)
    int8 = json.loads((directory.parent / "pq+int8" / VARIANT_FILE).read_text())
    assert int8["kind"] == "pq_int8" and int8["reused"].endswith("pq") and int8["history"] == history
    rows = report["models"]
    assert rows["pq+int8"]["size_bytes"] < rows["pq"]["size_bytes"]
    weights = {name: (layout.root / rows[name]["path"] / WEIGHTS_FILE).stat().st_size for name in ("pq", "teacher")}
    assert weights["pq"] < weights["teacher"]


@pytest.mark.slow
def test_report_counts_codes_and_codebooks_as_parameters(compressed):
    rows, teacher = compressed["report"]["models"], compressed["teacher"]
    n_rows, dim = teacher.item_embedding.weight.shape
    others = sum(p.numel() for p in teacher.parameters()) - n_rows * dim
    assert rows["pq"]["parameters"] == others + n_rows * 4 + 4 * 32 * 8
    # every code counts, zero or not; the padding centroids (one per codebook) and the padding row are zeros
    nonzero_others = rows["teacher"]["nonzero_parameters"] - int((teacher.item_embedding.weight != 0).sum())
    assert rows["pq"]["nonzero_parameters"] == nonzero_others + n_rows * 4 + 4 * 31 * 8


@pytest.mark.slow
def test_pq_codebooks_are_capped_at_the_catalogue(compressed, tmp_path):
    source = compressed["layout"]
    layout = copy_features(source, tmp_path)
    shutil.copytree(source.model_dir("main"), layout.model_dir("main"), ignore=shutil.ignore_patterns("variants", "checkpoints"))
    rows = compressed["teacher"].cfg.n_items + 1
    assert pq_codebook_size(256, rows) == rows and pq_codebook_size(32, rows) == 32
    params = params_from_dict({}, ["compress.pq.n_subspaces=4", "compress.pq.finetune_epochs=0"]).compress
    built = compress_variant(params, layout, "main", "pq", seed=0)
    assert json.loads((Path(built["path"]) / VARIANT_FILE).read_text())["codebook_size"] == rows
    capped = params_from_dict({}, ["compress.pq.n_subspaces=64", "compress.pq.codebook_size=16",
                                   "compress.pq.finetune_epochs=0"]).compress
    built = compress_variant(capped, layout, "main", "pq", seed=0)  # more sub-spaces than the teacher's 32 dimensions
    assert json.loads((Path(built["path"]) / VARIANT_FILE).read_text())["n_subspaces"] == 32
    bad = params_from_dict({}, ["compress.pq.n_subspaces=5"]).compress
    with pytest.raises(CompressError, match="n_subspaces=5 must divide the teacher's d_model=32"):
        compress_variant(bad, layout, "main", "pq", seed=0)


@pytest.mark.slow
def test_fine_tunes_use_the_loss_the_teacher_was_trained_with(compressed, tmp_path, caplog):
    source = compressed["layout"]
    layout = copy_features(source, tmp_path)
    run_dir = layout.model_dir("main")
    shutil.copytree(source.model_dir("main"), run_dir, ignore=shutil.ignore_patterns("variants", "checkpoints"))
    data = load_sequences(layout.features_dir)
    assert fine_tune_loss(run_dir, data) is next_item_loss  # the tiny teacher trained with the full softmax
    recorded = json.loads((run_dir / "train.json").read_text())
    assert recorded["loss_resolved"] == "full_softmax"  # train.loss auto on a tiny catalogue
    recorded["train"].update(loss="sampled_softmax", n_negatives=8)
    recorded["loss_resolved"] = "sampled_softmax"
    (run_dir / "train.json").write_text(json.dumps(recorded))
    sampled = fine_tune_loss(run_dir, data)
    batch = next(training_batches(data, 16, 20, seed=0, epoch=0))
    teacher = compressed["teacher"]
    torch.manual_seed(0)
    value, tokens = sampled(teacher, batch)
    assert tokens == int((batch.targets != 0).sum()) and torch.isfinite(value)
    assert float(value.detach()) < float(next_item_loss(teacher, batch)[0].detach())  # 8 negatives, not the catalogue
    params = params_from_dict({}, ["compress.pq.n_subspaces=4", "compress.pq.codebook_size=32",
                                   "compress.pq.finetune_epochs=1"]).compress
    with caplog.at_level("INFO", logger="pipeline.compression.compress"):
        compress_variant(params, layout, "main", "pq", seed=0)
    assert "fine-tunes use the teacher's loss: sampled_softmax" in caplog.text


def test_compress_refuses_a_teacher_the_current_train_config_did_not_produce(tmp_path):
    """A popularity run after a SASRec run leaves no SASRec behind, and compress never builds variants of a stale model."""
    layout = build_features(tmp_path)
    run_dir = layout.model_dir("main")
    small = ["train.d_model=16", "train.n_heads=1", "train.n_layers=1", "train.max_len=20", "train.num_threads=1",
             "train.baselines=[popularity]", "tracking.enabled=false"]
    sasrec = params_from_dict({}, [*small, "train.epochs=1"])
    run_train(sasrec.train, sasrec.tracking, layout, seed=0)
    int8 = params_from_dict({}, ["compress.variants=[int8]"]).compress
    run_compress(int8, layout, "main", seed=0, train_cfg=sasrec.train)  # its own teacher: built
    assert (run_dir / "variants" / "int8").is_dir()
    teacher = load_model(run_dir)
    longer = params_from_dict({}, [*small, "train.epochs=2", "train.device=cpu"])  # the device does not change the teacher
    with pytest.raises(CompressError, match=r"other train settings than the current ones \(epochs: 1 there, 2 now\)"):
        run_compress(int8, layout, "main", seed=0, train_cfg=longer.train)

    popularity = params_from_dict({}, [*small, "train.model=popularity"])
    run_train(popularity.train, popularity.tracking, layout, seed=0)
    left = {p.name for p in run_dir.iterdir()}
    assert WEIGHTS_FILE not in left and "model_config.json" not in left and "variants" not in left
    assert (run_dir / "baselines" / "popularity.safetensors").exists()
    assert json.loads((run_dir / "train.json").read_text())["train"]["model"] == "popularity"
    with pytest.raises(CompressError, match="no SASRec teacher"):
        run_compress(int8, layout, "main", seed=0, train_cfg=popularity.train)
    save_model(teacher, run_dir)  # a SASRec file beside a popularity run's train.json, as train left it before
    with pytest.raises(CompressError, match="trained train.model=popularity, not a SASRec"):
        compress_variant(int8, layout, "main", "int8", seed=0)
    (run_dir / "train.json").unlink()  # a model no finished train run wrote
    with pytest.raises(CompressError, match="no train.json"):
        compress_variant(int8, layout, "main", "int8", seed=0)


def test_the_fingerprint_names_the_encoder_format_and_the_auto_batch():
    hashes = {"teacher_sha256": "t", "features_sha256": "f"}
    configs = {runtime: params_from_dict({}, [f"compress.runtime={runtime}", "compress.encoder_max_batch=8"]).compress
               for runtime in ("torch", "onnx", "auto")}
    fingerprints = {runtime: variant_fingerprint(cfg, "fp16", hashes, seed=0) for runtime, cfg in configs.items()}
    assert "encoder_format" not in fingerprints["torch"] and "encoder_max_batch" not in fingerprints["onnx"]
    assert fingerprints["onnx"]["encoder_format"] == fingerprints["auto"]["encoder_format"] == ENCODER_FORMAT
    assert fingerprints["auto"]["encoder_max_batch"] == 8


@pytest.mark.slow
def test_an_older_encoder_is_rebuilt_reusing_the_trained_model_and_auto_records_its_batch(compressed, tmp_path):
    """A variant whose fingerprint has no encoder format (built when encoder.onnx held the weights) is rebuilt:
    a graph-only encoder, the student not trained again. runtime auto then records encoder_max_batch, which
    load_variant and the report follow."""
    source = compressed["layout"]
    layout = copy_features(source, tmp_path)
    shutil.copytree(source.model_dir("main"), layout.model_dir("main"), ignore=shutil.ignore_patterns("checkpoints"))
    directory = layout.model_dir("main") / "variants" / "distilled"
    recorded = json.loads((directory / VARIANT_FILE).read_text())
    del recorded["fingerprint"]["encoder_format"]  # what a variant.json of an older build holds
    (directory / VARIANT_FILE).write_text(json.dumps(recorded))
    (directory / ENCODER_FILE).write_bytes(b"an older encoder")  # not loadable today: the rebuild must replace it
    onnx_cfg = params_from_dict({}, TINY_COMPRESS).compress
    rebuilt = compress_variant(onnx_cfg, layout, "main", "distilled", seed=0)
    assert not rebuilt.get("kept") and rebuilt["seconds"] < 30  # rebuilt, but the student was reused, not trained
    after = json.loads((directory / VARIANT_FILE).read_text())
    assert after["fingerprint"]["encoder_format"] == ENCODER_FORMAT and after["history"] == recorded["history"]
    assert weight_entries((directory / ENCODER_FILE).read_bytes())  # graph only: the weights come from the model
    assert compress_variant(onnx_cfg, layout, "main", "distilled", seed=0).get("kept")
    auto_cfg = params_from_dict({}, [*TINY_COMPRESS, "compress.runtime=auto", "compress.encoder_max_batch=4"]).compress
    compress_variant(auto_cfg, layout, "main", "distilled", seed=0)
    model = load_variant(directory)
    assert model.encoder_max_batch == 4 and isinstance(model.encoder, OnnxEncoder)
    assert runtime_columns(model, 64) == {"runtime": "onnx / torch", "runtime_by_batch": {"1": "onnx", "64": "torch"}}
    assert compressed["report"]["models"]["distilled"]["runtime_by_batch"] == {"1": "onnx", "64": "onnx"}
