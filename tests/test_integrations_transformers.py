"""bilevel.integrations.transformers.HyperCallback: online tuning inside a Hugging Face Trainer (tiny BERT, CPU)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason='Hugging Face transformers is not installed: pip install "bilevel[transformers]"'
)
pytest.importorskip("accelerate", reason='the Trainer needs accelerate: pip install "bilevel[transformers]"')

from transformers import (  # noqa: E402
    BertConfig,
    BertForTokenClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from bilevel.integrations.transformers import HyperCallback  # noqa: E402

transformers.utils.logging.set_verbosity_error()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VOCAB, LENGTH = 64, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models gain nothing from two, and on a shared 2-core machine two thrash."""
    torch.set_num_threads(1)  # conftest's fixture puts the count back afterwards


def task(n, seed):
    """Synthetic token classification: is the token id a multiple of 3?"""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": (ids[i] % 3 == 0).long()} for i in range(n)]


@pytest.fixture(scope="module")
def data():
    return task(320, 0), task(128, 1)


def model():
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=2 * LENGTH,
        num_labels=2,
    )
    return BertForTokenClassification(config)


def run(tmp_path, data, callbacks=(), steps=40, weight_decay=0.01):
    train_set, eval_set = data
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=1e-4,
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model(), args=args, train_dataset=train_set, eval_dataset=eval_set, callbacks=list(callbacks)
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


class Recorder(TrainerCallback):
    """After every step (and after HyperCallback's step): the groups' lr, the schedule's lambda(t) and m."""

    def __init__(self, hyper):
        self.hyper, self.rows = hyper, []

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.rows.append(
            {
                "t": state.global_step,
                "lr": [float(g["lr"]) for g in optimizer.param_groups],
                "lambda": [f(lr_scheduler.last_epoch) for f in lr_scheduler.lr_lambdas],
                "m": self.hyper.lr_scale,
                "decay": [float(g["weight_decay"]) for g in optimizer.param_groups],
            }
        )


def test_tuned_beats_untuned_and_the_multiplier_composes_with_the_schedule(tmp_path, data):
    fixed = run(tmp_path / "fixed", data)
    rng_fixed = torch.get_rng_state()
    fixed_eval = fixed.evaluate()["eval_loss"]

    hyper = HyperCallback(eval_dataset=data[1], tune=("lr", "weight_decay"), interval=5, hyper_lr=0.1)
    recorder = Recorder(hyper)
    tuned = run(tmp_path / "tuned", data, [hyper, recorder])
    rng_tuned = torch.get_rng_state()
    assert tuned.evaluate()["eval_loss"] < fixed_eval - 0.01
    assert hyper.lr_scale > 1.5  # a learning rate too small for 40 steps is scaled up
    assert torch.equal(rng_fixed, rng_tuned)  # the callback draws from streams of its own

    base = 1e-4
    ms = []
    for row in recorder.rows:  # lr_t = m_t * base_lr * lambda(t) at every step, for both groups
        assert row["lr"] == pytest.approx([row["m"] * base * lam for lam in row["lambda"]], rel=1e-6, abs=1e-12)
        ms.append(row["m"])
    changes = [r["t"] for r, m0, m1 in zip(recorder.rows[1:], ms, ms[1:]) if m1 != m0]
    assert changes and all(t % 5 == 0 for t in changes)  # m moves only at hyperparameter steps ...
    # ... and the scheduler's next step uses it: between hyperparameter steps lr / lambda stays m * base
    sched = tuned.lr_scheduler
    assert sched.base_lrs == pytest.approx([hyper.lr_scale * base] * 2, rel=1e-12)

    # the decayed group's weight decay is tuned; the Trainer's no-decay group (biases, LayerNorm) stays at 0
    decays = recorder.rows[-1]["decay"]
    assert decays[1] == 0.0 and decays[0] != 0.01 and decays[0] == pytest.approx(hyper.hparams["weight_decay"])
    assert hyper.history[-1]["step"] == 40


def test_state_dict_is_plain_and_the_refusals(tmp_path, data):
    hyper = HyperCallback(eval_dataset=data[1], tune=("lr",), interval=5)
    run(tmp_path / "a", data, [hyper], steps=10)
    buffer = io.BytesIO()
    torch.save(hyper.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    # step 10 is the last: the linear schedule is 0 there, and that hyperparameter step is skipped
    assert sd["scale"] == [hyper.lr_scale] * 2 and sd["last_step"] == 5

    again = HyperCallback(eval_dataset=data[1], tune=("lr",), interval=5)
    again.load_state_dict(sd)
    recorder = Recorder(again)
    run(tmp_path / "b", data, [again, recorder], steps=10)
    assert recorder.rows[0]["m"] == pytest.approx(hyper.lr_scale)  # continued from the saved multiplier

    with pytest.raises(ValueError, match="exactly one"):
        HyperCallback()
    with pytest.raises(ValueError, match="no parameter group decays"):
        run(tmp_path / "c", data, [HyperCallback(eval_dataset=data[1], tune=("weight_decay",))], weight_decay=0.0)
    with pytest.raises(ValueError, match="param_groups hold one value per group"):
        HyperCallback(eval_dataset=data[1], tune={"lr": "element"})


def test_example_runs_at_a_tiny_size():
    spec = importlib.util.spec_from_file_location("example_hf_trainer_tiny", EXAMPLES / "hf_trainer_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(steps=30, n_train=256)
    tuned, untuned = out["tuned"], out["untuned"]
    assert untuned["lr_scale"] == 1.0 and untuned["weight_decay"] == pytest.approx(0.01)
    assert tuned["lr_scale"] > 1.0
    assert tuned["eval_loss"] < untuned["eval_loss"]


def test_without_transformers_the_module_imports_and_the_callback_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "import bilevel, bilevel.integrations.transformers as m\n"
        "try:\n    m.HyperCallback([])\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "bilevel[transformers]"' in out
