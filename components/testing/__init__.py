"""Oracles the tests and the benchmarks share (as ``torch.testing`` serves torch's): nothing in
the library imports this package."""
