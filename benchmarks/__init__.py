"""refdir benchmarks: how close each stage runs to the limit it could reach, measured side by side.

    python -m benchmarks.run            # `make bench`: full run (~10-15 min on 2 cores), writes results/latest.json
    python -m benchmarks.run --quick    # tiny sizes (< 60 s), a smoke test of the harness

One module per measured stage (extraction, aggregation, generation, rerun, storage, scale), shared
timing / machine / model helpers in `common`, the table in `report`, the H200 calibration of the scale
estimate in `calibrate` (the lead's GPU checks live in `gpu/`). See README.md.
"""
