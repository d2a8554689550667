"""Tests of tinysft.finetune: strategies, the Trainer, metrics, distillation, ensembles."""
