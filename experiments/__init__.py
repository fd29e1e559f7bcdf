"""Entry modules (`python -m experiments.<method>`), configs and benchmarks."""
