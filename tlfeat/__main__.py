"""`python -m tlfeat ...` runs the command line."""

from tlfeat.cli import main

main()
