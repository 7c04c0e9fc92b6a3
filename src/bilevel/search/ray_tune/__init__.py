"""Population search on Ray Tune over any trainable run: blocks of a population as trials, ASHA and PBT.

Nothing here knows what is trained. A *run* is built inside a Ray Tune function trainable by a
user-supplied factory ``factory(config) -> run`` (``config``: the trial's Ray Tune config) and
driven through a small protocol:

* :func:`run_population` -- a population of ``n`` members split into blocks of ``block_size``
  consecutive members, each block one trial; the factory builds the block's run
  (:class:`BlockRun`: ``step``, ``advance(steps)``, ``state_dict()``/``load_state_dict()``,
  ``result()``), which is checkpointed every ``checkpoint_every`` steps through ``tune.report``
  and trained to ``steps``. Returns the blocks' results in member order (:func:`merge_blocks`
  joins them). Re-running the same call restores the experiment with ``tune.Tuner.restore`` and
  resumes unfinished and errored trials from their last checkpoint; a run stopped by Ctrl-C raises
  :class:`Interrupted` (a ``KeyboardInterrupt``) naming the unfinished trials.
* :func:`run_scheduled` -- one member per trial under ASHA (``ASHAScheduler``) or PBT
  (``PopulationBasedTraining``), each trial's run (:class:`ScheduledRun`: also ``alive``,
  ``losses()``, ``hparams()`` and ``rescale(name, factor)``) reporting its losses every
  ``report_every`` steps; trials are ranked by ``metric`` (minimised).
* PBT with the ratio mutation (Clarke et al. 2022, appendix B.8.2): PBT mutates the
  hyperparameters *it* assigned to a trial, but a run that tunes its own hyperparameters online
  has since moved them. When a trial starts from a checkpoint whose recorded PBT values ``old``
  differ from the trial's config ``new``, the run's *current* values are multiplied by
  ``new / old`` (:func:`pbt_ratios`, :func:`apply_pbt_mutation`, ``run.rescale``). PBT's explored
  values are clipped into the hyperparameters' domains (:func:`clip_to_domains`) and every applied
  mutation is recorded (:func:`mutation_record`).

The factories are pickled to the workers by reference, so they must be importable there
(module-level functions); a worker-process cache (:func:`worker_cached`) lets them load data once
per worker. Ray is imported lazily (``pip install 'bilevel[ray]'``). By default a local Ray
instance with ``num_cpus`` CPUs is started (and shut down afterwards); ``address="auto"`` or
``"ray://..."`` joins an existing cluster, whose workers must be able to import the factories'
modules and read the data.

The package is one module per idea; every name is re-exported here, so ``bilevel.search.ray_tune.X``
is the public name of each:
:mod:`~bilevel.search.ray_tune.extras` (the optional Ray import), :mod:`~bilevel.search.ray_tune.runs`
(the protocols of the runs the factories build), :mod:`~bilevel.search.ray_tune.blocking` (a population's
blocks), :mod:`~bilevel.search.ray_tune.pbt` (the ratio mutation), :mod:`~bilevel.search.ray_tune.asha`
(ASHA's budget), :mod:`~bilevel.search.ray_tune.incumbents` (best loss against time),
:mod:`~bilevel.search.ray_tune.experiment` (running and restoring a Ray Tune experiment),
:mod:`~bilevel.search.ray_tune.trial` (a trial's reports and checkpoints),
:mod:`~bilevel.search.ray_tune.population` (:func:`run_population`) and
:mod:`~bilevel.search.ray_tune.scheduled` (:func:`run_scheduled`).
"""

from .asha import asha_rungs, asha_trials_for_budget
from .blocking import blocks, member_blocks, merge_blocks
from .experiment import (
    FINISHED_STATES,
    Interrupted,
    check_finished,
    fit,
    ray_session,
    trial_statuses,
    unfinished,
)
from .extras import require
from .incumbents import incumbent, plot_incumbent
from .pbt import apply_pbt_mutation, clip_to_domains, mutation_record, pbt_ratios
from .population import population_trainable, run_population
from .runs import DIVERGED, BlockRun, Rescalable, ScheduledRun, worker_cached
from .scheduled import run_scheduled, scheduled_trainable
from .trial import checkpoint_result, report, restored_state

# isort: split
# The private helpers too, by their old names: Ray Tune pickles an experiment's trainable and callbacks into
# its folder (trainable.pkl, tuner.pkl) with references to bilevel.search.ray_tune.<name>, which a restore
# unpickles; the tests replace ``_trial_id`` here (the trainables look it up on the package).
from .experiment import _CALLBACKS as _CALLBACKS
from .experiment import _config as _config
from .experiment import _keep_signal_handlers as _keep_signal_handlers
from .experiment import _notify as _notify
from .experiment import _register as _register
from .experiment import _results as _results
from .runs import _WORKER_CACHE as _WORKER_CACHE
from .trial import _named as _named
from .trial import _trial_id as _trial_id

__all__ = [
    "DIVERGED",
    "require",
    "Rescalable",
    "BlockRun",
    "ScheduledRun",
    "worker_cached",
    "blocks",
    "member_blocks",
    "merge_blocks",
    "pbt_ratios",
    "apply_pbt_mutation",
    "incumbent",
    "mutation_record",
    "clip_to_domains",
    "ray_session",
    "fit",
    "Interrupted",
    "FINISHED_STATES",
    "trial_statuses",
    "unfinished",
    "check_finished",
    "report",
    "restored_state",
    "checkpoint_result",
    "population_trainable",
    "run_population",
    "scheduled_trainable",
    "run_scheduled",
    "asha_rungs",
    "asha_trials_for_budget",
    "plot_incumbent",
]
