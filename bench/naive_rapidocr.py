"""The baseline of `imgbatch analyze --ocr`: rapidocr with its defaults, called directly
on one file after another. Prints the number of images and lines read on stderr."""

import os
import sys

from rapidocr import RapidOCR


def main(root: str) -> None:
    engine = RapidOCR()
    done = lines = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            found = engine(os.path.join(folder, name))
            lines += len(found.txts or ())
            done += 1
    print(f"naive_rapidocr: {done} images, {lines} lines", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
