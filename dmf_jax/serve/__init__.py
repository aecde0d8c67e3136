"""Serving: request preparation, the server, export, and the exported scorer."""
