"""The data tests' fixtures, defined with their builders in tests/fixtures/records.py."""

from tests.fixtures.records import checkpoints, llava_file  # noqa: F401  (pytest takes fixtures from here)
