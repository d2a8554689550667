"""Fine-tuning: strategies (one switch), the Trainer, metrics, distillation, ensembles.

    from tinysft.finetune import fit
    trainer = fit(model, train_loader, dev_loader, strategy="layerwise", lr=2e-5, epochs=3,
                  strategy_options={"decay": 0.9, "gradual_unfreeze": True})

Or step by step: ``plan = prepare(model, strategy, lr)``, an optimizer over
``plan.param_groups``, then ``Trainer(plan.model, opt, loader, on_epoch_start=plan.on_epoch_start).fit()``.

strategies.py  prepare(): full, encoder_only, layerwise, discriminative, feature_extraction
features.py    cached backbone features and the head trained on them
trainer.py     Trainer / fit: accumulation, clipping, schedules, penalties, evaluation,
               early stopping, JSONL log, progress bar, bit-exact resumable checkpoints
callbacks.py   EarlyStopping, ProgressBar, MetricsLog
metrics.py     accuracy, macro-F1, confusion matrix
distill.py     knowledge-distillation loss and loop
ensemble.py    probability averaging / majority vote over K models
"""
from .callbacks import EarlyStopping, MetricsLog, ProgressBar
from .distill import DistillationLoss, distill, kd_loss
from .ensemble import ensemble_predict, evaluate_ensemble
from .features import FeatureExtractor, HeadModel
from .metrics import accuracy, classification_metrics, confusion_matrix, macro_f1
from .strategies import (STRATEGIES, FinetunePlan, GradualUnfreezer, discriminative_scales, fisher_diagonal,
                         layer_groups, prepare)
from .trainer import NonFiniteLossError, Trainer, fit
from .weights import get_weights, set_weights

__all__ = ["prepare", "fit", "Trainer", "NonFiniteLossError", "STRATEGIES", "FinetunePlan", "GradualUnfreezer",
           "layer_groups", "fisher_diagonal", "discriminative_scales", "FeatureExtractor", "HeadModel",
           "EarlyStopping", "ProgressBar", "MetricsLog", "accuracy", "macro_f1",
           "confusion_matrix", "classification_metrics", "kd_loss", "DistillationLoss", "distill",
           "ensemble_predict", "evaluate_ensemble", "get_weights", "set_weights"]
