"""The Prefect flows (clipgram.flows): the ingest DAG (ingest.py) and its deployments
(deploy.py). The library never imports this package; the CLI does, only to run or serve a flow.
"""

import os

# Before Prefect is first imported, by any module of this package:
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "clipgram")  # stage logs in the Prefect UI
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # clipgram runs offline too
# stage functions log outside flow runs too (tests, `clipgram status`): that is not an error
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
