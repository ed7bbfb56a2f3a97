"""Data in: LLaVA conversation files and the messages format, read through a checkpoint's own processor;
and the embedded digit benchmark, written out in the LLaVA format."""

from moevl.data.conversations import DataError, read_records
from moevl.data.digits import write_digit_benchmark
from moevl.data.processing import ConversationCollator, ConversationDataset

__all__ = [
    "ConversationCollator",
    "ConversationDataset",
    "DataError",
    "read_records",
    "write_digit_benchmark",
]
