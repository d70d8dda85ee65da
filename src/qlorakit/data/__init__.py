"""qlorakit.data: dataset formats, prompt templates, tokenization with label masking, batching.

Read files (``readers``), validate and convert rows to canonical conversations (``formats``,
``oasst``, ``schema``), render prompts (``templates``), tokenize with loss on the answers only
(``tokenize``), and batch (``batching``); ``build_datasets`` wires them (``dataset``).
"""

from qlorakit.data.batching import batch_order, collate, collate_fn, pad_id_of
from qlorakit.data.dataset import (
    DataSummary,
    TokenizedDataset,
    build_datasets,
    default_sample_path,
    split_indices,
)
from qlorakit.data.formats import FORMATS, convert_table, detect_format, load_examples
from qlorakit.data.readers import Table, read_table
from qlorakit.data.schema import Conversion, Example, Turn
from qlorakit.data.templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    alpaca_prompt,
    generation_prompt,
    render,
)
from qlorakit.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    TruncationStats,
    pack_documents,
    tokenize_conversations,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "FORMATS",
    "IGNORE_INDEX",
    "Conversion",
    "DataSummary",
    "Example",
    "Table",
    "TokenizedDataset",
    "TokenizedExample",
    "TruncationStats",
    "Turn",
    "alpaca_prompt",
    "batch_order",
    "build_datasets",
    "collate",
    "collate_fn",
    "convert_table",
    "default_sample_path",
    "detect_format",
    "generation_prompt",
    "load_examples",
    "pack_documents",
    "pad_id_of",
    "read_table",
    "render",
    "split_indices",
    "tokenize_conversations",
]
