"""`python -m imgbatch`."""

from imgbatch.cli import main

main()
