"""`python -m dalle_mini_impl.bench`: the speed benchmark (`speed.py`), printed as one JSON object."""

from ..errors import run_cli
from .speed import main

if __name__ == "__main__":
    run_cli(main)
