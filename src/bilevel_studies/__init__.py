"""The papers' studies: thin experiment scripts on top of the ``bilevel`` library, one file per study.

One subpackage per paper -- :mod:`bilevel_studies.clarke` (Clarke et al. 2022),
:mod:`bilevel_studies.lorraine` (Lorraine et al. 2020), :mod:`bilevel_studies.vicol` (Vicol et al.
2021) -- with the helpers they share (``_common``, ``_parts``) here and the command line in
:mod:`bilevel_studies.cli` (``bilevel run NAME`` runs the module that defines ``NAME``). The
studies import the library; the library never imports them (an import-linter contract,
``lint-imports``).
"""
