"""Correction: fine-tune the classifier on labelled failure regions with Ray Train, over a lambda sweep."""

from genstress_ray.correction.finetune import FinetuneSettings, accuracy, evaluate, finetune, selection_score
from genstress_ray.correction.run import CorrectionResult, run_correction
from genstress_ray.correction.trials import TrialResources, run_trials, save_finetuned, train_worker

__all__ = ["CorrectionResult", "FinetuneSettings", "TrialResources", "accuracy", "evaluate", "finetune",
           "run_correction", "run_trials", "save_finetuned", "selection_score", "train_worker"]
