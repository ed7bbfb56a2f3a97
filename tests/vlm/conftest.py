"""The vlm tests' fixtures, defined with their builders in tests/fixtures/demo.py."""

from tests.fixtures.demo import demo, dense  # noqa: F401  (pytest takes fixtures from here)
