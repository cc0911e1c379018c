"""The DCGAN's spatial layout for an image size: plain arithmetic, shared by the model
section's validation and the networks."""

from __future__ import annotations


def dcgan_layout(image_size: int) -> tuple[int, int]:
    """(base size, number of doublings) of a DCGAN for `image_size`: 28 = 7 -> 14 -> 28."""
    depth = 0
    while image_size % (2 ** (depth + 1)) == 0 and image_size // 2 ** (depth + 1) >= 4:
        depth += 1
    if depth == 0:
        raise ValueError(f"{image_size} cannot be reached by doubling from 4..7 pixels "
                         "(use a multiple of 8, or 28)")
    return image_size // 2**depth, depth
