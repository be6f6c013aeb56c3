"""The one family of errors earful raises for things a user can fix.

Every error that names bad input, a bad setting or a missing piece derives from `EarfulError`, so
the CLI catches one class and prints one line (no traceback), and library users can catch one
class too. Subclasses keep the builtin base they had (`ValueError`, `ImportError`) so existing
`except ValueError` code keeps working.
"""

from __future__ import annotations


class EarfulError(Exception):
    """Something earful cannot do with what it was given; the message says what and the fix."""
