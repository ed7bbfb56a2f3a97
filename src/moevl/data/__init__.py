"""Data in: LLaVA conversation files and the messages format, read through a checkpoint's own processor;
and the embedded digit benchmark, written out in the LLaVA format."""

from moevl._deprecated import moved_names
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

#: Names this package exported before issue 25 cut its surface -> their module (one release, with a warning).
__getattr__ = moved_names(
    __name__,
    {
        **{n: "moevl.data.conversations" for n in ("ImageRef", "Record", "RecordSet")},
        **{n: "moevl.data.conversations" for n in ("last_assistant_text", "prompt_messages")},
        **{n: "moevl.data.digits" for n in ("BenchmarkConfig", "DigitFiles")},
        **{n: "moevl.data.processing" for n in ("GenerationCollator", "vision_token_ids")},
    },
)
