"""Quiescing steps: database dumps, exec hooks, stopped containers."""
