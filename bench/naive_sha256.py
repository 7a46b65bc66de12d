"""The naive baseline: os.walk + hashlib.sha256 of each file read whole, sha256sum-style."""

import hashlib
import os
import sys


def main(root: str) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            print(f"{digest}  {path}")


if __name__ == "__main__":
    main(sys.argv[1])
