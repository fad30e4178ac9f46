"""FFT cross-correlation against a brute-force sum, peak positions, batching."""

from __future__ import annotations

import pytest
import torch

from cryorefine.engine.correlate import (
    correlate_transforms,
    cross_correlate,
    image_transform,
    pad_template,
    template_transform,
)
from cryorefine.engine.fourier import centred_rfftn


def _noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device)


def brute_force(image: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """cc[y, x] = Σ_{dy,dx} image[(y+dy) % H, (x+dx) % W] · template[h//2+dy, w//2+dx]."""
    H, W = image.shape
    h, w = template.shape
    cc = torch.zeros(H, W, dtype=torch.float64)
    image64, template64 = image.double().cpu(), template.double().cpu()
    for ty in range(h):
        for tx in range(w):
            dy, dx = ty - h // 2, tx - w // 2
            shifted = torch.roll(image64, shifts=(-dy, -dx), dims=(0, 1))  # [y+dy, x+dx]
            cc += shifted * template64[ty, tx]
    return cc


@pytest.mark.parametrize(("image_shape", "template_shape"), [((12, 10), (5, 4)), ((9, 14), (6, 7))])
def test_matches_brute_force(
    device: torch.device, image_shape: tuple[int, int], template_shape: tuple[int, int]
) -> None:
    image = _noise(image_shape, 0, device)
    template = _noise(template_shape, 1, device)
    cc = cross_correlate(image, template)
    assert cc.shape == image_shape and cc.device.type == device.type
    torch.testing.assert_close(
        cc.cpu().double(), brute_force(image, template), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("centred", [False, True])
def test_transform_form_matches_for_both_image_conventions(
    device: torch.device, centred: bool
) -> None:
    image = _noise((16, 15), 2, device)
    templates = _noise((3, 7, 6), 3, device)
    image_ft = centred_rfftn(image, 2) if centred else image_transform(image)
    cc = correlate_transforms(image_ft, template_transform(templates, (16, 15)), (16, 15), centred)
    for i in range(3):
        torch.testing.assert_close(
            cc[i].cpu().double(), brute_force(image, templates[i]), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("template_size", [15, 16])
def test_peak_at_the_centre_of_a_placed_copy(device: torch.device, template_size: int) -> None:
    template = _noise((template_size, template_size), 4, device)
    image = torch.zeros(64, 80, device=device)
    # Centre the copy at (y0, x0) = (40, 23): template[h//2, w//2] goes on that pixel.
    y0, x0 = 40, 23
    top, left = y0 - template_size // 2, x0 - template_size // 2
    image[top : top + template_size, left : left + template_size] = template
    cc = cross_correlate(image, template)
    peak = torch.unravel_index(cc.argmax(), cc.shape)
    assert (peak[0].item(), peak[1].item()) == (y0, x0)
    assert cc[y0, x0].item() == pytest.approx(template.square().sum().item(), rel=1e-5)


def test_batches_match_one_by_one(device: torch.device) -> None:
    images = _noise((2, 1, 20, 24), 5, device)
    templates = _noise((3, 9, 8), 6, device)
    batch = cross_correlate(images, templates)
    assert batch.shape == (2, 3, 20, 24)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batch[i, j], cross_correlate(images[i, 0], templates[j]))


def test_pad_template_places_the_centre_on_the_origin(device: torch.device) -> None:
    template = torch.arange(12.0, device=device).reshape(3, 4)
    padded = pad_template(template, (8, 9))
    assert padded[4, 4].item() == template[1, 2].item()
    assert padded.sum().item() == template.sum().item()
    # A centred template's centred transform is that of a delta: cc = the image.
    delta = torch.zeros(5, 5, device=device)
    delta[2, 2] = 1.0
    image = _noise((10, 11), 7, device)
    torch.testing.assert_close(cross_correlate(image, delta), image, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="larger than the image"):
        pad_template(torch.zeros(9, 3), (8, 8))
