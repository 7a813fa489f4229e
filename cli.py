"""dift-cache command line: thin wiring over `pipeline/`.

Expected faults (bad input, bad parameters) print one line `error: file: field: reason` and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from pipeline.config import ON_ERROR, PROTOCOLS, STATISTICS
from pipeline.errors import PipelineError, as_expected


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as caught:
            exc = as_expected(caught)
            if exc is None:
                raise
            for line in str(exc).splitlines():  # a parameters file reports all its problems, one line each
                click.echo(f"error: {line}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def cli():
    """Cache diffusion features for semantic correspondence; match and score from cache."""


def _settings(params_file: Path):
    """params.yaml: the defaults of every option below, so the CLI and `dvc repro` compute the same thing.
    Without the default file (a command run outside a project), the built-in defaults."""
    from pipeline.config import PARAMS_FILE, Params, load_params

    if params_file == PARAMS_FILE and not params_file.exists():
        return Params()
    return load_params(params_file)


def _dask_options(command):
    """--scheduler / --workers: run on dask.distributed (docs/guides/distributed.md)."""
    command = click.option("--workers", type=int, default=None,
                           help="Worker processes of a local dask cluster (1: no dask); default dask.workers.")(command)
    return click.option("--scheduler", default=None,
                        help="Address of a running dask scheduler, e.g. tcp://10.0.0.5:8786; default dask.scheduler.")(command)


def _cluster(params, scheduler, workers):
    from pipeline import cluster

    return cluster.connect(scheduler or params.dask.scheduler, workers or params.dask.workers)


_on_error_option = click.option("--on-error", type=click.Choice(ON_ERROR), default=None,
                                help="skip: leave bad items out, list them, go on; default on_error in params.yaml.")
_threshold_option = click.option(
    "--threshold", "thresholds", multiple=True, type=click.Choice(["bbox", "img"]),
    help="PCK threshold: alpha x the target's box side (bbox) or image side (img), repeatable; default match.thresholds.")
_params_option = click.option("--params", "params_file", type=click.Path(path_type=Path), default=Path("params.yaml"),
                              show_default=True, help="Parameters file: the defaults of every option.")
_allow_stale_option = click.option(
    "--allow-stale", is_flag=True,
    help="Read a store that params.yaml and the code would now build otherwise (its fingerprint differs), "
         "saying so with the results; without it such a store is refused.")


def _current(paths, params, params_file: Path, allow_stale: bool) -> list[str]:
    """Refuse a stale store (pipeline/cache/current.py) before any work; with --allow-stale, the warning lines
    to print with the results."""
    from pipeline.cache.current import check_current

    return [line for path in paths if (line := check_current(path, params, allow_stale, params_file))]


def _warn(warnings: list[str]) -> None:
    for line in warnings:
        click.echo(line, err=True)

@cli.command()
@click.argument("dataset")
@click.option("--dest", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="Folder for the archive and the extracted dataset.")
@click.option("--url", default=None, help="Archive URL; default the official one.")
@click.option("--sha256", default=None, help="Expected sha256 of the archive; without it the digest is printed to pin.")
def download(dataset, dest, url, sha256):
    """Download (resumable), verify and safely extract a dataset archive, e.g. spair71k."""
    from pipeline.data.download import download as run_download

    folder = run_download(dataset, dest, url=url, sha256=sha256)
    click.echo(f"{dataset} -> {folder}")


@cli.command()
@click.option("--root", type=click.Path(path_type=Path), required=True, help="SPair-71k root folder.")
@click.option("--split", type=click.Choice(["trn", "val", "test"]), default="test", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Pairs table (parquet).")
@click.option("--images-out", type=click.Path(path_type=Path), default=None,
              help="Images table (parquet); default: <out stem>-images.parquet.")
@click.option("--dataset", type=click.Choice(["spair71k", "demo"]), default="spair71k", show_default=True,
              help="'demo' first generates the demo dataset into --root.")
@click.option("--layout", type=click.Choice(["large", "small"]), default=None,
              help="Read the pair list from Layout/<layout>/<split>.txt instead of PairAnnotation/<split>.")
@click.option("--category", "categories", multiple=True, help="Keep only these categories (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Demo generator seed.")
@_on_error_option
@_params_option
def prepare(root, split, out, images_out, dataset, layout, categories, seed, on_error, params_file):
    """Read one split into a pairs table and an images table."""
    from pipeline.demo.dataset import DemoSpec, generate
    from pipeline.data import spair

    if dataset == "demo":
        generate(root, DemoSpec(seed=seed))
    from pipeline.errors import report_skipped

    on_error = on_error or _settings(params_file).on_error
    tables = spair.load_split(root, split, layout=layout, categories=list(categories), on_error=on_error)
    images_out = images_out or out.with_name(f"{out.stem}-images.parquet")
    spair.write_split(tables, out, images_out, out.with_name(f"{out.stem}-skipped.csv"))
    report_skipped(root, list(tables.skipped.itertuples(index=False, name=None)))
    click.echo(f"{len(tables.pairs)} pairs, {len(tables.images)} images, "
               f"{tables.pairs['kps_ids'].map(len).sum()} keypoints -> {out}, {images_out}")


LOOKUPS = Path("lookups")  # where the CLI's look-ups write by default: no stage's output (git-ignored)


def _not_the_studys(path: Path, overwrite: bool) -> Path:
    """`path`, unless it is (or lies inside) an output of the pipeline that dvc.lock records: a look-up must
    not rewrite the study behind DVC's back, short of --overwrite."""
    lock = Path("dvc.lock")
    if overwrite or not lock.exists():
        return path
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    target = path.resolve()
    for out in (Path(out["path"]) for stage in stages.values() for out in stage.get("outs", [])):
        if target == out.resolve() or out.resolve() in target.parents:
            raise PipelineError(path, None, f"an output of the pipeline (dvc.lock: {out.as_posix()}); write "
                                            "elsewhere, or pass --overwrite to replace it")
    return path


@cli.command()
@click.argument("predictions", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default=LOOKUPS / "pck.json",
              show_default=True)
@click.option("--table", "table_path", type=click.Path(path_type=Path), default=LOOKUPS / "pck.csv",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Allow writing over an output of the pipeline (e.g. metrics/pck.json).")
@_threshold_option
@_dask_options
@_params_option
def evaluate(predictions, metrics_path, table_path, overwrite, thresholds, scheduler, workers, params_file):
    """PCK of one or more predictions tables (parquet)."""
    from pipeline.evaluation import metrics

    params = _settings(params_file)
    metrics_path, table_path = (_not_the_studys(path, overwrite) for path in (metrics_path, table_path))
    with _cluster(params, scheduler, workers) as client:
        table = metrics.score_files(predictions, client, thresholds=thresholds or params.match.thresholds)
    metrics.write_metrics(table, metrics_path, table_path)
    click.echo(metrics.format_headline(table))




_overwrite_option = click.option("--overwrite", is_flag=True,
                                 help="Replace the store at that path, whatever it holds (it says what it replaced).")
_check_disk_option = click.option(
    "--check-disk/--no-check-disk", default=None,
    help="Refuse to start when the store cannot fit on its disk; default check_disk in params.yaml.")


@cli.command()
@click.option("--params", "params_file", type=click.Path(path_type=Path), default=Path("params.yaml"),
              show_default=True, help="Parameters file (e.g. profiles/spair71k.yaml).")
@click.option("--images", type=int, default=None, help="Images to plan for; default the prepared images table's.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(params_file, images, as_json):
    """Before any GPU time: stored bytes per store, downloads, GPU memory and time of every stage."""
    import json

    from pipeline.config import load_params
    from pipeline.workflows.plan import format_plan, make_plan

    result = make_plan(load_params(params_file), images, Path(__file__).parent / "benchmarks" / "results")
    click.echo(json.dumps(result, indent=1) if as_json else format_plan(result))


@cli.command()
@click.option("--encoder", required=True, help="Name under `encoders` (or `canvases`) in params.yaml.")
@click.option("--store", "out", type=click.Path(path_type=Path), default=None,
              help="Latents store; default <store>/latents/<encoder>.zarr.")
@_overwrite_option
@_on_error_option
@_params_option
@_check_disk_option
def encode(encoder, out, overwrite, on_error, params_file, check_disk):
    """Every image of the prepared split through one VAE (posterior mean and std)."""
    import pandas as pd

    from pipeline.cache.encode import encode as run_encode

    params = _settings(params_file)
    images = pd.read_parquet(params.data.images)
    out = out or params.latents_path(encoder)
    run_encode(params.encoder(encoder), images, params.data.root, out, "any" if overwrite else "never",
               {"root": params.data.root, "split": params.data.split}, on_error or params.on_error,
               params.check_disk if check_disk is None else check_disk)
    click.echo(f"latents -> {out}")


@cli.command()
@click.option("--backbone", required=True, help="Name under `backbones` in params.yaml.")
@click.option("--store", "out", type=click.Path(path_type=Path), default=None,
              help="Features store; default <store>/<backbone>.zarr.")
@_overwrite_option
@_dask_options
@_on_error_option
@_params_option
@_check_disk_option
def extract(backbone, out, overwrite, scheduler, workers, on_error, params_file, check_disk):
    """Per-layer, per-timestep features of one backbone into a Zarr store (resumable)."""
    from pipeline.workflows import fidelity

    params = _settings(params_file)
    out = out or params.store_path(backbone)
    with _cluster(params, scheduler, workers) as client:
        measured = fidelity.extract_measured(params, backbone, out, "any" if overwrite else "never", client,
                                             on_error or params.on_error,
                                             params.check_disk if check_disk is None else check_disk)
    if measured:
        from pipeline.cache.describe import describe_fidelity
        from pipeline.cache.store import FeatureStore

        click.echo("\n".join(describe_fidelity(FeatureStore.open(out).attrs)))
    click.echo(f"features -> {out}")


@cli.command()
@click.option("--store", "paths", required=True, multiple=True,
              help="Features store; repeat to fuse stores (one --layer and --timestep per store, and --weights).")
@click.option("--pairs", type=click.Path(path_type=Path), default=None,
              help="Pairs table; default data.pairs in params.yaml.")
@click.option("--layer", "layers", multiple=True, help="Layers to match (repeatable); default all in the store.")
@click.option("--timestep", "timesteps", multiple=True, type=int, help="Timesteps (repeatable); default all.")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(PROTOCOLS),
              help="dift (DIFT's), geoaware (GeoAware-SC's) or sd-dino (sd-dino's), repeatable; default match.protocols.")
@_threshold_option
@click.option("--statistics", type=click.Choice(STATISTICS), default=None,
              help="Similarity statistics per keypoint; default match.statistics.")
@click.option("--device", default=None, help="cpu or cuda; default match.device.")
@click.option("--transform", "transform_specs", multiple=True,
              help="Feature transform (repeatable): raw, layernorm, adaln, drop:auto, drop:i,j, joined with +; "
                   "default match.transforms of the store's backbone name (raw if it has none).")
@click.option("--weights", default=None, help="Fusion: one weight per store, e.g. 0.5,0.5.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Predictions table; default <match.predictions>/<store name>.parquet.")
@_dask_options
@_on_error_option
@_params_option
@_allow_stale_option
def match(paths, pairs, layers, timesteps, protocols, thresholds, statistics, device, transform_specs, weights, out,
          scheduler, workers, on_error, params_file, allow_stale):
    """Predict every target keypoint from a cached store and print PCK per layer and timestep. Every option
    left out takes its value from params.yaml, so this gives the predictions of the `match@<backbone>` stage."""
    import pandas as pd

    from pipeline.matching.maps import StoreMaps
    from pipeline.evaluation import metrics
    from pipeline.matching.match import match_to_file

    params = _settings(params_file)
    stale = _current(paths, params, params_file, allow_stale)
    table = pd.read_parquet(pairs or params.data.pairs)
    source = StoreMaps(paths[0])
    name, specs = source.name, transform_specs or params.match.transforms_for(source.name)
    if len(paths) > 1:
        from pipeline.matching.fusion import FusedMaps

        chosen_timesteps = list(timesteps) or [StoreMaps(p).timesteps[0] for p in paths]
        split_weights = [float(w) for w in weights.split(",")] if weights else [1.0] * len(paths)
        source = FusedMaps(list(paths), list(layers), chosen_timesteps, split_weights)
        name, layers, timesteps = "fused-" + "-".join(Path(p).stem for p in paths), None, None
        specs = transform_specs or ["raw"]
    out = out or Path(params.match.predictions) / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    with _cluster(params, scheduler, workers) as client:
        match_to_file(source, table, out, layers, timesteps, protocols or params.match.protocols,
                      statistics or params.match.statistics, device or params.match.device, specs, client,
                      on_error or params.on_error)
        click.echo(metrics.format_headline(metrics.score_files([out], client,
                                                               thresholds=thresholds or params.match.thresholds)))
    click.echo(f"predictions -> {out}")
    _warn(stale)


@cli.command()
@click.option("--store", "stores", type=click.Path(path_type=Path), multiple=True, required=True,
              help="Features store (repeatable: one panel per store and layer).")
@click.option("--layer", "layers", multiple=True, help="Layers (repeatable); default each store's first layer.")
@click.option("--timestep", type=int, default=None, help="Timestep; default each store's first.")
@click.option("--pair", "pair_name", default=None, help="Pair file name (without .json); default the first cross-instance pair.")
@click.option("--keypoint", type=int, default=0, show_default=True, help="Index of the query keypoint in the pair.")
@click.option("--out", type=click.Path(path_type=Path), default=LOOKUPS / "heatmap.png", show_default=True)
@click.option("--overwrite", is_flag=True, help="Allow writing into an output of the pipeline (e.g. reports/).")
@_params_option
@_allow_stale_option
def show(stores, layers, timestep, pair_name, keypoint, out, overwrite, params_file, allow_stale):
    """Heatmaps: the query on the source, the cosine map on the target, per store and layer."""
    import pandas as pd

    _not_the_studys(out, overwrite).parent.mkdir(parents=True, exist_ok=True)
    from pipeline.matching.maps import StoreMaps
    from pipeline.evaluation.figures import Variant, heatmaps

    params = _settings(params_file)
    data = params.data
    stale = _current(stores, params, params_file, allow_stale)
    variants = []
    for path in stores:
        maps = StoreMaps(path)
        for layer in layers or maps.layers[:1]:
            if layer not in maps.layers:
                continue
            variants.append(Variant(str(path), layer, timestep if timestep is not None else maps.timesteps[0]))
    if not variants:
        raise PipelineError(None, "layer", f"none of {list(layers)} is in the given stores")
    written = heatmaps(variants, pd.read_parquet(data.pairs), pd.read_parquet(data.images), data.root, out,
                       pair_name, keypoint)
    click.echo(f"heatmaps -> {written}")
    _warn(stale)


@cli.command()
@click.option("--store", "stores", multiple=True,
              help="Features store (repeatable); default every backbone's store under `store` in params.yaml.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port (0: any free port); default explore.port in params.yaml.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than the loopback exposes the stores and images to the network.")
@click.option("--no-token", is_flag=True, help="Serve without the URL's token: any local program or web page can drive it.")
@_params_option
@_allow_stale_option
def explore(stores, port, host, no_token, params_file, allow_stale):
    """A local web page over cached stores: click a source point, compare stores, layers, timesteps and
    transforms (cosine maps, predictions, histograms, PCK), and find the most similar cells in the dataset.
    Open the URL it prints: its token is what lets your browser, and nothing else, drive it."""
    import pandas as pd

    from pipeline.evaluation.metrics import BEST_DIR
    from pipeline.explorer.explorer import Explorer, load_best
    from pipeline.explorer.server import serve

    params = _settings(params_file)
    stores = stores or [p for name in params.backbones if (p := Path(params.store) / f"{name}.zarr").exists()]
    if not stores:
        raise PipelineError(None, "store", f"no store under {params.store}/; run `dvc repro` or pass --store")
    names = {Path(p).stem for p in stores} | set(params.backbones)
    explorer = Explorer(stores, pd.read_parquet(params.data.pairs), pd.read_parquet(params.data.images), params.data.root,
                        transforms={name: params.match.transforms_for(name) for name in names},
                        predictions={name: Path(params.match.predictions) / f"{name}.parquet" for name in names},
                        best=load_best(BEST_DIR), params=params, allow_stale=allow_stale, source=params_file,
                        compare=params.explore.compare)
    unknown = [name for name in params.explore.compare if name not in explorer.maps]
    _warn(list(explorer.stale.values()) + ([f"{params_file}: explore.compare: no store named {unknown[0]!r} among "
                                            f"those explored; starting with {explorer.compare}"] if unknown else []))
    serve(explorer, params.explore.port if port is None else port, host, None if no_token else "new")


@cli.command()
@click.option("--store", "path", required=True, help="Features store.")
@click.option("--layer", required=True, help="Layer (module path).")
@click.option("--image", required=True, help="Image key (<category>/<name>) or its file in the SPair layout.")
@click.option("--point", required=True, help="x,y in the image's pixels.")
@click.option("--timestep", type=int, default=None, help="Timestep; default the store's first.")
@click.option("--transform", default="raw", show_default=True, help="Feature transform (see `match --transform`).")
@click.option("--top", type=click.IntRange(1, 10_000), default=20, show_default=True, help="Cells listed.")
@_params_option
@_allow_stale_option
def search(path, layer, image, point, timestep, transform, top, params_file, allow_stale):
    """The cells of every image most similar to the cell under a point (a FAISS index per layer, timestep and
    transform, kept in the user's cache: DIFT_CACHE_DIR, default ~/.cache/dift-cache)."""
    from tabulate import tabulate

    from pipeline.matching.maps import StoreMaps
    from pipeline.matching.search import CellIndex, check_query
    from pipeline.matching.transforms import check_configured

    try:
        x, y = (float(v) for v in point.split(","))
    except ValueError:
        raise PipelineError(None, "point", f"expected x,y, got {point!r}") from None
    params = _settings(params_file)
    stale = _current([path], params, params_file, allow_stale)
    maps = StoreMaps(path)
    check_configured(transform, params.match.transforms_for(maps.name), maps.name)  # an index each, on disk
    key = image if image in maps.position else maps.image_key_for(image)
    check_query(maps, key, (x, y), top)
    found = CellIndex(maps, layer, timestep, transform).search(key, (x, y), top)
    click.echo(tabulate(found, headers="keys", showindex=False, floatfmt=".4f"))
    _warn(stale)


@cli.command()
@click.option("--store", "path", type=click.Path(path_type=Path), required=True)
@click.option("--layer", required=True, help="Layer (module path).")
@click.option("--timestep", type=int, default=None, help="Timestep; default the store's first.")
@click.option("--top", type=int, default=10, show_default=True, help="Channels listed.")
@_params_option
@_allow_stale_option
def inspect(path, layer, timestep, top, params_file, allow_stale):
    """Per-channel magnitude statistics of a layer, and the detected massive channels."""
    from pipeline.matching.maps import StoreMaps
    from pipeline.matching.transforms import channel_statistics

    stale = _current([path], _settings(params_file), params_file, allow_stale)
    maps = StoreMaps(path)
    timestep = timestep if timestep is not None else maps.timesteps[0]
    maps.check_variant(layer, timestep)
    images = [image for image in maps.images.index if maps.images.at[image, "done"]][:16]
    click.echo(channel_statistics(np.stack([maps.raw(image, layer, timestep) for image in images]), top))
    click.echo(f"massive channels (drop:auto): {list(maps.massive(layer, timestep))}")
    _warn(stale)


@cli.command()
@click.option("--store", "path", type=click.Path(path_type=Path), required=True, help="Features store.")
@click.option("--src", type=click.Path(path_type=Path), required=True,
              help="Source image, JPEGImages/<category>/<name>.jpg.")
@click.option("--trg", type=click.Path(path_type=Path), required=True, help="Target image, same layout.")
@click.option("--edit", type=click.Path(path_type=Path), required=True,
              help="RGBA sticker in source image coordinates (alpha = the edit's mask).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Composite image.")
@click.option("--layer", default=None, help="Layer; default the store's first.")
@click.option("--timestep", type=int, default=None, help="Timestep; default the store's first.")
@click.option("--max-points", type=int, default=400, show_default=True, help="Edit pixels matched.")
@click.option("--seed", type=int, default=0, show_default=True, help="Point sampling seed.")
@_params_option
@_allow_stale_option
def propagate(path, src, trg, edit, out, layer, timestep, max_points, seed, params_file, allow_stale):
    """Carry an edit (RGBA sticker) from a source image onto a target, from cached features."""
    from pipeline.data import images
    from pipeline.matching import propagate as edit_propagation
    from pipeline.matching.maps import StoreMaps

    stale = _current([path], _settings(params_file), params_file, allow_stale)
    maps = StoreMaps(path)
    keys = maps.image_key_for(src), maps.image_key_for(trg)
    composite, _, info_ = edit_propagation.propagate(
        maps, layer or maps.layers[0], maps.timesteps[0] if timestep is None else timestep, *keys,
        images.read_rgb(src), images.read_rgb(trg), images.read_rgba(edit),
        max_points, seed)
    images.save_image(out, composite)
    click.echo(f"{info_['method']}: {info_['inliers']}/{info_['matches']} inliers, edit centre "
               f"({info_['centre'][0]:.1f}, {info_['centre'][1]:.1f}) -> {out}")
    _warn(stale)


@cli.command()
@click.option("--store", "path", required=True, help="Store: a local path or an fsspec URL.")
@click.option("--backbone", default=None,
              help="Also check that the store is what params.yaml's backbone of this name would build.")
@_params_option
def verify(path, backbone, params_file):
    """Check a store: completeness, fingerprint, shapes, finite values; problems listed per image.
    Exit status 1 when there is any."""
    from pipeline.cache.verify import verify as run_verify

    expected = None
    params = _settings(params_file)
    if backbone is not None:
        from pipeline.cache.extract import expected_fingerprint

        spec = params.backbone(backbone)
        expected = expected_fingerprint(spec, params.latents_path(spec.latents))
    problems, summary = run_verify(path, expected, (params.fidelity.min_identical, params.fidelity.max_pck_change))
    click.echo(summary)
    for problem in problems:
        click.echo(f"  {problem}")
    click.echo(f"{len(problems)} problem(s)" if problems else "OK")
    sys.exit(1 if problems else 0)


@cli.command()
@click.option("--store", "path", required=True, help="Store: a local path or an fsspec URL.")
def info(path):
    """Layers, timesteps, images done, size on disk, seconds per image, peak memory."""
    from pipeline.cache.describe import describe

    click.echo(describe(path))


if __name__ == "__main__":
    cli()
