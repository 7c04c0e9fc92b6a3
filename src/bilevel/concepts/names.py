"""The names of the solution concepts and hypergradient methods (Vicol et al. 2021), and their aliases.

Concepts and methods are looked up by :func:`canonical_concept` and :func:`canonical_method`
(case-insensitive, ``_`` or spaces for ``-``); see :mod:`bilevel.concepts` for the list.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = [
    "MethodName",
    "ConceptName",
    "METHODS",
    "CONCEPTS",
    "CONCEPT_ALIASES",
    "METHOD_ALIASES",
    "IFT_ALIASES",
    "TABLE1_RESPONSE",
    "normalise",
    "canonical_concept",
    "canonical_method",
]

MethodName = Literal["unroll", "neumann", "proximal"]
ConceptName = Literal["cold", "warm-full", "warm-partial"]

METHODS: tuple[str, ...] = ("unroll", "neumann", "proximal")
CONCEPTS: tuple[str, ...] = ("cold", "warm-full", "warm-partial")

#: alias -> canonical concept name (keys normalised: lower case, ``-`` for ``_`` and spaces)
CONCEPT_ALIASES: dict[str, str] = {
    "cold": "cold",
    "cold-start": "cold",
    "warm-full": "warm-full",
    "warm-start-full": "warm-full",
    "warm-full-start": "warm-full",
    "warm-partial": "warm-partial",
    "warm-start-partial": "warm-partial",
    "warm-partial-start": "warm-partial",
    "warm-start": "warm-partial",
    "warm": "warm-partial",
    "online": "warm-partial",
}
#: alias -> canonical method name; the :data:`IFT_ALIASES` also fix eps = 0 and the dense solve
METHOD_ALIASES: dict[str, str] = {
    "unroll": "unroll",
    "unrolling": "unroll",
    "unrolled": "unroll",
    "neumann": "neumann",
    "neumann-series": "neumann",
    "proximal": "proximal",
    "prox": "proximal",
    "implicit": "proximal",
    "ift": "proximal",
    "exact": "proximal",
    "min-norm": "proximal",
}
IFT_ALIASES: frozenset[str] = frozenset({"implicit", "ift", "exact", "min-norm"})

#: Table 1's response Jacobian of each concept (see :meth:`Concept.response_method`)
TABLE1_RESPONSE: dict[str, str] = {
    "cold": "min-norm exact IFT: -(d2f/dy2)^+ d2f/dydx, method('implicit')",
    "warm-full": "min-norm exact IFT: -(d2f/dy2)^+ d2f/dydx, method('implicit')",
    "warm-partial": "proximal: -(d2f/dy2 + eps I)^-1 d2f/dydx, eps = 1 / (inner_steps * inner_lr), "
    "method('proximal', eps=eps)",
}


def normalise(name: Any) -> str:
    """The lookup key of a name: lower case, ``-`` for ``_`` and runs of spaces (``"Cold_Start"`` -> ``"cold-start"``).

    Args:
        name: a concept or method name (anything with a ``str``).

    Returns:
        The normalised key of :data:`CONCEPT_ALIASES` / :data:`METHOD_ALIASES`.
    """
    return "-".join(str(name).strip().lower().replace("_", "-").split())


def canonical_method(name: str) -> str:
    """The canonical method name (``unroll``, ``neumann``, ``proximal``) of ``name`` or one of its aliases
    (:data:`METHOD_ALIASES`; ``implicit``/``ift`` -> ``proximal``, with eps = 0 fixed by :func:`method`).

    Args:
        name: a method name or alias (case-insensitive; ``_`` or spaces for ``-``).

    Returns:
        ``"unroll"``, ``"neumann"`` or ``"proximal"``.

    Raises:
        ValueError: when ``name`` is neither a method nor an alias.
    """
    key = normalise(name)
    if key not in METHOD_ALIASES:
        raise ValueError(
            f"unknown hypergradient method {name!r}; known: {', '.join(METHODS)} "
            f"(aliases: {', '.join(k for k in METHOD_ALIASES if k not in METHODS)})"
        )
    return METHOD_ALIASES[key]


def canonical_concept(name: str) -> str:
    """The canonical concept name (``cold``, ``warm-full``, ``warm-partial``) of ``name`` or an alias
    (:data:`CONCEPT_ALIASES`; ``warm-start`` is ``warm-partial``, the online setting).

    Args:
        name: a concept name or alias (case-insensitive; ``_`` or spaces for ``-``).

    Returns:
        ``"cold"``, ``"warm-full"`` or ``"warm-partial"``.

    Raises:
        ValueError: when ``name`` is neither a concept nor an alias.
    """
    key = normalise(name)
    if key not in CONCEPT_ALIASES:
        raise ValueError(
            f"unknown solution concept {name!r}; known: {', '.join(CONCEPTS)} "
            f"(aliases: {', '.join(k for k in CONCEPT_ALIASES if k not in CONCEPTS)})"
        )
    return CONCEPT_ALIASES[key]
