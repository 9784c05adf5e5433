"""Ray orchestration of dsa_dist jobs: ``python -m launch CONFIG.yaml`` (docs/ray.md).

- ``launch/cluster.py``: generic machinery (connect, resource check, node-by-node placement, worker groups);
- ``launch/worker.py``: the per-rank actor with coarse methods (setup, run_stage, shutdown) over the trainer;
- ``launch/driver.py``: the job driver, its restart loop and the summary table (``launch/report.py``).
"""
