"""Test oracles: plain implementations that only tests (and benchmarks) call, kept out of the package so a
reader knows which code serves users."""
