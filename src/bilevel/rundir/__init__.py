"""Run directories: crash-safe files, plain checkpoints, one run per directory, resume checks.

The experiment infrastructure every study's output directory (``--out``) goes through; nothing of the
hyperparameter-optimisation core depends on it.

* **Atomic writes** (:func:`atomic_write`, :func:`atomic_save`, :func:`atomic_write_text`,
  :func:`atomic_write_json`, :func:`atomic_savefig`): the file is written under a unique temporary
  name in the same folder (``tempfile.mkstemp``), flushed to disk and renamed into place
  (``os.replace``), so an interrupted run never leaves a truncated checkpoint, result or figure, and
  two writers never share a temporary file.
* **Plain checkpoints** (:func:`atomic_save`, :func:`load_torch_state`, :func:`check_plain`): a torch
  checkpoint holds only plain data (tensors, dicts, lists, tuples, numbers, strings, ``None``: see
  :func:`check_plain`), checked when it is saved, and is read back with ``torch.load(...,
  weights_only=True)``, so a tampered run directory cannot run code when a run resumes from it.
* **Damaged state files** (:func:`read_json_state`, :func:`load_torch_state`, :func:`set_aside`): a
  file that cannot be read back (truncated, not JSON, or a checkpoint ``weights_only=True`` refuses)
  is renamed to ``NAME.corrupt-<timestamp>`` (never deleted), named in one line of a
  :class:`DamagedFileWarning`, and treated as absent, so the caller recomputes it from the last good
  state.
* **Run directories** (:func:`run_directory`): one run at a time per output directory (an exclusive
  ``filelock`` lock on ``OUT/.lock``; the holder's pid, host and command in ``OUT/.lock.owner``), stale
  temporary files of killed runs swept away, and a run that fails before writing any result leaves the
  directory as it found it.
* **Resume checks** (:func:`check_run_config`, :func:`save_run_config`): refuse to resume a directory
  that holds a run with another configuration.

Testing hook: ``BILEVEL_FAULT_INJECT`` makes the atomic writer misbehave on purpose, for the
fault-injection tests (``tests/studies/test_fault_injection.py``):
``kill-in-write:N[:GLOB]`` -- during the N-th atomic write (counted in this process, only paths whose
name matches ``GLOB`` if given) truncate the temporary file to half its size and ``SIGKILL`` the process;
``sleep-in-write:SECONDS[:GLOB]`` -- sleep between writing the temporary file and renaming it.
Several specs may be given, separated by commas.

The package is one module per idea; every name is re-exported here, so ``bilevel.rundir.X`` is the
public name of each: :mod:`bilevel.rundir.atomic` (atomic writes), :mod:`bilevel.rundir.checkpoints`
(plain checkpoints), :mod:`bilevel.rundir.damaged` (damaged state files), :mod:`bilevel.rundir.resume`
(resume checks), :mod:`bilevel.rundir.directory` (run directories and their lock) and
:mod:`bilevel.rundir.faults` (the testing hook).
"""

import time as time  # ``bilevel.rundir.time``: the fault-injection test replaces ``time.sleep`` through it

from .atomic import TMP_SUFFIX, atomic_savefig, atomic_write, atomic_write_json, atomic_write_text
from .checkpoints import atomic_save, check_plain, load_torch_state
from .damaged import DamagedFileWarning, read_json_state, set_aside
from .directory import LOCK_NAME, OWNER_NAME, SETTINGS_FILES, RunLocked, run_directory
from .faults import FAULT_ENV as FAULT_ENV  # the testing hook's variable and counts (tests use both)
from .faults import _writes as _writes
from .resume import check_run_config, save_run_config

__all__ = [
    "atomic_write",
    "atomic_save",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_savefig",
    "check_plain",
    "check_run_config",
    "SETTINGS_FILES",
    "save_run_config",
    "read_json_state",
    "load_torch_state",
    "set_aside",
    "DamagedFileWarning",
    "RunLocked",
    "run_directory",
    "TMP_SUFFIX",
    "LOCK_NAME",
    "OWNER_NAME",
]
