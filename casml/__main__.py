"""Run the ``casml`` command as ``python -m casml``."""

from casml.cli import main

if __name__ == "__main__":
    main()
