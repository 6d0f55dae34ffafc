"""`python -m lqer ...` is the `lqer` command."""

from lqer.cli import main

main()
