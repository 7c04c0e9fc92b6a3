"""Tests of the papers' studies (bilevel_studies): one file per study group; the library's own tests are in tests/."""
