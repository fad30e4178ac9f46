"""FFT cross-correlation of images with centred templates.

For an image (H, W) and a template (h, w) whose centre is the pixel (h // 2, w // 2),

    cc[y, x] = Σ_{dy, dx} image[(y + dy) mod H, (x + dx) mod W] · template[h//2 + dy, w//2 + dx],

the sum running over the template's pixels: the template laid with its centre on
(y, x). A copy of the template centred at (y0, x0) in the image gives the peak at
(y0, x0); positions are circular (a template hanging over an edge wraps around).

In Fourier space cc = IFFT(I · conj(T)) with I the image's transform and T the
centred transform (`engine.fourier.centred_rfftn`) of the template zero-padded to
the image size with its centre on (H // 2, W // 2) (`template_transform`). The
image transform does not depend on the template, so a 2DTM search computes it once
(`image_transform`) and calls `correlate_transforms` for batch after batch of templates.
"""

from __future__ import annotations

import torch

from cryorefine.engine.fourier import centred_irfftn, centred_rfftn


def pad_template(templates: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad templates to the image size, keeping their centre on the box origin.

    Args:
        templates: real (..., h, w), centre at (h // 2, w // 2); h ≤ H, w ≤ W.
        image_shape: (H, W).

    Returns:
        real (..., H, W) with templates[..., h // 2, w // 2] at (H // 2, W // 2).
    """
    h, w = templates.shape[-2:]
    H, W = image_shape
    if h > H or w > W:
        raise ValueError(f"template of shape ({h}, {w}) is larger than the image {image_shape}")
    top, left = H // 2 - h // 2, W // 2 - w // 2
    padded = templates.new_zeros(*templates.shape[:-2], H, W)
    padded[..., top : top + h, left : left + w] = templates
    return padded


def template_transform(templates: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
    """Centred half transform of templates padded to the image size.

    Args:
        templates: real (..., h, w), centre at (h // 2, w // 2).
        image_shape: (H, W).

    Returns:
        complex (..., H, W // 2 + 1) = centred_rfftn(pad_template(templates, image_shape), 2).
    """
    return centred_rfftn(pad_template(templates, image_shape), 2)


def image_transform(images: torch.Tensor) -> torch.Tensor:
    """Un-centred half transform of images, the `correlate_transforms` default.

    Args:
        images: real (..., H, W).

    Returns:
        complex (..., H, W // 2 + 1) = torch.fft.rfftn(images, dim=(-2, -1)).
    """
    return torch.fft.rfftn(images, dim=(-2, -1))


def correlate_transforms(
    image_ft: torch.Tensor,
    template_ft: torch.Tensor,
    image_shape: tuple[int, int],
    image_centred: bool = False,
) -> torch.Tensor:
    """Cross-correlation maps from transforms computed beforehand.

    Args:
        image_ft: complex (..., H, W // 2 + 1), the image's half transform:
            `torch.fft.rfftn(image, dim=(-2, -1))` (= `image_transform`, pixel
            (0, 0) at the origin) if image_centred is False, or
            `centred_rfftn(image, 2)` (pixel (H // 2, W // 2) at the origin) if True.
            Filters (whitening, CTF, band-pass) may already be applied.
        template_ft: complex (..., H, W // 2 + 1) = `template_transform(templates,
            (H, W))`, filters may be applied; broadcasts with image_ft.
        image_shape: (H, W) real-space image shape.
        image_centred: which of the two image transforms image_ft is.

    Returns:
        real (..., H, W) cc with cc[y, x] as in the module docstring, in image pixels
        (index (y, x) is image pixel (y, x) for both image conventions).
    """
    product = image_ft * template_ft.conj()
    if image_centred:
        # Correlating the ifftshifted image gives the map ifftshifted too: undo it.
        return centred_irfftn(product, image_shape)
    return torch.fft.irfftn(product, s=image_shape, dim=(-2, -1))


def cross_correlate(images: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Circular cross-correlation of images with centred templates.

    Args:
        images: real (..., H, W).
        templates: real (..., h, w), centre at (h // 2, w // 2); leading dims
            broadcast with the images' (e.g. images (H, W), templates (n, h, w)).

    Returns:
        real (..., H, W) cc[y, x] = Σ image[y + dy, x + dx] · template[h//2 + dy, w//2 + dx].
    """
    image_shape = (images.shape[-2], images.shape[-1])
    return correlate_transforms(
        image_transform(images), template_transform(templates, image_shape), image_shape
    )
