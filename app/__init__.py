"""The HTTP service of Model LEGO: FastAPI app, catalog, storage, settings, CLI."""
