"""Vicol et al. (2021), "On implicit bias in overparameterized bilevel optimization": the rings,
anti-distillation and parameter-space studies."""
