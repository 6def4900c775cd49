"""Diagnostics for people porting an architecture to lxt_ext's composites, two views of one forward:

- ``audit`` (``audit.py``): which operations on the relevance path no rule covers, found from the
  autograd graph (by module, operation and source line), without computing any relevance;
- ``conservation`` (``conservation.py``): relevance in vs out of every module call, measured in one
  backward pass, naming the first module where relevance leaks, explodes or turns NaN/Inf.
"""
from .audit import LINEAR, AuditReport, Finding, UncoveredOperationError, audit, record
from .conservation import (ADDITIVE, ConservationError, ConservationReport, ModuleRelevance, conservation,
                           zeroed)

__all__ = ['LINEAR', 'Finding', 'AuditReport', 'UncoveredOperationError', 'audit', 'record',
           'ADDITIVE', 'ModuleRelevance', 'ConservationReport', 'ConservationError', 'conservation', 'zeroed']
