"""The loop's settings (bilevel.config): every invalid field is refused with one line naming it."""

import pytest
import torch

from bilevel.config import TunerConfig, check_arguments
from bilevel.updates import SGD


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("mode", "newton", "unknown mode"),
        ("implicit", "hessian", "implicit must be"),
        ("on_divergence", "ignore", "on_divergence must be"),
        ("rollback_factor", 1.0, "rollback_factor"),
        ("rollback_spike", 0.5, "rollback_spike"),
        ("max_rollbacks", 0, "max_rollbacks"),
        ("interval", 0, "interval must be"),
        ("record_every", 0, "record_every must be"),
        ("cold_steps", -1, "cold_steps"),
        ("hyper_lr", float("nan"), "hyper_lr"),
        ("grad_clip", 0.0, "grad_clip"),
    ],
)
def test_each_invalid_field_is_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        TunerConfig(**{field: value}).validate()


def test_defaults_are_clarke_et_al_and_one_divergence_default():
    cfg = TunerConfig()
    cfg.validate()
    assert (cfg.interval, cfg.lookback, cfg.hyper_lr, cfg.hyper_optimizer) == (10, 5, 0.05, torch.optim.Adam)
    assert cfg.on_divergence is None  # the tuner picks: raise for one model, record for a population
    with pytest.raises(ValueError, match="lookback must be >= 1"):
        TunerConfig(mode="unroll", lookback=0).validate()


def test_check_arguments_names_what_does_not_fit():
    with pytest.raises(ValueError, match="not in the space"):
        check_arguments(TunerConfig(tuned=("lr", "dropout")), ["lr"], ["lr"], SGD(), None)
    with pytest.raises(ValueError, match="not hyperparameters of SGD"):
        check_arguments(TunerConfig(tuned=("l2",)), ["lr", "l2"], ["l2"], SGD(), None)
    with pytest.raises(ValueError, match="not declared update-form"):
        check_arguments(TunerConfig(tuned=("lr",)), ["lr"], [], SGD(), None)
    check_arguments(TunerConfig(tuned=("lr",)), ["lr"], ["lr"], SGD(), None)  # fits
