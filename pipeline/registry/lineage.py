"""What the champion was trained on (`champion_lineage`): `register` tags each model version with
the work dir it was registered from (`leanrec.workdir`: an Airflow run dir, or the project for
the CLI/DVC) and its teacher's path there. The reference interactions are that work dir's
`data/validated/interactions.parquet` (for an incremental champion: its reference plus its new
rows), the vocabularies to extend are its `data/features/`, and the model to fine-tune is its
teacher (the full-precision SASRec, whatever variant was registered). The features' content hash
recorded at registration must still match, so a work dir overwritten since (e.g. the project
after another `dvc repro`) is refused, not silently used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import ConfigError
from pipeline.core.io import Layout
from pipeline.core.tracking import directory_sha256
from pipeline.models.sasrec import CONFIG_FILE
from pipeline.registry.store import CHAMPION, TAG_TEACHER, TAG_WORKDIR, champion_version

LINEAGE_FILE = "champion_lineage.json"  # in an incremental run's root: the champion it started from
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "max_len")  # train.* keys that must match the model fine-tuned


@dataclass
class ChampionLineage:
    """The current champion and what an incremental run starts from (see the module docstring)."""

    model_name: str
    version: str
    workdir: str
    reference: str  # the interactions the champion was trained on
    features_dir: str  # its vocabularies (features.vocab_from)
    model_dir: str  # its teacher (train.init_from)
    shape: dict[str, int]

    def overrides(self) -> list[str]:
        """params overrides of an incremental run fine-tuning this champion."""
        return [f"drift.reference={json.dumps(self.reference)}", f"features.vocab_from={json.dumps(self.features_dir)}",
                f"train.init_from={json.dumps(self.model_dir)}", 'train.model="sasrec"',
                *(f"train.{key}={value}" for key, value in self.shape.items())]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def champion_lineage(registry: RegistryConfig, tracking: TrackingConfig, root: Path) -> ChampionLineage | None:
    """What the champion was trained on, from its version's tags; None when there is no champion."""
    champion = champion_version(registry, tracking, root)
    if champion is None:
        return None
    where = f"{registry.model_name} version {champion.version} ({CHAMPION})"
    tags = champion.tags
    if not tags.get(TAG_WORKDIR) or not tags.get(TAG_TEACHER):
        raise ConfigError(f"{where} has no {TAG_WORKDIR}/{TAG_TEACHER} tags (registered before they existed): "
                          "register a model trained by this version of LeanRec")
    workdir = Path(tags[TAG_WORKDIR])
    layout = Layout(workdir)
    model_dir = workdir / tags[TAG_TEACHER]
    for path, what in ((layout.validated_interactions, "its validated interactions"),
                       (layout.features_dir / "sequences.parquet", "its features"), (model_dir / CONFIG_FILE, "its teacher")):
        if not path.exists():
            raise ConfigError(f"{where} was registered from {workdir}, but {what} ({path}) are gone")
    expected = tags.get("leanrec.features.sha256")
    if expected and directory_sha256(layout.features_dir) != expected:
        raise ConfigError(f"{where}: {layout.features_dir} changed since registration (content hash differs): "
                          "the data the champion was trained on is no longer there")
    config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    return ChampionLineage(model_name=registry.model_name, version=str(champion.version), workdir=str(workdir),
                           reference=str(layout.validated_interactions), features_dir=str(layout.features_dir),
                           model_dir=str(model_dir), shape={key: int(config[key]) for key in SHAPE_KEYS})
