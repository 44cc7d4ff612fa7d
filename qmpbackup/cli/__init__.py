"""Command-line front end: one ``<name>_cmd.py`` module per subcommand.

Nothing outside this package imports it; below ``cli`` no code sees an
``argparse.Namespace``. Each command module turns its arguments into typed
values and calls library code.
"""
