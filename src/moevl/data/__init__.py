"""Data in: LLaVA conversation files and the messages format, read through a checkpoint's own processor;
and the embedded digit benchmark, written out in the LLaVA format."""

from moevl.data.conversations import (
    DataError,
    ImageRef,
    Record,
    RecordSet,
    last_assistant_text,
    prompt_messages,
    read_records,
)
from moevl.data.digits import BenchmarkConfig, DigitFiles, write_digit_benchmark
from moevl.data.processing import (
    ConversationCollator,
    ConversationDataset,
    GenerationCollator,
    vision_token_ids,
)

__all__ = [
    "BenchmarkConfig",
    "ConversationCollator",
    "ConversationDataset",
    "DataError",
    "DigitFiles",
    "GenerationCollator",
    "ImageRef",
    "Record",
    "RecordSet",
    "last_assistant_text",
    "prompt_messages",
    "read_records",
    "vision_token_ids",
    "write_digit_benchmark",
]
