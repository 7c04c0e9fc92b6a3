"""Clarke et al. (2022), "Scalable one-pass optimisation of high-dimensional weight-update hyperparameters
by implicit differentiation": the random-initialisation studies (``clarke``, ``sensitivity``, the README's
``demo``), the ASHA/PBT (``asha-pbt``) and Bayesian-optimisation (``bayesopt``) baselines, and
:mod:`~bilevel_studies.clarke.search`, which plugs this problem into the generic :mod:`bilevel.search`.

The ``clarke`` experiment is split by idea, from the bottom up: ``config`` (methods, configuration and its
checks), ``problem`` (data, models, losses, samplers), ``methods`` (a method's population and its results),
``search`` (those populations as Ray Tune / ASHA / PBT / Bayesian-optimisation runs), ``running`` (the whole
experiment into a run directory) and ``reporting``; ``clarke`` is the command (``bilevel run clarke``)."""
