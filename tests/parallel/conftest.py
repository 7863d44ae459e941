"""Fixtures for the parallel tests: the training tests' corpus slices."""

from tests.train.conftest import shakespeare  # noqa: F401
