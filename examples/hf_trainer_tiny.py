"""Tune the learning-rate scale and weight decay inside a Hugging Face Trainer (a tiny BERT, no downloads).

A two-layer BERT built from a config (hidden size 32) learns a synthetic token-classification task (is the
token id a multiple of 3?) with the Trainer's AdamW, a linear decay schedule and a learning rate of 1e-4, too
small for the steps given. It is trained twice from the same weights: with the
:class:`bilevel.integrations.transformers.HyperCallback` (every 10 optimiser steps one IFT hypergradient step on
log10 of a multiplier m of the schedule, lr_t = m * schedule(t), and on log10 weight decay) and without it.

Run ``python examples/hf_trainer_tiny.py`` (``--overhead``: time per step with and without the callback, 3
alternating runs each). Needs ``pip install "bilevel[transformers]"``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings

import torch
from transformers import BertConfig, BertForTokenClassification, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from bilevel.integrations.transformers import HyperCallback

VOCAB, LENGTH = 64, 16


def task(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` examples of ``LENGTH`` random tokens, each labelled 1 when its id is a multiple of 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    labels = (ids % 3 == 0).long()
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def tiny_bert(seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH * 2,
        num_labels=2,
    )
    return BertForTokenClassification(config)


def train(tuned: bool, steps: int = 200, n_train: int = 512, seed: int = 0, interval: int = 10, lr: float = 1e-4):
    """One Trainer run; returns the evaluation loss and token accuracy, the tuned values and seconds per step."""
    train_set, eval_set = task(n_train, seed), task(256, seed + 1)
    model = tiny_bert(seed)
    callbacks = [HyperCallback(eval_dataset=eval_set, tune=("lr", "weight_decay"), interval=interval)] if tuned else []
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=128,
            learning_rate=lr,
            weight_decay=0.01,
            lr_scheduler_type="linear",
            report_to=[],
            use_cpu=True,
            seed=seed,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # no log lines on the console
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        eval_loss = trainer.evaluate()["eval_loss"]
    model.eval()
    batch = {k: torch.stack([e[k] for e in eval_set]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        accuracy = (model(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()
    decayed = trainer.optimizer.param_groups[0]["weight_decay"]
    return {
        "eval_loss": eval_loss,
        "token_accuracy": accuracy,
        "lr_scale": callbacks[0].lr_scale if tuned else 1.0,
        "weight_decay": float(decayed),
        "seconds_per_step": seconds / steps,
        "steps": steps,
    }


def main(steps: int = 200, n_train: int = 512, seed: int = 0, interval: int = 10):
    """Tuned vs untuned from the same start; returns ``{"tuned": ..., "untuned": ...}``."""
    return {
        "tuned": train(True, steps, n_train, seed, interval),
        "untuned": train(False, steps, n_train, seed, interval),
    }


def overhead(runs: int = 3, steps: int = 200) -> dict[str, float]:
    """Seconds per optimiser step with and without the callback, ``runs`` alternating runs each (the medians)."""
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(runs):
        times["with"].append(train(True, steps)["seconds_per_step"])
        times["without"].append(train(False, steps)["seconds_per_step"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"with": med["with"], "without": med["without"], "ratio": med["with"] / med["without"]}


def _quiet() -> None:
    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overhead", action="store_true", help="time per step with / without the callback")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _quiet()
    if args.overhead:
        o = overhead()
        print(
            f"seconds per step: with HyperCallback {o['with'] * 1e3:.2f} ms, without {o['without'] * 1e3:.2f} ms, "
            f"ratio {o['ratio']:.2f} (median of 3 alternating runs each)"
        )
    else:
        for name, r in main().items():
            print(
                f"{name:8s} eval loss {r['eval_loss']:.4f}  token accuracy {r['token_accuracy']:.4f}  "
                f"(lr scale {r['lr_scale']:.3g}, weight decay {r['weight_decay']:.3g}; {r['steps']} steps)"
            )
