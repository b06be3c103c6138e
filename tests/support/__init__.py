"""Shared test helpers: a fresh PostgreSQL database per test, real `hpo` subprocesses, job specs."""
