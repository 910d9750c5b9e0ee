"""`python -m bpseval` runs the command line."""

from bpseval.cli import main

main()
