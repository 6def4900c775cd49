"""Moved: the per-architecture tables live in ``lxt_ext.models`` (one registry, a table per library);
this module keeps the old imports working."""
from .models import KeepGradient, Options, adapter, matcher, rule_for

__all__ = ['Options', 'KeepGradient', 'adapter', 'matcher', 'rule_for']
