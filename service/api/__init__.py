"""The FastAPI application: thin routes over the data layer; see ``app.create_app``."""
