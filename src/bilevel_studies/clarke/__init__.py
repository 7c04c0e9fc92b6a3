"""Clarke et al. (2022), "Scalable one-pass optimisation of high-dimensional weight-update hyperparameters
by implicit differentiation": the random-initialisation studies (``clarke``, ``sensitivity``, the README's
``demo``), the ASHA/PBT (``asha-pbt``) and Bayesian-optimisation (``bayesopt``) baselines, and
:mod:`~bilevel_studies.clarke.search`, which plugs this problem into the generic :mod:`bilevel.search`."""
