"""The one exception type of the data pipeline.

Every message names the problem *and* the fix (which file, which flag), because these errors
surface at job start on a cluster where the person reading them did not write the code.
``DataError`` subclasses ``ValueError`` so generic callers that catch bad-input errors still work.
"""

from __future__ import annotations


class DataError(ValueError):
    """Unreadable, inconsistent or invalid input data; the message says what to change."""
