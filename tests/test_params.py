"""Both parameter profiles are complete and consistent: every name they refer to exists."""

from pathlib import Path

import pytest

from conftest import REPO
from pipeline.config import load_params
from pipeline.errors import PipelineError


PROFILES = [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
def test_profile_is_consistent(path):
    params = load_params(path)
    assert params.backbones
    model_dirs = {f"models/{name}" for name in params.models}
    for name, encoder in params.encoders.items():
        assert encoder.kind == "vae" and encoder.model in model_dirs, name
    for name, backbone in params.backbones.items():
        assert backbone.model in model_dirs, name
        pixels = backbone.latents in params.canvases
        assert pixels or backbone.latents in params.encoders, name
        assert pixels == (backbone.kind in ("dinov2", "clip")), name
    assert set(params.match.transforms) <= set(params.backbones)
    for name, spec in params.download.items():  # prepare, the hpatches and davis stages read what download unpacks
        assert spec.root in (params.data.root, params.datasets.hpatches.root, params.datasets.davis.root), name
    for dataset in (params.datasets.hpatches, params.datasets.davis):
        assert dataset.root in {spec.root for spec in params.download.values()}
        assert set(dataset.backbones) <= set(params.backbones)


def test_unknown_parameter_is_named(tmp_path):
    path = Path(tmp_path / "p.yaml")
    path.write_text("backbones:\n  x: {kind: sd2, model: m, latents: l, layer: [up_blocks.1]}\n")
    with pytest.raises(PipelineError, match=r"backbones.x.layer: unknown parameter; did you mean 'layers'\?"):
        load_params(path)


def test_parameter_reference_page_is_the_schemas():
    from pipeline.config import reference

    page = (REPO / "docs" / "reference" / "params.md").read_text()
    block = page.split("<!-- params -->\n", 1)[1].split("<!-- /params -->", 1)[0]
    assert block == reference()
    assert "| `backbones.<name>.ensemble` | an integer >= 1 | `8` |" in block
