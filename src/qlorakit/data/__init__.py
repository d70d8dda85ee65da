"""qlorakit.data: dataset formats, prompt templates, tokenization with label masking, batching.

Read files (``readers``), validate and convert rows to canonical conversations (``formats``,
``oasst``, ``schema``), render prompts (``templates``), tokenize with loss on the answers only
(``tokenize``).
"""

from qlorakit.data.formats import FORMATS, convert_table, detect_format, load_examples
from qlorakit.data.readers import Table, read_table
from qlorakit.data.schema import Conversion, Example, Turn
from qlorakit.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, alpaca_prompt, generation_prompt, render
from qlorakit.data.tokenize import IGNORE_INDEX, TokenizedExample, TruncationStats, pack_documents, tokenize_conversations

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FORMATS", "IGNORE_INDEX", "Conversion", "Example", "Table",
    "TokenizedExample", "TruncationStats", "Turn", "alpaca_prompt", "convert_table", "detect_format",
    "generation_prompt", "load_examples", "pack_documents", "read_table", "render", "tokenize_conversations",
]
