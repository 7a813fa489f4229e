"""Demo and test material, generated (seeded: the same seed gives the same bytes): the demo dataset in the
SPair-71k layout (`dataset`), tiny random pipelines, the demo's models and the tests' fixtures
(`tiny_models`), and stand-ins of the real study's hub repositories (`hub_snapshots`)."""
