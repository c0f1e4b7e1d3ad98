"""`python cli.py ...`: the tlfeat command line from a checkout (the same app as `tlfeat` and `python -m tlfeat`)."""

from tlfeat.cli import app, main  # noqa: F401  (app: for scripts that drive the CLI in-process)

if __name__ == "__main__":
    main()
