"""Developer tools: the demo runner and its helpers (not part of the services)."""
