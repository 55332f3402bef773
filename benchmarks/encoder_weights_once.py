"""An encoder.onnx as stored (graph only, weights supplied from model.safetensors at load) against the
same graph with those weights written inside the file, as encoder.onnx was stored before.

Checks the two give bit-identical user vectors and times both side by side (interleaved rounds, the
order flipped every round; medians of each round's median call), histories of length 50, batch 1
and 256, at each thread count. Prints the file sizes and a Markdown table.

    python benchmarks/encoder_weights_once.py W/models/main/variants/fp32 --threads 1 2 --rounds 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models.onnx_encoder import ENCODER_FILE, OnnxEncoder  # noqa: E402
from pipeline.models.variants import load_variant  # noqa: E402


def embedded_copy(directory: Path, encoder: OnnxEncoder, target: Path) -> Path:
    """The variant's encoder.onnx with the weights `encoder` was given written into the file."""
    import onnx

    weights = encoder.supplied
    proto = onnx.load(str(directory / ENCODER_FILE), load_external_data=False)
    for init in proto.graph.initializer:
        if init.name in weights:
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = weights[init.name].tobytes()
    del proto.metadata_props[:]
    onnx.save(proto, str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a variant directory holding encoder.onnx")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    model = load_variant(args.directory)
    if model.encoder is None:
        parser.error(f"{args.directory} holds no {ENCODER_FILE}")
    with tempfile.TemporaryDirectory() as tmp:
        embedded_path = embedded_copy(args.directory, model.encoder, Path(tmp) / "embedded.onnx")
        sys.stdout.write(f"{ENCODER_FILE}: {(args.directory / ENCODER_FILE).stat().st_size:,} bytes as stored, "
                         f"{embedded_path.stat().st_size:,} with its weights inside\n\n"
                         "| threads | batch | weights inside ms | graph only ms | ratio | load |\n"
                         "| ---: | ---: | ---: | ---: | ---: | ---: |\n")
        generator = torch.Generator().manual_seed(0)
        for threads in args.threads:
            torch.set_num_threads(threads)
            ways = {"inside": OnnxEncoder(embedded_path), "graph-only": model.encoder}
            for batch in (1, 256):
                items = torch.randint(1, model.cfg.n_items + 1, (batch, min(50, model.cfg.max_len)), generator=generator)
                embedded, lengths = model.embed(items).detach(), torch.full((batch,), items.shape[1])
                if not torch.equal(ways["inside"](embedded, lengths), ways["graph-only"](embedded, lengths)):
                    raise SystemExit("the two files compute different user vectors")
                times: dict[str, list[float]] = {name: [] for name in ways}
                for round_index in range(args.rounds):
                    for name in (list(ways) if round_index % 2 else list(ways)[::-1]):
                        calls = []
                        for _ in range(10 if batch == 1 else 2):
                            started = time.perf_counter()
                            ways[name](embedded, lengths)
                            calls.append((time.perf_counter() - started) * 1000)
                        times[name].append(statistics.median(calls))
                inside, graph = statistics.median(times["inside"]), statistics.median(times["graph-only"])
                sys.stdout.write(f"| {threads} | {batch} | {inside:.3f} | {graph:.3f} | {inside / graph:.2f} | "
                                 f"{os.getloadavg()[0]:.2f} |\n")


if __name__ == "__main__":
    main()
