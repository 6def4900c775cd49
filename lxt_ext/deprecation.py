"""Renamed keywords keep their old spelling for a while, with a DeprecationWarning."""
import warnings


def renamed_keyword(old_value, old_name, new_value, new_name, default):
    """The value of a keyword renamed from ``old_name`` to ``new_name`` (``old_value`` is None unless the
    caller used the old spelling; ``default`` is the new keyword's default)."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise TypeError(f'got both {old_name!r} and {new_name!r}; {old_name!r} is the old name of {new_name!r}')
    warnings.warn(f'the keyword {old_name!r} is now called {new_name!r}', DeprecationWarning, stacklevel=3)
    return old_value
