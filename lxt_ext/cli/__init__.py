"""``lxt-ext <command>`` (also ``python -m lxt_ext <command>``). Each command is a module of this package
with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit status``; nothing is downloaded."""
import argparse
import importlib

COMMANDS = {
    'demo': 'lxt_ext.cli.demo',
    'explain': 'lxt_ext.cli.explain',
    'explain-text': 'lxt_ext.cli.explain_text',
    'evaluate': 'lxt_ext.cli.evaluate',
    'check': 'lxt_ext.cli.check',
    'concepts': 'lxt_ext.cli.concepts',
    'references': 'lxt_ext.cli.references',
}


def parser():
    parser = argparse.ArgumentParser(prog='lxt-ext', description='Layer-wise Relevance Propagation with lxt_ext')
    commands = parser.add_subparsers(dest='command', required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = commands.add_parser(name, help=module.HELP, description=module.HELP,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    return args.run(args)
