"""Run the bpseval command line from a checkout: `python cli.py compute runs/exp1`."""

from bpseval.cli import main

if __name__ == "__main__":
    main()
