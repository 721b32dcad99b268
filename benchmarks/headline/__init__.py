"""The headline suite (issue 15, item 5): kvctl's adaptive policy against every fixed
strategy and the peers, on accuracy (CPU, default model) and speed (GPU workload).

    python -m benchmarks.headline [--quick] [--out DIR]     # accuracy side
    python -m benchmarks.headline.gpu ...                   # speed side (a GPU)

See benchmarks/headline/__main__.py and docs/BENCHMARKS.md ("Headline suite")."""
