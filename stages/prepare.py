"""DVC stage `prepare`: one split of the dataset at data.root -> pairs and images tables."""

from pipeline.data import spair
from pipeline.config import load_params
from pipeline.errors import report_skipped
from stages import run


def main() -> None:
    params = load_params()
    data = params.data
    tables = spair.load_split(data.root, data.split, layout=data.layout, categories=data.categories,
                              on_error=params.on_error)
    spair.write_split(tables, data.pairs, data.images, data.skipped)
    report_skipped(data.root, list(tables.skipped.itertuples(index=False, name=None)))
    print(f"{len(tables.pairs)} pairs, {len(tables.images)} images, {len(tables.skipped)} skipped")


if __name__ == "__main__":
    run(main)
