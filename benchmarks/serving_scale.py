"""Exact top-K at catalogue scale: our scorers against FAISS, batch 1 and batch 256, 10k to 1M items.

No trained model has a million items, so the item tables are synthetic and "realistically shaped"
(`synthetic_table`, seeded): rank-16 structure plus noise, with row norms growing with a Zipf
popularity (popular items score higher for everyone, as in trained SASRec tables), d = 64 (the
`small` preset), row 0 the zero padding row. User vectors come from the same low-rank structure
plus noise; each user has 50 seen items (drawn by popularity) that every scorer must exclude.

Scorers, per catalogue, in one process on the same tables and users:
- ours: `dense_top_k` (fp32), `rowwise_int8_top_k` (row-wise int8 table), `pq_top_k` (PQ codes,
  m = 8 and m = 4 sub-spaces of K = 256 codes, the lookup tables computed per request), full scan
  and pruned (`pq_postings` inverted lists, built once; the pruned search serves up to 2 users
  per call, so its batch-256 row is the full scan);
- FAISS `IndexFlatIP` (exact) on the fp32 table and on the PQ m=8 reconstructed table (the exact
  peer of our PQ scorer); FAISS's flat search cannot skip rows, so it returns k + 51 and padding
  and seen rows are filtered out afterwards (included in its time);
- FAISS `IndexIVFPQ` (approximate, m = 8, codes of the vectors themselves, nprobe 32 of
  sqrt(n) lists) and `IndexHNSWFlat` (M = 32, efSearch = 64; up to --hnsw-max items, its build
  takes minutes at 1M), with recall@10 against the exact fp32 top-10;
- end to end through `Recommender` (SASRec small: Transformer over 50-item histories + scoring)
  with the benchmark table as item table, fp32 and int8 (`QuantizedTableSASRec`).

recall@10 is measured against the fp32 exact top-10 for every scorer (int8 and PQ rank their own
compressed tables exactly, so theirs is the quality cost of the compression). Latency: batch 1 is
one user per call, rounds interleaving the scorers, p50/p99 over all calls; batch 256 is medians
of a few calls (--repeats-256, fewer at 1M). users/s = users per call / p50 time.

    python benchmarks/serving_scale.py                     # 10k, 100k, 1M; 2 threads
    python benchmarks/serving_scale.py --sizes 10000 --threads 1

Writes benchmarks/results/serving-scale.{json,md} (gitignored) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models.quantize import quantize_rowwise  # noqa: E402
from pipeline.models.recommender import Recommender  # noqa: E402
from pipeline.models.sasrec import build_sasrec  # noqa: E402
from pipeline.models.scoring import (  # noqa: E402
    PQ_PRUNED_MAX_USERS,
    Exclusion,
    dense_top_k,
    pq_postings,
    pq_top_k,
    rowwise_int8_top_k,
)
from pipeline.models.variants import QuantizedTableSASRec  # noqa: E402

logger = logging.getLogger("serving_scale")
DIM, RANK, K, SEEN, CODES = 64, 16, 10, 50, 256
BATCH = 256
SETTLE_S = 0.1
IVF_PROBES = 32


def synthetic_table(n_items: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(n_items + 1, DIM) float32 table, its item popularity and the low-rank basis users share."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((RANK, DIM)).astype(np.float32) / np.sqrt(RANK)
    rows = rng.standard_normal((n_items, RANK)).astype(np.float32) @ basis
    rows += 0.5 * rng.standard_normal((n_items, DIM)).astype(np.float32) / np.sqrt(DIM) * np.linalg.norm(rows, axis=1).mean()
    popularity = 1.0 / rng.permutation(np.arange(1, n_items + 1)).astype(np.float64)  # Zipf(1), order shuffled
    log_pop = np.log(popularity)
    norms = 0.5 + 1.5 * (log_pop - log_pop.min()) / (log_pop.max() - log_pop.min())  # 0.5 (tail) .. 2 (head)
    rows *= (0.1 * norms / np.linalg.norm(rows, axis=1)).astype(np.float32)[:, None]
    table = np.vstack([np.zeros((1, DIM), np.float32), rows]).astype(np.float32)
    return torch.from_numpy(table), popularity / popularity.sum(), basis.astype(np.float32)


def users(basis: np.ndarray, popularity: np.ndarray, n_users: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n_users, RANK)).astype(np.float32) @ basis * 3
    hidden += rng.standard_normal((n_users, DIM)).astype(np.float32) * 0.3
    seen = [(rng.choice(len(popularity), SEEN, replace=False, p=popularity) + 1).tolist() for _ in range(n_users)]
    return torch.from_numpy(hidden.astype(np.float32)), seen


def pq_codes(table: torch.Tensor, n_sub: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (n_rows, m) and codebooks (m, K, d / m) from FAISS k-means per sub-space.
    Stand-in for pipeline/models/codes.py's `assign_codes` (another branch): replace it here only."""
    x = table[1:].numpy()
    quantizer = faiss.ProductQuantizer(DIM, n_sub, 8)
    quantizer.verbose = False
    sample = np.random.default_rng(seed).choice(len(x), min(len(x), 64 * CODES), replace=False)
    quantizer.train(np.ascontiguousarray(x[sample]))
    codes = np.vstack([np.zeros((1, n_sub), np.uint8), quantizer.compute_codes(x)])
    codebooks = faiss.vector_to_array(quantizer.centroids).reshape(n_sub, CODES, DIM // n_sub)
    return torch.from_numpy(codes), torch.from_numpy(codebooks.astype(np.float32))


def lookup_tables(hidden: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(B, m, K): LUT[b, j, c] = hidden[b, j-th slice] . codebooks[j, c]."""
    n_sub = codebooks.shape[0]
    return torch.einsum("bjs,jks->bjk", hidden.view(hidden.shape[0], n_sub, -1), codebooks)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    return torch.cat([codebooks[j][codes[:, j].long()] for j in range(codes.shape[1])], dim=1)


def faiss_search(index: faiss.Index, hidden: torch.Tensor, seen: list[list[int]]) -> np.ndarray:
    """FAISS top-(k + 51), then padding and seen rows dropped: the first K left per user."""
    _, found = index.search(hidden.numpy(), K + SEEN + 1)
    top = np.zeros((len(seen), K), np.int64)
    for user, (row, excluded) in enumerate(zip(found, seen)):
        skip = {0, *excluded}
        kept = [r for r in row if r not in skip and r >= 0][:K]
        top[user, : len(kept)] = kept
    return top


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), exact.tolist())]))


def timed(calls: dict[str, Callable[[int], object]], n_requests: int, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call; scorers interleaved round by round so shared-machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: numba compiles (or loads its cache), FAISS allocates
        call(0)
    per_round = max(1, n_requests // rounds)
    for round_index in range(rounds):
        for name, call in calls.items():
            # An OpenMP team (torch's, FAISS's) spins for milliseconds after its last parallel region;
            # the pause keeps one scorer's spinning threads from slowing the next scorer's calls.
            time.sleep(SETTLE_S)
            for request in range(round_index * per_round, (round_index + 1) * per_round):
                started = time.perf_counter()
                call(request)
                times[name].append((time.perf_counter() - started) * 1000)
    return times


def summary(times: list[float], batch: int) -> dict:
    p50 = float(np.percentile(times, 50))
    return {"p50_ms": p50, "p99_ms": float(np.percentile(times, 99)), "users_per_s": batch * 1000 / p50, "calls": len(times)}


def build_faiss(table: torch.Tensor, pq8_table: torch.Tensor, n_items: int, hnsw_max: int) -> dict[str, tuple[faiss.Index, float]]:
    indexes: dict[str, tuple[faiss.Index, float]] = {}
    for name, vectors in (("faiss flat fp32", table), ("faiss flat PQ8-reconstructed", pq8_table)):
        index = faiss.IndexFlatIP(DIM)
        index.add(vectors.numpy())
        indexes[name] = (index, 0.0)
    started = time.perf_counter()
    n_lists = int(np.sqrt(n_items))
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, n_lists, 8, 8, faiss.METRIC_INNER_PRODUCT)
    # Residual codes with inner product gave recall@10 0.017 at nprobe 16 (0.008 with every list
    # probed) on the 10k table; the vectors' own codes give 0.42 (0.52 with every list).
    ivf.by_residual = False
    ivf.train(table[np.random.default_rng(0).choice(len(table), min(len(table), 64 * n_lists), replace=False)].numpy())
    ivf.add(table.numpy())
    ivf.nprobe = IVF_PROBES
    indexes[f"faiss IVFPQ m8 nlist{n_lists} nprobe{IVF_PROBES} (approx)"] = (ivf, time.perf_counter() - started)
    if n_items <= hnsw_max:
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 64
        hnsw.add(table.numpy())
        indexes["faiss HNSW M32 ef64 (approx)"] = (hnsw, time.perf_counter() - started)
    return indexes


def recommenders(table: torch.Tensor, seed: int) -> dict[str, Recommender]:
    """SASRec small with the benchmark table as item table: fp32 and row-wise int8."""
    torch.manual_seed(seed)
    model = build_sasrec(table.shape[0] - 1, "small", dropout=0.0)
    with torch.no_grad():
        model.item_embedding.weight.copy_(table)
    int8 = QuantizedTableSASRec(model.cfg, quantize_rowwise(table, 8))
    int8.load_state_dict({k: v for k, v in model.state_dict().items() if k != "item_embedding.weight"})
    return {"end-to-end SASRec fp32": Recommender(model), "end-to-end SASRec int8 table": Recommender(int8)}


def run_catalogue(n_items: int, args: argparse.Namespace) -> list[dict]:
    started = time.perf_counter()
    table, popularity, basis = synthetic_table(n_items, args.seed)
    n_users = max(args.requests, BATCH)
    hidden, seen = users(basis, popularity, n_users, args.seed + 1)
    quantized = quantize_rowwise(table, 8)
    pq = {n_sub: pq_codes(table, n_sub, args.seed) for n_sub in (8, 4)}
    pq_postings(pq[8][0][:1000])  # loads numba's compiled kernel first: the build time is the build's
    postings_started = time.perf_counter()
    postings = {n_sub: pq_postings(codes) for n_sub, (codes, _) in pq.items()}
    postings_seconds = (time.perf_counter() - postings_started) / len(pq)
    pq8_table = reconstruct(*pq[8])
    indexes = build_faiss(table, pq8_table, n_items, args.hnsw_max)
    recs = recommenders(table, args.seed)
    histories = seen  # the end-to-end runs see the seen items as histories (and exclude them, as the scorers do)
    logger.info("%d items: tables, codes and indexes built in %.1f s", n_items, time.perf_counter() - started)

    def scorers(batch: int) -> dict[str, Callable[[int], np.ndarray]]:
        def users_of(request: int) -> slice:
            start = (request * batch) % (n_users - batch + 1)
            return slice(start, start + batch)

        calls: dict[str, Callable[[int], np.ndarray]] = {
            "ours dense fp32": lambda r: dense_top_k(hidden[users_of(r)], table, K, seen[users_of(r)])[0].numpy(),
            "ours int8": lambda r: rowwise_int8_top_k(hidden[users_of(r)], quantized, K, seen[users_of(r)])[0].numpy(),
        }
        for n_sub, (codes, books) in pq.items():
            calls[f"ours PQ m{n_sub}"] = (lambda r, codes=codes, books=books: pq_top_k(
                lookup_tables(hidden[users_of(r)], books), codes, K, seen[users_of(r)])[0].numpy())
            if batch <= PQ_PRUNED_MAX_USERS:
                calls[f"ours PQ m{n_sub} pruned"] = (lambda r, codes=codes, books=books, n_sub=n_sub: pq_top_k(
                    lookup_tables(hidden[users_of(r)], books), codes, K, seen[users_of(r)], postings=postings[n_sub])[0].numpy())
        for name, (index, _) in indexes.items():
            calls[name] = lambda r, index=index: faiss_search(index, hidden[users_of(r)], seen[users_of(r)])
        for name, rec in recs.items():
            calls[name] = lambda r, rec=rec: rec.recommend(histories[users_of(r)], K)[0].numpy()
        return calls

    memory = {"ours dense fp32": table.nbytes, "ours int8": quantized.nbytes, "faiss flat fp32": table.nbytes,
              "faiss flat PQ8-reconstructed": pq8_table.nbytes}
    for n_sub, (codes, books) in pq.items():
        memory[f"ours PQ m{n_sub}"] = codes.nbytes + books.nbytes
        memory[f"ours PQ m{n_sub} pruned"] = codes.nbytes + books.nbytes + postings[n_sub].nbytes
    exact = dense_top_k(hidden[:BATCH], table, K, Exclusion.from_lists(seen[:BATCH]))[0].numpy()
    rows = []
    for batch, n_requests, rounds in ((1, args.requests, 5), (BATCH, args.repeats_256 if n_items < 1_000_000 else args.repeats_256_1m, 1)):
        calls = scorers(batch)
        times = timed(calls, n_requests, rounds)
        for name in calls:
            # recall on the first BATCH users, from the batch-256 call (the same top-K as 256 single calls)
            quality = None
            if "end-to-end" not in name:
                found = scorers(BATCH)[name](0) if "pruned" not in name else np.vstack([calls[name](r) for r in range(BATCH)])
                quality = recall(found, exact)
            rows.append({"items": n_items, "batch": batch, "scorer": name, **summary(times[name], batch), "recall@10": quality,
                         "build_s": indexes[name][1] if name in indexes else postings_seconds if "pruned" in name else None,
                         "bytes_per_item": memory.get(name, 0) / n_items or None})
            logger.info("%s", rows[-1])
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| items | batch | scorer | p50 ms | p99 ms | users/s | recall@10 vs fp32 exact | bytes/item | build s |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        recall_text = "" if r["recall@10"] is None else f"{r['recall@10']:.3f}"
        build = "" if not r["build_s"] else f"{r['build_s']:.1f}"
        size = "" if not r["bytes_per_item"] else f"{r['bytes_per_item']:.0f}"
        lines.append(f"| {r['items']:,} | {r['batch']} | {r['scorer']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['users_per_s']:,.0f} | {recall_text} | {size} | {build} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=100, help="batch-1 calls per scorer (p99 needs >= 100)")
    parser.add_argument("--repeats-256", type=int, default=5, help="batch-256 calls per scorer below 1M items")
    parser.add_argument("--repeats-256-1m", type=int, default=3, help="batch-256 calls per scorer at 1M items")
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest catalogue to build HNSW for (minutes at 1M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    rows = [row for n_items in args.sizes for row in run_catalogue(n_items, args)]
    machine = {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
               "threads": args.threads, "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "args": vars(args), "seconds": time.perf_counter() - started, "rows": rows}
    (out / "serving-scale.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "serving-scale.md").write_text(markdown(rows) + "\n", encoding="utf-8")
    sys.stdout.write(f"\n{machine}\n\n{markdown(rows)}\n")


if __name__ == "__main__":
    main()
