"""Places the algorithms on Ray: Ray Train runs, checkpoints, MLflow tracking and the CLI.

Data flows one way: config -> orchestrator -> algorithms -> metrics back up. The orchestrator decides
where models live and where results go; it never computes a loss.
"""
