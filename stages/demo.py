"""DVC stage `demo`: write the demo dataset (params: demo)."""

from pipeline import demo
from pipeline.config import load_params
from stages import run


def main() -> None:
    params = load_params()
    demo.generate("data/demo", demo.DemoSpec(params.demo.seed, params.demo.sources_per_category))


if __name__ == "__main__":
    run(main)
