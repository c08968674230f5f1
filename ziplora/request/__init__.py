"""The requests every face builds: declared once (``fields``), checked once (``options``), offered on the command
line (``flags``), the API (``MergeRequest.from_dict``) and the tab (``ziplora.ui.controls``) from that declaration."""

from __future__ import annotations

from ziplora.request.fields import FORMS, INPUT_KINDS, METHODS, PRECISIONS, MergeRequest, ReexportRequest
from ziplora.request.options import FACES, Option, check_number, check_value, options
from ziplora.request.output_name import check_output_name

__all__ = [
    "MergeRequest",
    "ReexportRequest",
    "Option",
    "options",
    "check_value",
    "check_number",
    "check_output_name",
    "FACES",
    "METHODS",
    "PRECISIONS",
    "FORMS",
    "INPUT_KINDS",
]
