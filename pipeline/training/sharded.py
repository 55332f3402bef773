"""train.embedding_engine=torchrec: SASRec's item table as a row-wise sharded TorchRec embedding.

For a catalogue whose table outgrows one device. Under `torchrun --nproc_per_node N` (Gloo
on CPU, NCCL on GPU) rank r holds rows [r * ceil(V / N), (r + 1) * ceil(V / N)) of the
(V = n_items + 1, d) table and nothing else of it; the Transformer blocks are replicated
and data parallel as before. The training engine (pipeline/training/engine.py) runs the
loop unchanged: `ShardedSASRec` is its model and loss module, and TorchRec's
DistributedModelParallel (which shards the table and wraps the rest in DDP) its step module.

What follows from no rank holding the table:
- the loss is sampled softmax (config.py refuses another): each step looks up, in one
  all-to-all, the rows of the inputs, of the positives and of the negatives shared by the
  batch, and computes the same loss as NextItemLoss from them (losses.sampled_softmax);
- the table is updated inside the backward by FBGEMM's fused Adagrad (TorchRec's "fused"
  kernel) with train.sharded_table_lr; the rest of the model gets the engine's AdamW. TorchRec's "dense"
  kernel, whose gradients the engine's AdamW would step, crashes in fbgemm-gpu-cpu 1.8.0's
  forward, and FBGEMM's CPU kernels have no Adam (SGD and Adagrad variants only). Exact
  Adagrad is torch.optim.Adagrad: a row a step does not look up keeps its value and state;
  it has no weight decay (shard_teacher refuses train.weight_decay > 0);
- validation and the saved model need the whole table: after each epoch every rank sends its
  rows, chunk by chunk, to rank 0's host memory (`gather_table`), where `score` and
  `to_sasrec` use them. The device memory of each rank holds 1/N of the table and of its
  Adagrad state throughout.
Not supported yet: resuming from a checkpoint (the engine's checkpoint is rank 0's state) and
fp16 (the fused update bypasses the GradScaler); shard_teacher refuses both.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.config import TrainConfig
from pipeline.core.errors import TrainError
from pipeline.models.sasrec import PADDING_INDEX, SASRec, SASRecConfig
from pipeline.training.distributed import Dist
from pipeline.training.losses import sampled_softmax

logger = logging.getLogger(__name__)

FEATURE = "item"
TABLE_KEY = f"embeddings.{FEATURE}.weight"  # the table in the EmbeddingCollection's state dict
ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default
# The table's fused update: exact Adagrad for training; exact SGD, whose step is proportional to the gradient, lets
# the test see that the sharded gradient is the unsharded one (Adagrad's is nearly invariant to a constant factor).
TABLE_OPTIMIZERS = ("adagrad", "sgd")
GATHER_ROWS = 65536  # rows per rank per gather message: bounds the device memory gather_table needs


class ShardedSASRec(nn.Module):
    """SASRec whose item table is a TorchRec EmbeddingCollection; forward(inputs, targets) -> summed loss.

    Built on every rank with the same arguments, then `shard(...)` places the table. The engine
    calls forward through the DistributedModelParallel that `shard` returns, `gather_table` after
    each epoch (Hooks.before_validate) and, on rank 0, `score` for validation.
    """

    def __init__(self, cfg: SASRecConfig, n_negatives: int, sampling_logq: torch.Tensor):
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.cfg = cfg
        self.n_negatives = n_negatives
        # The blocks, positions and norms of SASRec; its dense table is dropped (the rows live in `items`).
        self.encoder = SASRec(replace(cfg, n_items=0))
        self.encoder.item_embedding = None
        # On the meta device: no rank ever allocates the whole table, sharding allocates each rank's rows.
        self.items = EmbeddingCollection(
            tables=[EmbeddingConfig(name=FEATURE, embedding_dim=cfg.d_model, num_embeddings=cfg.n_items + 1,
                                    feature_names=[FEATURE])],
            device=torch.device("meta"))
        self.register_buffer("sampling_logq", sampling_logq, persistent=False)
        self.world_size = 1
        self.full_table: torch.Tensor | None = None  # rank 0, after gather_table

    # ------------------------------------------------------------------ placement

    def shard(self, world: Dist, device: torch.device, lr: float, optimizer: str = "adagrad") -> nn.Module:
        """Shard the table row-wise over the process group (its fused `optimizer` with `lr`); returns the step module."""
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
        from torchrec.distributed.types import ShardingEnv, ShardingPlan

        if not dist.is_initialized():  # one process (no torchrun): TorchRec still wants a process group
            store = dist.FileStore(tempfile.mkstemp(prefix="leanrec-torchrec-")[1], 1)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
        self.world_size = world.world_size
        if optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"unknown table optimizer {optimizer!r}; choose one of {TABLE_OPTIMIZERS}")
        fused = ({"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": lr, "eps": ADAGRAD_EPS} if optimizer == "adagrad"
                 else {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr})
        sharder = EmbeddingCollectionSharder(fused_params=fused)
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
        plan = ShardingPlan({"items": construct_module_sharding_plan(
            self.items, {FEATURE: row_wise(compute_kernel="fused")}, sharder=sharder,
            local_size=local_size, world_size=world.world_size, device_type=device.type)})
        self.encoder.to(device)
        self.sampling_logq = self.sampling_logq.to(device)
        # Replaces self.items by its ShardedEmbeddingCollection and wraps the rest in DDP.
        step_module = DistributedModelParallel(self, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                               device=device, plan=plan, sharders=[sharder])
        start, rows = self.local_rows()
        logger.info("item table row-wise sharded over %d ranks: rank %d holds rows [%d, %d) of %d; its fused %s at lr %g",
                    world.world_size, world.rank, start, start + rows, self.cfg.n_items + 1, optimizer, lr)
        return step_module

    def _local_shard(self) -> tuple[int, torch.Tensor]:
        """(first global row, this rank's rows) of the sharded table: a view its optimizer updates."""
        (shard,) = self.items.state_dict()[TABLE_KEY].local_shards()
        return shard.metadata.shard_offsets[0], shard.tensor

    def local_rows(self) -> tuple[int, int]:
        start, rows = self._local_shard()
        return start, rows.shape[0]

    @torch.no_grad()
    def load_table(self, table: torch.Tensor) -> None:
        """Every rank copies its rows of the full (n_items + 1, d) `table` (SASRec's initialisation or a warm start)."""
        start, rows = self._local_shard()
        rows.copy_(table[start:start + rows.shape[0]].to(rows.device))

    @torch.no_grad()
    def load_encoder(self, model: SASRec) -> None:
        """The blocks, positions and norms of `model` (same shape), its item table excepted."""
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("item_embedding.")}
        self.encoder.load_state_dict(state, strict=False)
        self.load_table(model.item_embedding.weight)

    @torch.no_grad()
    def gather_table(self) -> None:
        """Collective: rank 0 gets the whole table in host memory (`full_table`), in chunks of GATHER_ROWS per rank."""
        start, rows = self._local_shard()
        n_rows, d = self.cfg.n_items + 1, self.cfg.d_model
        world = self.world_size
        block = math.ceil(n_rows / world)  # every rank's shard is this long except the last ones
        rank = dist.get_rank()
        full = torch.empty(n_rows, d, dtype=rows.dtype) if rank == 0 else None
        for offset in range(0, block, GATHER_ROWS):
            chunk = torch.zeros(min(GATHER_ROWS, block - offset), d, dtype=rows.dtype, device=rows.device)
            mine = rows[offset:offset + len(chunk)]
            chunk[:len(mine)] = mine
            received = [torch.empty_like(chunk) for _ in range(world)] if rank == 0 else None
            dist.gather(chunk, received, dst=0)
            if full is not None:
                for r, part in enumerate(received):
                    first = r * block + offset
                    last = min(first + len(part), (r + 1) * block, n_rows)
                    if last > first:
                        full[first:last] = part[:last - first].cpu()
        if full is not None:
            assert start == 0
            self.full_table = full

    # ------------------------------------------------------------------ training

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        mask = targets != 0
        positives = targets[mask]
        negatives = torch.multinomial(self.sampling_logq.exp(), self.n_negatives, replacement=True)
        ids = torch.cat([inputs.reshape(-1), positives, negatives])
        # One jagged row per rank (stride 1): ranks may look up different numbers of ids.
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[FEATURE], values=ids, lengths=torch.tensor([len(ids)], dtype=torch.int64, device=ids.device))
        vectors = self.items(features)[FEATURE].values()
        # No rescaling: the rows' gradients that come back through the all-to-all are already those of the global
        # mean, as DDP's average is for the blocks (tests/training/test_sharded.py checks it with SGD, where a
        # factor would show).
        n_inputs, n_pos = inputs.numel(), len(positives)
        # Padding reads as zero whatever row 0 of the shard holds, as with nn.Embedding's padding_idx.
        embedded = vectors[:n_inputs].view(*inputs.shape, -1) * (inputs != PADDING_INDEX).unsqueeze(-1)
        hidden = self.encoder.encode(embedded)[mask]
        return sampled_softmax(hidden, vectors[n_inputs:n_inputs + n_pos], vectors[n_inputs + n_pos:], positives, negatives,
                               self.sampling_logq)

    # ------------------------------------------------------------------ rank 0: validation and export

    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue entry, as SASRec.score (eval mode), from the gathered table."""
        if self.full_table is None:
            raise RuntimeError("score needs gather_table() first (rank 0)")
        table = self.full_table.to(items.device)
        return self.encoder.encode_last(table[items], lengths) @ table.T

    def to_sasrec(self) -> SASRec:
        """A plain SASRec with the gathered table (rank 0): what save_model writes and serving loads."""
        if self.full_table is None:
            raise RuntimeError("to_sasrec needs gather_table() first (rank 0)")
        model = SASRec(self.cfg)
        state = {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}
        model.load_state_dict({**state, "item_embedding.weight": self.full_table}, strict=True)
        return model


def shard_teacher(cfg: TrainConfig, model: SASRec, sampling_logq: torch.Tensor, world: Dist, device: torch.device, *,
                  resume: bool, amp_dtype: torch.dtype | None) -> tuple[ShardedSASRec, nn.Module]:
    """The train stage's sharded teacher: `model`'s initial (or warm-started) weights, its table sharded over the
    ranks; returns the engine's model and step module. Refuses what this path does not support yet."""
    if resume:
        raise TrainError("train.embedding_engine=torchrec cannot --resume yet: the checkpoint would hold rank 0's rows only")
    if amp_dtype == torch.float16:
        raise TrainError("train.embedding_engine=torchrec cannot use fp16: the table's fused update bypasses the GradScaler; "
                         "use train.precision bf16 or fp32")
    if cfg.weight_decay > 0:
        raise TrainError("train.embedding_engine=torchrec: the table's fused Adagrad has no weight decay; set train.weight_decay: 0")
    sharded = ShardedSASRec(model.cfg, cfg.n_negatives, sampling_logq)
    step_module = sharded.shard(world, device, cfg.sharded_table_lr)
    sharded.load_encoder(model)
    return sharded, step_module
