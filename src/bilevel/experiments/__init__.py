"""Thin experiment scripts on top of the library, one file per study (the library never imports them)."""
