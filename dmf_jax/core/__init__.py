"""Shared types and checks: schema, catalog, item rows, sharding rules, errors, locks."""
