"""qlorakit.data: dataset formats, prompt templates, tokenization with label masking, batching.

Read files (``readers``), validate and convert rows to canonical conversations (``formats``,
``oasst``, ``schema``).
"""

from qlorakit.data.formats import FORMATS, convert_table, detect_format, load_examples
from qlorakit.data.readers import Table, read_table
from qlorakit.data.schema import Conversion, Example, Turn

__all__ = ["FORMATS", "Conversion", "Example", "Table", "Turn", "convert_table", "detect_format", "load_examples", "read_table"]
