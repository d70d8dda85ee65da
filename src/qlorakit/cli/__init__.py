"""Command-line interface: thin argument parsing that calls into the library.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the module sets the
parser's ``func`` default to its handler. ``qlorakit.cli.main`` lists the subcommand modules.
"""
