"""Lorraine et al. (2020), "Optimizing millions of hyperparameters by implicit differentiation": the
inverse-approximation study, overfitting a validation set, validation splits, dataset distillation,
learned data augmentation and the LSTM studies."""
