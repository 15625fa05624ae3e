"""``logger=wandb``: one W&B run per computed step, grouped by ``run_name``, with artifact lineage.

Folders are logged as *reference* artifacts (``file://`` URIs): W&B records
which folder a step made and which folders it read without uploading gigabytes
of masks and checkpoints. Works online and with ``WANDB_MODE=offline`` (then
``wandb sync`` uploads later; W&B records the *use* of an artifact only online,
so offline runs name their input folders in the config key ``step.inputs``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger
from PIL import Image

from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.tracking.base import StepRecord, Tracker, step_kind


class WandbStep(StepRecord):
    def __init__(self, run, n_samples: int):
        self.run = run
        self.n_samples = n_samples
        self._logger: WandbLogger | None = None

    def lightning_loggers(self) -> list[Logger]:
        if self._logger is None:
            self._logger = WandbLogger(experiment=self.run)
        return [self._logger]

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        if metrics:
            self.run.log(dict(metrics))
            self.run.summary.update(dict(metrics))

    def log_masks(self, dataset: DatasetDescription, split: str, ids: Sequence[str], mask_sets: Mapping[str, Path]) -> None:
        import wandb

        names = dataset.class_names
        labels = {i: n for i, n in enumerate(names)} | {IGNORE_INDEX: "ignore"}
        layout = dataset.layout
        images = []
        for sid in ids[: self.n_samples]:
            masks = {}
            for name, folder in mask_sets.items():
                path = Path(folder) / f"{sid}.png"
                if path.exists():
                    masks[name] = {"mask_data": np.array(Image.open(path)), "class_labels": labels}
            if layout.has_mask(split, sid):
                gt = layout.read_mask(split, sid, len(names))
                masks["ground_truth"] = {"mask_data": gt, "class_labels": labels}
            if masks:
                image = dataset.read_image(split, sid)
                images.append(wandb.Image(image, masks=masks, caption=sid))
        if images:
            self.run.log({f"{split}/masks": images})

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        import wandb

        if rows:
            columns = list(rows[0])
            self.run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def log_image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))})


class WandbTracker(Tracker):
    """W&B runs for the steps of one ``fit``; ``mode`` null follows ``WANDB_MODE`` (online by default)."""

    def __init__(
        self,
        project: str = "stableseg_pp",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        save_dir: str | Path = ".",
        mode: str | None = None,
        n_samples: int = 8,
        checksum: bool = False,
    ):
        super().__init__()
        self.project, self.entity, self.group, self.tags = project, entity, group, list(tags)
        self.save_dir = Path(save_dir)
        self.mode = mode
        self.n_samples = n_samples
        self.checksum = checksum  # True: W&B hashes every file of a folder (slow on large datasets)
        self.runs: list[str] = []

    def artifact(self, folder: Path):
        """The artifact of a step folder: a reference to it, named after it (folder names are content hashes)."""
        import wandb

        key_file = folder / "key.json"
        metadata = json.loads(key_file.read_text()) if key_file.exists() else None
        artifact = wandb.Artifact(folder.name, type=step_kind(folder), metadata=metadata)
        artifact.add_reference(folder.resolve().as_uri(), checksum=self.checksum)
        return artifact

    @contextmanager
    def step(
        self, folder: Path, inputs: Sequence[Path] = (), key: Mapping[str, Any] | None = None, log_output: bool = True
    ) -> Iterator[StepRecord]:
        import wandb

        self.save_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            job_type=step_kind(folder),
            name=f"{self.group}/{folder.name}" if self.group else folder.name,
            tags=self.tags,
            dir=str(self.save_dir),
            mode=self.mode,
            config={**self.config, "step": {"folder": str(folder), "inputs": [str(p) for p in inputs]}},
            reinit="finish_previous",
        )
        self.runs.append(run.id)
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        exit_code = 1
        try:
            if not run.offline:  # W&B records artifact use only online; offline the inputs are in the config (step.inputs)
                for p in inputs:
                    run.use_artifact(self.artifact(p))
            yield WandbStep(run, self.n_samples)
            if log_output:
                run.log_artifact(self.artifact(folder))
            exit_code = 0
        finally:
            run.finish(exit_code=exit_code)
