"""Whose work this thread (or task) does: the pod namespace of the Mount it serves.

What one namespace's work may hold of what the node shares (circuit breakers, name lookups
in flight) is counted against it, so that one team cannot take another's. The dispatcher
sets it around a Mount, the revocation sweep around a namespace's turn; it is "" for work
outside a Mount (the check tool).
"""

from __future__ import annotations

import contextvars

TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
