"""Feature maps keep the image's layout: the cell at (row, column) of a stored map is the token of
that patch of the input, for every backbone that lays tokens back on a grid.

Identity-pair matching passes under any consistent permutation of the tokens (a transposed grid, a
column-major reshape, a shuffle), so these tests feed an input that is constant except in ONE patch,
at an asymmetric cell of a non-square grid, and require the captured map to change most at exactly
that cell. Each test also lays the same tokens out the wrong ways (transposed, column-major, a grid
of swapped sides, shifted by one token as when a CLS token is kept, shuffled) and requires the
locator to reject every one of them, so the chosen cell and grid really tell those layouts apart.

The maps come from `layer_tensors`, the path extraction takes (model_latent, then the backbone's
`run`); the deviation of a map is taken against the same backbone's map of the unperturbed input,
which cancels positional embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.features import layer_tensors
from pipeline.config import BackboneParams
from pipeline.demo.tiny_models import make_tiny
from pipeline.models.backbones.parts import Parts
from pipeline.models.backbones.registry import make_backbone

torch.set_num_threads(1)

GRID = (4, 6)  # rows, columns of the token grid: non-square, so a swapped grid is another layout
CELL = (1, 3)  # the perturbed token; transposed it would sit at (3, 1), column-major at (1, 2)
BASE, BUMP = 0.1, 1.0  # the constant input, and what is added inside the one perturbed patch


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    base = tmp_path_factory.mktemp("layout-models")
    built = {name: str(make_tiny(name, base / name)) for name in ("tiny-flux", "tiny-dinov2", "tiny-clip")}
    return {**tiny_models, **built}


def responses(kind: str, model: str, layers: list[str], shape: tuple[int, ...], patch: int, cell=CELL,
              bump: float = BUMP) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer -> (map of the constant input, map of the input with the patch of `cell` raised), (Y, X, C).

    `shape` is the model input (C, H, W): a latent for the diffusion models, a [-1, 1] canvas for the
    ViTs; `patch` is how many input pixels one grid cell spans."""
    pixels = kind in ("dinov2", "clip")
    attrs = {"scaling_factor": 1.0, "shift_factor": 0.0, "canvas": max(shape[1:]) * (1 if pixels else 8)}
    if pixels:
        attrs["encoder"] = "pixels"
    params = BackboneParams(kind=kind, model=model, latents="layout", layers=layers, timesteps=[261], ensemble=1,
                            latent="mean", noise=False)
    backbone = make_backbone(params, attrs, Parts(model, torch.device("cpu"), torch.float32), ["cat"])
    constant = torch.full(shape, BASE)
    perturbed = constant.clone()
    row, column = cell
    perturbed[:, row * patch:(row + 1) * patch, column * patch:(column + 1) * patch] += bump
    std = torch.zeros(shape)
    before = layer_tensors(params, backbone, "cat/x", "cat", constant, std, 261)
    after = layer_tensors(params, backbone, "cat/x", "cat", perturbed, std, 261)
    return {layer: (before[(layer, "features")].numpy(), after[(layer, "features")].numpy()) for layer in layers}


def argmax_cell(deviation: np.ndarray) -> tuple[int, int]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(deviation)), deviation.shape))


def smoothed_argmax_cell(deviation: np.ndarray) -> tuple[int, int]:
    """The centre of the 3 x 3 window with the most squared deviation: a convolution's receptive field
    spreads a one-cell change over its neighbours, unevenly."""
    energy = torch.from_numpy(deviation.astype(np.float64) ** 2)[None, None]
    return argmax_cell(F.avg_pool2d(energy, 3, stride=1, padding=1)[0, 0].numpy())


def deviation(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per cell: L2 distance between the two maps' vectors."""
    return np.linalg.norm(after.astype(np.float64) - before.astype(np.float64), axis=-1)


def mislaid(features: np.ndarray) -> dict[str, np.ndarray]:
    """The same tokens (row-major in `features`) laid out as plausible bugs would lay them."""
    h, w, c = features.shape
    tokens = features.reshape(h * w, c)
    order = np.random.default_rng(0).permutation(h * w)
    cycle = np.empty(h * w, dtype=int)
    cycle[order] = np.roll(order, 1)  # one cycle through every token: no token stays in place
    return {
        "transposed": features.transpose(1, 0, 2),
        "column-major": tokens.reshape(w, h, c).transpose(1, 0, 2),
        "swapped grid sides": tokens.reshape(w, h, c),
        "shifted by one token": np.roll(tokens, 1, axis=0).reshape(h, w, c),
        "shuffled": tokens[cycle].reshape(h, w, c),
        "channels-first reshape": features.transpose(2, 0, 1).reshape(h, w, c),
    }


def check_layout(maps: dict[str, tuple[np.ndarray, np.ndarray]], grid, locate=argmax_cell) -> None:
    for layer, (before, after) in maps.items():
        assert before.shape[:2] == grid and after.shape == before.shape, layer
        assert np.isfinite(after).all()
        assert locate(deviation(before, after)) == CELL, f"{layer}: the perturbed token is not at {CELL}"
        # The test is only worth something if every wrong layout of the same tokens misses the cell.
        wrong_before, wrong_after = mislaid(before), mislaid(after)
        for name in wrong_before:
            assert locate(deviation(wrong_before[name], wrong_after[name])) != CELL, f"{layer}: a {name} layout would pass"


def test_sd3_patch_tokens_are_laid_row_major(models):
    # One token = one 2 x 2 latent patch; latent (16, 8, 12) -> grid (4, 6).
    maps = responses("sd3", models["tiny-sd3"], ["transformer_blocks.0", "transformer_blocks.3"],
                     (16, GRID[0] * 2, GRID[1] * 2), patch=2)
    check_layout(maps, GRID)


def test_flux_packed_tokens_are_laid_row_major(models):
    # _pack_latents makes one token of each 2 x 2 latent patch; block 0's input is the embedded latent,
    # the single-stream inputs come after the text tokens were joined to the image tokens.
    layers = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.3"]
    maps = responses("flux", models["tiny-flux"], layers, (16, GRID[0] * 2, GRID[1] * 2), patch=2)
    check_layout(maps, GRID)


@pytest.mark.parametrize("kind, layers", [("dinov2", ["encoder.layer.0", "encoder.layer.3"]),
                                          ("clip", ["encoder.layers.0", "encoder.layers.3"])])
def test_vit_patch_tokens_are_laid_row_major(models, kind, layers):
    # One token = one 14 x 14 pixel patch; a 56 x 84 canvas -> grid (4, 6); CLS first, dropped.
    maps = responses(kind, models[f"tiny-{kind}"], layers, (3, GRID[0] * 14, GRID[1] * 14), patch=14, bump=0.8)
    check_layout(maps, GRID)


def test_sd2_feature_maps_keep_the_latent_layout(models):
    """The control: a U-Net's maps are spatial already (NCHW -> NHWC). down_blocks.0 halves the latent,
    so a cell is a 2 x 2 latent patch; latent (4, 16, 24) -> grid (8, 12)."""
    maps = responses("sd2", models["tiny-sd2"], ["down_blocks.0"], (4, 16, 24), patch=2)
    check_layout(maps, (8, 12), locate=smoothed_argmax_cell)
