"""What ``lxt_ext.diagnostics.conservation`` reports: relevance in vs out per module (``ModuleRelevance``), the
table of a whole model (``ConservationReport``), and the error that names the first module with a problem."""
import dataclasses
import math

__all__ = ['PROBLEMS', 'ModuleRelevance', 'ConservationReport', 'ConservationError']

PROBLEMS = ('nan in forward', 'nan', 'explodes', 'leaks')


@dataclasses.dataclass
class ModuleRelevance:
    """One module's relevance, summed over its calls: ``r_out``/``r_in`` (signed sums), ``abs_out``/
    ``abs_in`` (sums of ``|r|``), ``leak = r_in - r_out``, ``own`` (its leak less its children's), ``status``
    (``'ok'``, ``'attnlrp'``, ``'nan received'``, ``'not reached'`` (the pass stopped before), or one of
    ``PROBLEMS``), ``explicit`` (its input
    relevance was read in zennit's explicit convention) and ``children`` (how many of the modules inside
    it were called).

    Parameters
    ----------
    name : str
        The module's dotted name (``''``: the model).
    type : str
        Its class name.
    calls : int
        How many times it was called.
    r_out, r_in : float
        The signed relevance of its outputs and inputs, summed over the calls.
    abs_out, abs_in : float
        The sums of ``|r|`` of its outputs and inputs.
    leak : float
        ``r_in - r_out``.
    own : float
        Its leak less its children's: what its own code loses or creates.
    status : str
        ``'ok'``, ``'attnlrp'``, ``'nan received'``, ``'not reached'``, or one of ``PROBLEMS``.
    explicit : bool
        Whether its input relevance was read in zennit's explicit convention.
    attnlrp : bool
        Whether it is an attention module under AttnLRP (its own leak is by design).
    finite_out, finite_in : bool
        Whether the relevance of its outputs and inputs was finite.
    forward_nan : bool
        Whether its forward output turned NaN/Inf from finite inputs.
    reached, reached_in : bool
        Whether relevance reached its outputs, and its inputs, in backward.
    children : int
        How many modules inside it were called.
    eps : float
        The machine epsilon of the relevance's dtype (the rounding term of the tolerance).
    order : int
        The order of its first call in forward.
    completed : int
        The order in which its forward calls completed (children before parents; -1: never).
    """
    name: str
    type: str
    calls: int = 0
    r_out: float = 0.
    r_in: float = 0.
    abs_out: float = 0.
    abs_in: float = 0.
    leak: float = 0.
    own: float = 0.
    status: str = 'ok'
    explicit: bool = False
    attnlrp: bool = False
    finite_out: bool = True
    finite_in: bool = True
    forward_nan: bool = False
    reached: bool = False
    reached_in: bool = False
    children: int = 0
    eps: float = 0.
    order: int = 0
    completed: int = -1

    @property
    def label(self):
        return self.name or '(model)'


class ConservationError(AssertionError):
    """Relevance leaks, explodes or turns NaN/Inf in a module (``report.first`` names it).

    Parameters
    ----------
    report : ConservationReport
        The check's result (kept as ``.report``; the message is its summary).
    """

    def __init__(self, report):
        super().__init__(report.summary())
        self.report = report


@dataclasses.dataclass
class ConservationReport:
    """``modules``: every module on the relevance path in backward order (see the module doc);
    ``output_relevance``: the relevance of the explained output; ``first``: the first module with a
    problem, or None; ``zeroed``: the names of the constants zeroed for the check; ``stopped``: the
    error that ended the forward or backward pass early (lxt_ext's NaN/Inf checks), or None.

    Parameters
    ----------
    modules : list of ModuleRelevance
        Every module on the relevance path, in backward order.
    output_relevance : float
        The relevance of the explained output.
    first : ModuleRelevance or None
        The first module with a problem.
    zeroed : list of str
        The names of the parameters and buffers zeroed for the check.
    stopped : str, optional
        The error that ended the pass early, or None.
    rtol : float, optional
        The leak allowed per module, relative (as given to ``conservation``).
    """
    modules: list
    output_relevance: float
    first: object
    zeroed: list
    stopped: str = None
    rtol: float = 0.

    def __getitem__(self, name):
        return next(m for m in self.modules if m.name == name)

    @property
    def input_relevance(self):
        """The relevance reaching the model's input (the model's own R_in)."""
        root = next((m for m in self.modules if m.name == ''), None)
        return None if root is None else root.r_in

    def summary(self):
        if self.first is None:
            head = (f'relevance is conserved in all {len(self.modules)} modules on the relevance path '
                    f'(rtol {self.rtol:g}; output relevance {self.output_relevance:.6g})')
        else:
            m = self.first
            what = {
                'nan in forward': 'its output turned NaN/Inf in the forward pass from finite inputs',
                'nan': 'the relevance it passes back holds NaN/Inf although the relevance arriving is finite',
                'explodes': f'sum |R_in| = {m.abs_in:.4g} from sum |R_out| = {m.abs_out:.4g}',
                'leaks': f'R_in = {m.r_in:.6g} vs R_out = {m.r_out:.6g}; ' + (
                    f'{m.own:+.4g} not explained by its children: its own code leaks (a functional non-linear '
                    f'operation, see lxt_ext.diagnostics.audit, or an added constant such as a bias or a position '
                    f'embedding, see zero_bias)' if m.children else
                    f'its rule (or, without one, its plain gradient) does not conserve'
                    + (f' ({abs(m.leak / m.r_out):.2%} of R_out; an epsilon rule absorbs about eps / |z| by design)'
                       if m.r_out else '')),
            }[m.status]
            head = (f'relevance {m.status} first (in backward order, from the output towards the input) at '
                    f'{m.label} ({m.type}): {what}')
        attnlrp = [m for m in self.modules if m.status == 'attnlrp']
        if attnlrp:
            head += (f'\n{len(attnlrp)} attention module(s) under AttnLRP, whose softmax rule does not conserve by '
                     f'design, are not counted (own leak {sum(m.own for m in attnlrp):+.4g}); check with '
                     f"attention='cp' for a strict test")
        if self.stopped:
            head += f'\nthe pass stopped early: {self.stopped}'
        return head

    def table(self):
        """A plain-text table of every module, in backward order."""
        rows = [('module', 'type', 'R_out', 'R_in', 'leak', 'own', '|R_in|/|R_out|', 'status')]
        for m in self.modules:
            ratio = m.abs_in / m.abs_out if m.abs_out else math.inf if m.abs_in else 1.
            status = m.status + (' (explicit)' if m.explicit else '')
            rows.append((m.label, m.type, f'{m.r_out:.6g}', f'{m.r_in:.6g}', f'{m.leak:+.3g}', f'{m.own:+.3g}',
                         f'{ratio:.3g}', status + (' <- first' if m is self.first else '')))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

    def __str__(self):
        return f'{self.table()}\n{self.summary()}'

    def check(self):
        """Raise ``ConservationError`` naming the first module with a problem; return the report otherwise."""
        if self.first is not None:
            raise ConservationError(self)
        return self
