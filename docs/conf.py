"""Sphinx configuration of lxt_ext's documentation.

The API reference is generated here, at every build, from the ``__all__`` lists of the package, so a
name added to (or moved between) modules appears in the reference without editing a page by hand:
``docs/api/generated/`` is written before Sphinx reads the sources (it is not kept in git).
"""
import ast
import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

# The examples run on the CPU with the embedded model; the OpenMP threads of a shared CI machine sleep
# when idle instead of spinning (python/training/train_default_model.py explains why).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
# Nothing the examples do may reach a model hub.
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import lxt_ext  # noqa: E402

project = 'lxt_ext'
author = 'the lxt_ext authors'
copyright = '2026, the lxt_ext authors'
release = lxt_ext.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.doctest',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
    'numpydoc',
    'myst_parser',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
exclude_patterns = ['_build']
html_theme = 'furo'
html_title = f'lxt_ext {release}'
myst_enable_extensions = ['colon_fence', 'dollarmath']
myst_heading_anchors = 3

autodoc_default_options = {'members': False}
autodoc_typehints = 'none'
autodoc_member_order = 'bysource'
autodoc_mock_imports = []

# numpydoc: Parameters and Returns sections are checked on every documented object (a parameter missing, one
# documented that the signature lacks, no Returns section); a finding is a
# warning, which the CI build (-W) turns into an error.
numpydoc_show_class_members = False
numpydoc_validation_checks = {'PR01', 'PR02', 'RT01'}
# Objects whose docstrings the restructuring of issue 20 is still completing (docs/validation_pending.txt,
# qualified names without the module, so an object keeps its entry when it moves): each is checked again as
# soon as it leaves the list. LXT_EXT_DOCS_VALIDATE_ALL=1 checks them too, to list what is left.
_PENDING = [line.split('#')[0].strip() for line in (DOCS / 'validation_pending.txt').read_text().splitlines()]
numpydoc_validation_exclude = set() if os.environ.get('LXT_EXT_DOCS_VALIDATE_ALL') else {
    r'(^|\.)' + name.replace('.', r'\.') + '$' for name in _PENDING if name}

# sphinx.ext.doctest: every example block of the pages runs (`-b doctest`), on the CPU, with nothing downloaded.
doctest_global_setup = '''
import os, tempfile
import torch
torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))
'''
doctest_default_flags = (__import__('doctest').ELLIPSIS | __import__('doctest').NORMALIZE_WHITESPACE)

# -- the API reference -------------------------------------------------------------------------------------

# Compatibility modules of the earlier layout (removed in 0.3.0): not part of the documented API. (The
# benchmark helpers, once lxt_ext.benchmark, left the package for python/benchmarks/harness.)
EXCLUDED = {
    'lxt_ext.huggingface', 'lxt_ext.timm_models', 'lxt_ext.adapters', 'lxt_ext.transformer_composites',
    'lxt_ext.transformer_rules', 'lxt_ext.sample', 'lxt_ext.deprecation',
    'lxt_ext.__main__',
}
# Modules without an ``__all__`` that the package's own ``__all__`` names: their public names are the
# documented ones.
PUBLIC_WITHOUT_ALL = {'lxt_ext.attention', 'lxt_ext.attribution'}


def _excluded(name):
    return any(name == e or name.startswith(e + '.') for e in EXCLUDED)


def _defined_here(module):
    """The names a module's own source binds at top level (def, class, assignment), not imports."""
    path = getattr(module, '__file__', None)
    if not path or not path.endswith('.py'):
        return set()
    names = set()
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _public_modules():
    """{module name: its public names} for every documented module of the package."""
    modules = {'lxt_ext': lxt_ext}
    for info in pkgutil.walk_packages(lxt_ext.__path__, 'lxt_ext.'):
        if _excluded(info.name):
            continue
        try:
            modules[info.name] = importlib.import_module(info.name)
        except ImportError as error:  # an optional dependency (bitsandbytes, ...) missing here
            print(f'docs: not documenting {info.name}: {error}')
    public = {}
    for name, module in sorted(modules.items()):
        if hasattr(module, '__all__'):
            public[name] = list(module.__all__)
        elif name in PUBLIC_WITHOUT_ALL:
            public[name] = sorted(n for n in _defined_here(module) if not n.startswith('_'))
    return modules, public


def _directive(obj):
    import inspect
    if inspect.isclass(obj):
        return 'autoclass', ['   :members:', '   :show-inheritance:']
    if inspect.isroutine(obj):
        return 'autofunction', []
    # constants show their value, except the paths of this checkout
    return 'autodata', ['   :no-value:'] if isinstance(obj, str) and os.path.isabs(obj) else []


def _write_api():
    import inspect
    modules, public = _public_modules()
    out = DOCS / 'api' / 'generated'
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob('*.rst'):
        old.unlink()
    # Where each object is documented: the module whose source defines it, if that module is documented;
    # else the exporting module nearest to where it is defined (lxt_ext.job for lxt_ext.job.settings), else
    # the first that exports it.
    home = {}
    for name in public:
        defined = _defined_here(modules[name])
        for item in public[name]:
            if item in defined:
                home.setdefault(id(getattr(modules[name], item, None)), (name, item))

    def nearness(name, obj):
        origin = getattr(obj, '__module__', None) or ''
        return len(name) if origin == name or origin.startswith(name + '.') else -1

    exporters = {}
    for name in public:
        for item in public[name]:
            obj = getattr(modules[name], item, None)
            if obj is not None and not inspect.ismodule(obj):
                exporters.setdefault(id(obj), []).append((nearness(name, obj), name, item))
    for key, candidates in exporters.items():
        best = max(candidates, key=lambda c: c[0])  # max keeps the first of equals
        home.setdefault(key, best[1:])
    for name, names in public.items():
        module = modules[name]
        title = f'``{name}``'
        lines = [title, '=' * len(title), '', f'.. automodule:: {name}', '   :no-members:', '']
        documented, elsewhere, submodules = [], [], []
        for item in names:
            if not hasattr(module, item):  # `from module import *` would fail the same way
                raise AttributeError(f'{name}.__all__ names {item!r}, which the module does not have')
            obj = getattr(module, item)
            if inspect.ismodule(obj):
                submodules.append(obj.__name__)
            elif home[id(obj)] == (name, item):
                documented.append((item, obj))
            else:
                elsewhere.append((item, home[id(obj)]))
        if submodules:
            lines += ['Modules', '-------', '']
            lines += [f'- :doc:`{m}`' for m in submodules if m in public] + ['']
        for item, obj in documented:
            directive, options = _directive(obj)
            lines += [f'.. {directive}:: {name}.{item}', *options, '']
            if directive == 'autodata':  # a constant or an instance: no signature for PR01/RT01 to check
                numpydoc_validation_exclude.add('^' + re.escape(f'{name}.{item}') + '$')
        if elsewhere:
            lines += ['Also exported here', '------------------', '']
            lines += [f'- ``{item}``: :py:obj:`{where}.{real}`' for item, (where, real) in elsewhere] + ['']
        (out / f'{name}.rst').write_text('\n'.join(lines))
    _write_cli(out)
    index = ['API reference', '=============', '',
             'Every name in the ``__all__`` list of a public module, one page per module (generated from the',
             'docstrings when the site builds), and the command line.', '', '.. toctree::', '   :maxdepth: 1', '',
             '   cli']
    index += [f'   {name}' for name in public]
    (out / 'index.rst').write_text('\n'.join(index) + '\n')



def _write_cli(out):
    """The ``--help`` of ``lxt-ext`` and of each of its commands, as argparse prints them."""
    import argparse
    from lxt_ext import cli

    os.environ['COLUMNS'] = '110'  # argparse wraps at the terminal's width: the same on every machine
    top = cli.parser()
    lines = ['Command line: ``lxt-ext``', '=========================', '',
             '``lxt-ext <command>`` (or ``python -m lxt_ext <command>``); generated from the parser when the site',
             'builds.', '']
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in [('lxt-ext', top), *commands.choices.items()]:
        title = f'``{name}``' if name == 'lxt-ext' else f'``lxt-ext {name}``'
        lines += [title, '-' * len(title), '', '.. code-block:: text', '']
        lines += ['   ' + line if line else '' for line in parser.format_help().splitlines()] + ['']
    (out / 'cli.rst').write_text('\n'.join(lines))


_write_api()
