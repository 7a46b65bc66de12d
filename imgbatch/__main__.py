"""`python -m imgbatch`."""

from imgbatch.cli import main

if __name__ == "__main__":
    main()
