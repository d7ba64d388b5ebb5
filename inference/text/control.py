"""DeepSeek-V3.1's control tokens: their text (fullwidth ｜ U+FF5C, ▁ U+2581) and their ids, defined once.

Only the chat template's structure may produce these tokens; message content is text (see template.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
EOT = "<|EOT|>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
SEARCH_BEGIN = "<｜search▁begin｜>"
SEARCH_END = "<｜search▁end｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_END = "<｜fim▁end｜>"

# Every V3.1 control token and its id.
V31_SPECIAL_TOKENS: Mapping[int, str] = MappingProxyType({
    0: BOS,
    1: EOS,
    2: PAD,
    128796: SEARCH_BEGIN,
    128797: SEARCH_END,
    128798: THINK_BEGIN,
    128799: THINK_END,
    128800: FIM_HOLE,
    128801: FIM_BEGIN,
    128802: FIM_END,
    128803: USER,
    128804: ASSISTANT,
    128805: EOT,
    128806: TOOL_CALLS_BEGIN,
    128807: TOOL_CALLS_END,
    128808: TOOL_CALL_BEGIN,
    128809: TOOL_CALL_END,
    128810: TOOL_OUTPUTS_BEGIN,
    128811: TOOL_OUTPUTS_END,
    128812: TOOL_OUTPUT_BEGIN,
    128813: TOOL_OUTPUT_END,
    128814: TOOL_SEP,
})
# The tool-call markers an assistant turn may write, and the tool-output markers it never writes.
TOOL_CALL_MARKERS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)
TOOL_OUTPUT_MARKERS = (TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)
