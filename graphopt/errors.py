"""Errors a user can act on. The CLI prints them on one line and exits with code 2."""

from __future__ import annotations


class GraphoptError(Exception):
    """A user-facing failure: bad input, unsupported model, failed validation."""


class UnsupportedModelError(GraphoptError):
    """The checkpoint's architecture has no family adapter."""


class ValidationError(GraphoptError):
    """An exported or rewritten model does not compute what its reference computes."""
