"""The real imgbatch CLI with the fake remote provider registered (for subprocess tests)."""

from tests.fakeprovider import register_fake

register_fake()

from imgbatch.cli import main  # noqa: E402

main()
