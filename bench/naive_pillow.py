"""The naive baseline of `imgbatch analyze --provider local`: one file after another,
`Image.open(p).convert("RGB")` (a full decode), then a resize to a long side of 768 px.
Prints the number of images done on stderr."""

import os
import sys

from PIL import Image

MAX_SIDE = 768


def main(root: str) -> None:
    done = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            with Image.open(os.path.join(folder, name)) as img:
                rgb = img.convert("RGB")
            scale = MAX_SIDE / max(rgb.size)
            if scale < 1:
                size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                rgb = rgb.resize(size, Image.Resampling.BICUBIC)
            done += 1
    print(f"naive_pillow: {done} images", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
