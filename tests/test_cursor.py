"""LoaderCursor and isolated_rng against plain PyTorch loops as the reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bilevel.cursor import LoaderCursor, isolated_rng

N, BATCH = 10, 3  # 4 batches a pass, the last one of a single example
PER_PASS = 4
KINDS = ["shuffle", "shuffle+generator", "sequential", "sequential+generator", "list"]


def make_loader(kind: str, seed: int = 123) -> Any:
    """A fresh loader; ``+generator`` ones get a fresh generator seeded with ``seed``."""
    if kind == "list":
        return [(torch.arange(i, min(i + BATCH, N)),) for i in range(0, N, BATCH)]
    data = TensorDataset(torch.arange(N, dtype=torch.float32)[:, None], torch.arange(N))
    generator = torch.Generator().manual_seed(seed) if kind.endswith("+generator") else None
    return DataLoader(data, batch_size=BATCH, shuffle=kind.startswith("shuffle"), generator=generator)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def plain(loader: Any, steps: int, *, draw: bool = True, between: Callable[[], None] | None = None) -> list[Any]:
    """The reference: ``for epoch: for batch in loader`` for ``steps`` batches, a draw after each."""
    out: list[Any] = []
    while True:
        for batch in loader:
            out.append((batch, torch.rand(()) if draw else None))
            if between is not None:
                between()
            if len(out) == steps:
                return out


def walk(cursor: LoaderCursor, steps: int) -> list[Any]:
    out = []
    for _ in range(steps):
        batch = cursor.next()
        out.append((batch, torch.rand(())))
    return out


def rng_equal(a: torch.Tensor) -> bool:
    return torch.equal(a, torch.get_rng_state())


@pytest.mark.parametrize("kind", KINDS)
def test_shared_rng_matches_plain_loop(kind: str) -> None:
    steps = 2 * PER_PASS + 2
    torch.manual_seed(1)
    ref = plain(make_loader(kind), steps)
    ref_rng = torch.get_rng_state()

    torch.manual_seed(1)
    cursor = LoaderCursor("train_loader", isolate_rng=False)
    cursor.bind(make_loader(kind))
    got = walk(cursor, steps)
    assert same(got, ref)
    assert rng_equal(ref_rng)
    assert (cursor.passes, cursor.taken) == (3, 2)


@pytest.mark.parametrize("train_kind", ["shuffle", "sequential"])
@pytest.mark.parametrize("kind", KINDS)
def test_isolated_cursor_leaves_training_alone(kind: str, train_kind: str) -> None:
    steps = 2 * PER_PASS + 1
    torch.manual_seed(2)
    ref = plain(make_loader(train_kind), steps)
    ref_rng = torch.get_rng_state()

    torch.manual_seed(2)
    start = torch.get_rng_state()
    val_loader = make_loader(kind, seed=7)
    cursor = LoaderCursor("val_loader", isolate_rng=True)
    cursor.bind(val_loader)
    val: list[Any] = []

    def hyper_steps() -> None:
        val.extend(cursor.next() for _ in range(3))
        if len(val) % 9 == 0:  # an "epoch-end" evaluation over the whole val loader
            with isolated_rng(val_loader):
                for _ in val_loader:
                    torch.rand(())

    got = plain(make_loader(train_kind), steps, between=hyper_steps)
    assert same(got, ref)
    assert rng_equal(ref_rng)
    # the cursor's batches are those of a plain cycling loop started from the RNG state at construction
    torch.set_rng_state(start)
    assert same(val, [b for b, _ in plain(make_loader(kind, seed=7), len(val), draw=False)])


def test_isolated_rng_restores_global_and_generators() -> None:
    loader = make_loader("shuffle+generator")
    gen = loader.generator
    cpu, gstate = torch.get_rng_state(), gen.get_state()
    with isolated_rng(loader):
        for _ in loader:
            torch.rand(3)
        for _ in make_loader("shuffle"):
            pass
    assert rng_equal(cpu)
    assert torch.equal(gen.get_state(), gstate)


@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("split", [1, PER_PASS, PER_PASS + 2, 2 * PER_PASS])
@pytest.mark.parametrize("kind", KINDS)
def test_split_and_resume_in_a_fresh_cursor(kind: str, split: int, isolate: bool, tmp_path: Any) -> None:
    steps = 3 * PER_PASS + 1
    torch.manual_seed(3)
    cursor = LoaderCursor("val_loader", isolate_rng=isolate)
    cursor.bind(make_loader(kind))
    first = walk(cursor, split)
    at_split = torch.get_rng_state()
    torch.save(cursor.state_dict(), tmp_path / "cursor.pt")
    ref = walk(cursor, steps - split)
    ref_rng = torch.get_rng_state()

    # a "fresh process": another RNG history, a new cursor, new loader objects built the same way
    torch.manual_seed(99)
    torch.rand(5)
    fresh = LoaderCursor("val_loader", isolate_rng=isolate)
    fresh.load_state_dict(torch.load(tmp_path / "cursor.pt", weights_only=True))
    torch.set_rng_state(at_split)
    fresh.bind(make_loader(kind))
    assert rng_equal(at_split)  # bind puts the global RNG back
    assert (fresh.passes, fresh.taken) == ((split - 1) // PER_PASS + 1, (split - 1) % PER_PASS + 1)
    assert same(walk(fresh, steps - split), ref)
    assert rng_equal(ref_rng)
    assert len(first) == split


@pytest.mark.parametrize("isolate", [False, True])
def test_load_state_dict_rebuilds_with_the_same_loader(isolate: bool) -> None:
    torch.manual_seed(4)
    loader = make_loader("shuffle+generator")
    cursor = LoaderCursor("val_loader", isolate_rng=isolate)
    cursor.bind(loader)
    walk(cursor, 5)
    sd, at_split = cursor.state_dict(), torch.get_rng_state()
    ref = walk(cursor, 7)
    cursor.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="bind a loader"):
        cursor.next()
    torch.set_rng_state(at_split)
    cursor.bind(loader)
    assert same(walk(cursor, 7), ref)


@pytest.mark.parametrize("isolate", [False, True])
def test_rebinding_the_same_loader_continues(isolate: bool) -> None:
    torch.manual_seed(5)
    ref = walk(_bound(isolate, make_loader("shuffle")), 7)
    torch.manual_seed(5)
    loader = make_loader("shuffle")
    cursor = _bound(isolate, loader)
    got = walk(cursor, 3)
    cursor.bind(loader)  # a second fit() with the same loader: no new pass
    assert (cursor.passes, cursor.taken) == (1, 3)
    got += walk(cursor, 4)
    assert same(got, ref)


def _bound(isolate: bool, loader: Any) -> LoaderCursor:
    cursor = LoaderCursor("val_loader", isolate_rng=isolate)
    cursor.bind(loader)
    return cursor


def test_one_shot_iterators_are_refused_before_consuming() -> None:
    cursor = LoaderCursor("val_loader", isolate_rng=True)
    gen = (b for b in [1, 2])
    with pytest.raises(
        ValueError, match=r"val_loader must be re-iterable \(a DataLoader, a list of batches, \.\.\.\): "
    ):
        cursor.bind(gen)
    assert next(gen) == 1
    with pytest.raises(ValueError, match="got a one-shot _SingleProcessDataLoaderIter"):
        cursor.bind(iter(make_loader("sequential")))
    with pytest.raises(TypeError, match="val_loader must be iterable"):
        cursor.bind(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("empty", [[], DataLoader(TensorDataset(torch.empty(0)), batch_size=2)])
def test_an_empty_loader_raises(empty: Any) -> None:
    cursor = LoaderCursor("val_loader", isolate_rng=False)
    cursor.bind(empty)
    with pytest.raises(ValueError, match="val_loader yielded no batches"):
        cursor.next()


def test_state_is_refused_by_a_cursor_of_the_other_mode() -> None:
    cursor = LoaderCursor("val_loader", isolate_rng=False)
    with pytest.raises(ValueError, match="isolate_rng=False"):
        LoaderCursor("val_loader", isolate_rng=True).load_state_dict(cursor.state_dict())


def test_a_shorter_loader_cannot_hold_the_position() -> None:
    cursor = _bound(False, make_loader("sequential"))
    walk(cursor, 3)
    fresh = LoaderCursor("val_loader", isolate_rng=False)
    fresh.load_state_dict(cursor.state_dict())
    with pytest.raises(ValueError, match="has 1 batches in pass 1"):
        fresh.bind([(torch.zeros(1),)])


class _Noisy(Dataset[torch.Tensor]):
    """Each item draws from the (worker's) torch RNG, seeded from the loader's base seed."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)]) + torch.rand(1)


@pytest.mark.parametrize("shuffle", [False, True])
def test_workers_resume_exactly(shuffle: bool) -> None:
    """num_workers=2: the replayed base seed gives the workers the same seeds (under a second)."""

    def loader() -> DataLoader[torch.Tensor]:
        return DataLoader(_Noisy(), batch_size=2, shuffle=shuffle, num_workers=2)

    torch.manual_seed(6)
    cursor = _bound(False, loader())
    walk(cursor, 4)  # into the second pass
    sd, at_split = cursor.state_dict(), torch.get_rng_state()
    ref = walk(cursor, 3)
    fresh = LoaderCursor("val_loader", isolate_rng=False)
    fresh.load_state_dict(sd)
    torch.set_rng_state(at_split)
    fresh.bind(loader())
    assert same(walk(fresh, 3), ref)


def test_a_distributed_sampler_is_told_each_pass_like_a_plain_loop() -> None:
    """DistributedSampler shuffles with seed + epoch: the cursor calls set_epoch(k) before pass k, as a plain
    loop ``for epoch: sampler.set_epoch(epoch); for batch in loader`` does, and a resumed pass is rebuilt the same."""
    from torch.utils.data.distributed import DistributedSampler

    data = TensorDataset(torch.arange(20.0))

    def make() -> DataLoader:
        return DataLoader(data, batch_size=3, sampler=DistributedSampler(data, num_replicas=2, rank=1, seed=7))

    plain = []
    loader = make()
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        plain += [b[0].clone() for b in loader]
    cursor = LoaderCursor("train_loader", isolate_rng=False)
    cursor.bind(make())
    got = [cursor.next()[0] for _ in range(5)]
    sd = cursor.state_dict()
    fresh = LoaderCursor("train_loader", isolate_rng=False)
    fresh.load_state_dict(sd)
    fresh.bind(make())
    got += [fresh.next()[0] for _ in range(len(plain) - 5)]
    assert len(got) == len(plain) and all(torch.equal(a, b) for a, b in zip(got, plain))
    assert not torch.equal(plain[0], plain[4])  # the passes are shuffled differently
