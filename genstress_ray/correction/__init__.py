"""Correction: fine-tune the classifier on labelled failure regions with Ray Train, over a lambda sweep."""

from genstress_ray.correction.finetune import FinetuneSettings, array_batches, finetune, rate, score, selection_score
from genstress_ray.correction.run import CorrectionResult, run_correction
from genstress_ray.correction.trials import TrialResources, run_trials, save_finetuned, train_worker

__all__ = ["CorrectionResult", "FinetuneSettings", "TrialResources", "array_batches", "finetune", "rate",
           "run_correction", "run_trials", "save_finetuned", "score", "selection_score", "train_worker"]
