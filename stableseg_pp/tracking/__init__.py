"""Experiment tracking: which configuration produced which folder, and how well it did.

``logger=none|csv|wandb`` picks a :class:`Tracker`. ``fit`` makes one per run on
rank 0 (the other ranks get :class:`NoTracker`) and every computed pipeline step
(a content-addressed folder) is recorded as one tracked step: with W&B a run in
the group ``run_name`` whose job type says what the step makes, which uses the
artifacts of its input folders and logs its own folder as an artifact, so the
lineage graph shows which pseudo-masks trained which model.
"""

from stableseg_pp.tracking.base import NoTracker, StepRecord, Tracker, activate, active, track_results
from stableseg_pp.tracking.csv_tracker import CSVTracker
from stableseg_pp.tracking.wandb_tracker import WandbTracker

__all__ = ["CSVTracker", "NoTracker", "StepRecord", "Tracker", "WandbTracker", "activate", "active", "track_results"]
