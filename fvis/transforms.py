"""Transformation robustness: random, differentiable image transforms.

A transform is a pure function `(key, image) -> image` for ONE image (H, W, C);
`compose` chains them, splitting the key so each gets its own stream. The render
loop folds the step number into each image's key, so draws differ per image and
per step (Mordvintsev et al., Distill 2018, "Differentiable Image Parameterizations").
"""

import jax


def identity():
    """The transform that returns the image unchanged (the reference's setting)."""
    return lambda key, image: image


def compose(transforms=()):
    """Chains transforms left to right, each with its own key.

    Args:
        transforms: sequence of `(key, image) -> image` functions.
    """
    transforms = tuple(transforms)
    if not transforms:
        return identity()

    def apply(key, image):
        for transform, subkey in zip(transforms, jax.random.split(key, len(transforms))):
            image = transform(subkey, image)
        return image

    return apply
