"""The ``hpo`` command line: local runs, the server, workers, and a client for the REST API."""
