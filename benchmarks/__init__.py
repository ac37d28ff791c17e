"""refdir benchmarks: every goal of the performance issue measured side by side, one process.

    python -m benchmarks.run            # `make bench`: writes results/latest.json
    python -m benchmarks.run --quick    # tiny sizes, a smoke test of the harness
    python -m benchmarks.gpu            # the one prepared GPU script (an H200 via the device tool)

One module per measured stage (extraction, aggregation, generation, sql, rerun), the 13-model estimate in
`scale`, shared timing / machine / model helpers in `common`. See README.md.
"""
