"""python -m fastdit: the fastdit command line (see fastdit/cli.py)."""
from .cli import main

if __name__ == "__main__":
    main()
