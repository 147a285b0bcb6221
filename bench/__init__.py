"""fastdin's benchmarks (installed as `fastdin.bench`): `python -m fastdin.bench` or `fastdin bench`."""
