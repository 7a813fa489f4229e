"""DVC stage `prepare`: one split of the dataset at data.root -> pairs and images tables."""

from pipeline import spair
from pipeline.config import load_params


def main() -> None:
    data = load_params().data
    tables = spair.load_split(data.root, data.split, layout=data.layout, categories=data.categories)
    spair.write_split(tables, data.pairs, data.images)
    print(f"{len(tables.pairs)} pairs, {len(tables.images)} images")


if __name__ == "__main__":
    main()
