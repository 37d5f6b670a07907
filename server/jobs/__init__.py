"""A standing network's jobs (``fed-server --serve``): a training job's life is
:mod:`.job`, read top-down; see docs/network.md."""
