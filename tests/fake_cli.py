"""The real imgbatch CLI with the fake remote provider registered (for subprocess tests)."""

from tests.fakeprovider import register_fake

register_fake()

if __name__ == "__main__":  # not in the worker processes a LocalCluster spawns
    from imgbatch.cli import main

    main()
