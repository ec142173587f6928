"""Plain helper modules of the tests that are not peers: data, datasets, derived outputs."""
