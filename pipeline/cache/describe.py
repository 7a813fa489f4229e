"""A store in words: what `cli.py info` prints, and a lossy store's fidelity figures."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.store import FeatureStore


def describe(path: str | Path) -> str:
    """A human summary of a store: what `cli.py info` prints."""
    found = FeatureStore.open(path)
    root, attrs = found.root, found.root.attrs
    table = found.images()
    done = table[table["done"]]
    mib = found.size_on_disk() / 2**20
    lines = [
        f"{path}: {attrs.get('kind')} store, {attrs.get('backbone', '')} {attrs.get('model')} "
        f"(fingerprint {attrs['fingerprint']})",
        f"images: {len(done)}/{len(table)} done; size on disk {mib:.1f} MiB",
        f"seconds per image: median {done['seconds'].median():.3f}, total {done['seconds'].sum():.1f}"
        if len(done) else "seconds per image: -",
        f"peak memory: {done['peak_memory'].max() / 2**20:.0f} MiB" if len(done) else "peak memory: -",
    ]
    if "timestep" in root:
        lines.append(f"timesteps: {', '.join(str(t) for t in root['timestep'][:])}")
    if attrs.get("kind") == "features":
        lines.append(f"storage: {attrs.get('storage', 'float16')} (pipeline/cache/codecs.py)")
        lines += describe_fidelity(dict(attrs))
    clipped = found.overflow() if attrs.get("kind") == "features" else {}
    if clipped:
        lines.append("values clipped to float16's range (+-65504): " + ", ".join(f"{k} {v}" for k, v in clipped.items()))
    nodes = found.layers() if attrs.get("kind") == "features" else ["posterior"]
    for name in nodes:
        node = root[name]
        arrays = sorted(node.array_keys())
        main = node["features"] if "features" in node else node["mean"]
        extra = [a for a in arrays if a not in ("features", "mean", "overflow", *main.metadata.dimension_names)]
        shape = " x ".join(f"{d}={n}" for d, n in zip(main.metadata.dimension_names, main.shape))
        lines.append(f"  {name}: {shape}" + (f" (+ {', '.join(extra)})" if extra else ""))
    return "\n".join(lines)


def bfloat16_scale(figures: dict) -> str:
    """A layer's fidelity scale: what rounding its float16 reference to bfloat16 kept (pipeline/workflows/fidelity.py)."""
    return f"bfloat16 rounding: {figures['bfloat16_identical']:.1%}, {figures['bfloat16_pck_change']:.2f} points"


def describe_fidelity(attrs: dict) -> list[str]:
    """A lossy store's own fidelity figures (pipeline/workflows/fidelity.py), for `describe`."""
    found = attrs.get("fidelity")
    if not found:
        return []
    fit = attrs.get("fit_images")
    seen = (f", {found['images_in_fit']} of them among the {len(fit)} that fitted the axes" if fit and "images_in_fit" in found
            else "")
    lines = [f"fidelity of {found['storage']} against float16 ({found['images']} images{seen}; dift, every transform):"]
    lines += [f"  {layer}: {f['identical']:.1%} identical predictions, PCK@0.1 change {f['pck_change']:.2f} points "
              f"({f['pairs']} pairs)" + (f"; {bfloat16_scale(f)}" if "bfloat16_identical" in f else "")
              for layer, f in found["layers"].items()]
    return lines
