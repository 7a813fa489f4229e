"""What runs several layers together: a lossy store's fidelity measurement (`fidelity.py`: extracts,
matches, scores), a params file's cost (`plan.py`), and a model folder's fetch or build (`fetch.py`: the
hub, real-size configs, or the demo's tiny models)."""
