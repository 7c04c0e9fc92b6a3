"""Resumable positions in re-iterable loaders, and blocks that leave the global RNG alone.

A bilevel training loop walks two loaders: the training loader, exactly like a plain loop
``for epoch in range(E): for x, y in train_loader: ...``, and a validation loader that every
hyperparameter step takes its next batch from (cycling through it) plus, possibly, an epoch-end
evaluation over the whole validation loader. :class:`LoaderCursor` and :func:`isolated_rng` make
such a loop (i) draw from PyTorch's global RNG exactly as the plain loop does and (ii) resume
bit-exactly from a :meth:`LoaderCursor.state_dict` taken anywhere, mid-pass included, in the same
process or a fresh one with new loader objects built the same way.

How ``torch.utils.data.DataLoader`` uses randomness (torch 2.x, ``dataloader.py``/``sampler.py``):

* ``iter(loader)`` draws a 64-bit base seed, always, shuffled or not: from ``loader.generator``
  if it has one, else from the global CPU RNG. Worker processes (``num_workers > 0``) seed
  ``torch``, ``random`` and ``numpy`` (if installed) from it, so worker-side randomness depends on
  this one draw.
* A ``RandomSampler`` (``shuffle=True``) without a generator draws its seed from the global CPU RNG
  lazily, when its iterator is first advanced: at the first ``next()`` for ``num_workers=0``, but
  already inside ``iter()`` for ``num_workers > 0`` (the workers are primed with indices there).
  With ``DataLoader(generator=g, shuffle=True)`` the sampler shuffles with ``g`` itself.
* Nothing else in the loader draws, but a dataset's ``__getitem__`` may (in the main process when
  ``num_workers=0``).

The promise. A cursor with ``isolate_rng=False`` makes exactly the ``iter()``/``next()`` calls a
plain loop makes, so it draws from the global RNG exactly as the plain loop does. A cursor with
``isolate_rng=True`` runs every ``iter()``/``next()`` on its own copy of the global *CPU* RNG stream,
so the global CPU RNG is untouched by it. :func:`isolated_rng` restores the global CPU RNG, the
CUDA RNGs and the given loaders' generators after a block. A cursor's state holds the pass count,
the batches taken in the current pass and the RNG states at the start of the pass (the CPU stream
``iter()`` ran on, the loader's generators: ``loader.generator``, ``loader.sampler.generator``,
``loader.batch_sampler.sampler.generator``) and, isolated, its stream now; rebinding replays the
pass from its start and skips the batches taken, so the shuffle order, the base seed and hence the
workers' seeds (``num_workers > 0`` resumes exactly too) are those of the original run.

Not covered: ``numpy`` and Python ``random`` in the main process (a dataset that uses them is not
isolated nor replayed), CUDA RNGs inside a cursor, generators that the loader shares with anything
else, ``persistent_workers=True`` (its ``iter()`` resets one long-lived iterator without a new base
seed, so a resumed run seeds its workers differently, and another loop over the same loader resets
the cursor's iterator), and threads (the global RNG state is swapped in place). Resuming mid-pass
re-reads the batches already taken in that pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["LoaderCursor", "isolated_rng", "loader_generators", "set_epoch"]

#: Where a loader keeps the generators it draws from (``DataLoader`` and its samplers).
_GENERATOR_PATHS = ("generator", "sampler.generator", "batch_sampler.sampler.generator", "batch_sampler.generator")


def set_epoch(loader: object, epoch: int) -> None:
    """Tell a sampler with ``set_epoch`` (``DistributedSampler``) which pass is starting, as a plain loop must.

    ``DistributedSampler`` shuffles with ``seed + epoch``; a training loop calls ``sampler.set_epoch(epoch)``
    before each pass. The cursor does it before every ``iter()`` (pass ``k`` gets epoch ``k``, counted from 0),
    so passes differ and a resumed pass is rebuilt with the same order.

    Args:
        loader: a loader; its ``sampler`` or ``batch_sampler.sampler`` is told if it has ``set_epoch``.
        epoch: the pass index, from 0.
    """
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def loader_generators(loader: object) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects a loader draws from, each once.

    Args:
        loader: a ``DataLoader``, a list of batches, or anything iterable (or a ``torch.Generator``,
            returned as itself).

    Returns:
        ``{attribute path: generator}``, e.g. ``{"generator": g}`` for ``DataLoader(generator=g)``;
        empty for a list or an unseeded loader.
    """
    if isinstance(loader, torch.Generator):
        return {"": loader}
    found: dict[str, torch.Generator] = {}
    for path in _GENERATOR_PATHS:
        obj: object = loader
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.Generator) and not any(obj is g for g in found.values()):
            found[path] = obj
    return found


@contextmanager
def isolated_rng(*loaders: object) -> Iterator[None]:
    """Run a block, then put the global RNGs (and the loaders' generators) back as they were.

    For an epoch-end evaluation over a whole validation loader: ``iter()`` draws a base seed (and
    a shuffling sampler its seed) that a plain training loop would not draw.

    Args:
        *loaders: loaders (or ``torch.Generator`` objects) that the block iterates; their
            generators (see :func:`loader_generators`) are restored too.

    Returns:
        A context manager. On exit the global CPU RNG is restored and, when CUDA was initialised
        before the block, every device's CUDA RNG; when the block initialised CUDA, each device's
        generator is reseeded with its own seed, which is its state before any draw.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    generators = [(g, g.get_state()) for loader in loaders for g in loader_generators(loader).values()]
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        elif torch.cuda.is_initialized():
            for gen in torch.cuda.default_generators:
                gen.manual_seed(gen.initial_seed())
        for g, state in generators:
            g.set_state(state)


class LoaderCursor:
    """A resumable position in a re-iterable loader, cycling through passes.

    Args:
        name: the loader's name in messages, e.g. ``"val_loader"``.
        isolate_rng: run every ``iter()``/``next()`` on the cursor's own copy of the CPU RNG stream
            (a copy of the global state at construction), leaving the global RNG untouched; if
            ``False``, draw from the global RNG exactly as a plain loop does.
    """

    def __init__(self, name: str, *, isolate_rng: bool) -> None:
        self.name = name
        self.isolate_rng = isolate_rng
        self._stream: Tensor | None = torch.get_rng_state() if isolate_rng else None
        self._loader: Iterable[Any] | None = None
        self._it: Iterator[Any] | None = None
        self._passes = 0
        self._taken = 0
        self._pass_cpu: Tensor | None = None  # the CPU stream iter() ran on (global or own), at pass start
        self._pass_generators: dict[str, Tensor] = {}
        self._rebuild = False  # set by load_state_dict: the next bind replays the position

    @property
    def passes(self) -> int:
        """Passes started (``iter()`` calls) so far."""
        return self._passes

    @property
    def taken(self) -> int:
        """Batches taken in the current pass."""
        return self._taken

    def bind(self, loader: Iterable[Any]) -> None:
        """Attach the loader that the coming batches come from.

        The same object again keeps the live iterator; another object (a fresh process, a new
        loader) or a bind after :meth:`load_state_dict` rebuilds the saved position: the RNGs are set
        to their state at the start of the current pass, the iterator is created, the batches taken
        are skipped, and the global RNG is put back as it was before ``bind``. The loader's
        generators are left as the skipping leaves them.

        Args:
            loader: a re-iterable loader (a ``DataLoader``, a list of batches, ...).

        Returns:
            None.

        Raises:
            ValueError: for a one-shot iterator (a generator, ``iter(loader)``), before anything is
                consumed, or when the loader has fewer batches than the position taken in its pass.
            TypeError: when ``loader`` is not iterable.
        """
        # not `iter(loader) is loader`: iter(DataLoader) draws a base seed (and starts workers)
        if isinstance(loader, Iterator):
            raise ValueError(
                f"{self.name} must be re-iterable (a DataLoader, a list of batches, ...): got a one-shot "
                f"{type(loader).__name__}; pass the loader itself, not iter(loader) or a generator, so that "
                "each pass can start again"
            )
        if not (hasattr(loader, "__iter__") or hasattr(loader, "__getitem__")):
            raise TypeError(f"{self.name} must be iterable: got {type(loader).__name__}")
        if loader is self._loader and not self._rebuild:
            return
        self._loader = loader
        self._it = None
        self._rebuild = False
        if self._passes == 0:
            return
        global_state = torch.get_rng_state()
        try:
            torch.set_rng_state(self._require(self._pass_cpu))
            generators = loader_generators(loader)
            for path, state in self._pass_generators.items():
                if path in generators:
                    generators[path].set_state(state)
            set_epoch(loader, self._passes - 1)
            it = iter(loader)
            for i in range(self._taken):
                try:
                    next(it)
                except StopIteration:
                    raise ValueError(
                        f"{self.name} has {i} batches in pass {self._passes}, but the saved position had taken "
                        f"{self._taken}: bind a loader built the same way"
                    ) from None
            self._it = it
        finally:
            torch.set_rng_state(global_state)

    def next(self) -> Any:
        """The next batch, starting a new pass (lazily: only now) at the end of one.

        Returns:
            The loader's next batch.

        Raises:
            RuntimeError: when no loader is bound.
            ValueError: when a pass yields no batch.
        """
        if self._loader is None or self._rebuild:
            raise RuntimeError(f"{self.name}: bind a loader before taking batches")
        loader = self._loader
        with self._on_stream():
            if self._it is not None:
                try:
                    batch = next(self._it)
                except StopIteration:
                    self._it = None
                else:
                    self._taken += 1
                    return batch
            self._pass_cpu = torch.get_rng_state()  # the stream now in place: own or global
            self._pass_generators = {path: g.get_state() for path, g in loader_generators(loader).items()}
            self._passes += 1
            self._taken = 0
            set_epoch(loader, self._passes - 1)
            self._it = iter(loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                raise ValueError(f"{self.name} yielded no batches") from None
            self._taken = 1
            return batch

    def state_dict(self) -> dict[str, Any]:
        """The position, as tensors, ints, None and plain dicts (loads with ``weights_only=True``).

        Returns:
            ``{"isolate_rng", "passes", "taken"}`` (ints), ``"pass_cpu_rng"`` (the CPU RNG state
            ``iter()`` ran on at the start of the pass: the global one, or the cursor's stream;
            None before the first pass), ``"pass_generator_rngs"`` (``{attribute path: state}`` of
            the loader's generators at the start of the pass) and ``"cpu_rng"`` (the cursor's
            stream now; None unless ``isolate_rng``).
        """
        return {
            "isolate_rng": int(self.isolate_rng),
            "passes": self._passes,
            "taken": self._taken,
            "pass_cpu_rng": None if self._pass_cpu is None else self._pass_cpu.clone(),
            "pass_generator_rngs": {path: s.clone() for path, s in self._pass_generators.items()},
            "cpu_rng": None if self._stream is None else self._stream.clone(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a position; the next :meth:`bind` rebuilds it (even with the same loader object).

        Args:
            sd: a :meth:`state_dict` of a cursor with the same ``isolate_rng``.

        Returns:
            None.

        Raises:
            ValueError: when ``sd`` comes from a cursor with another ``isolate_rng`` or is malformed.
        """
        if bool(sd["isolate_rng"]) != self.isolate_rng:
            raise ValueError(
                f"{self.name}: the state was saved with isolate_rng={bool(sd['isolate_rng'])}, "
                f"this cursor has isolate_rng={self.isolate_rng}"
            )
        passes, taken = int(sd["passes"]), int(sd["taken"])
        if passes < 0 or taken < 0 or (passes == 0) != (sd["pass_cpu_rng"] is None):
            raise ValueError(f"{self.name}: malformed cursor state (passes={passes}, taken={taken})")
        self._passes, self._taken = passes, taken
        self._pass_cpu = None if sd["pass_cpu_rng"] is None else sd["pass_cpu_rng"].clone()
        self._pass_generators = {str(p): s.clone() for p, s in sd["pass_generator_rngs"].items()}
        if self.isolate_rng:
            self._stream = sd["cpu_rng"].clone()
        self._it = None
        self._rebuild = True

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        """Swap the cursor's own CPU stream in for the block (no-op unless ``isolate_rng``)."""
        if self._stream is None:
            yield
            return
        global_state = torch.get_rng_state()
        torch.set_rng_state(self._stream)
        try:
            yield
        finally:
            self._stream = torch.get_rng_state()
            torch.set_rng_state(global_state)

    def _require(self, state: Tensor | None) -> Tensor:
        if state is None:  # passes > 0 always records the pass start
            raise RuntimeError(f"{self.name}: no RNG state recorded for the current pass")
        return state
