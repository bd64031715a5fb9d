"""The monitor service: drives the ESP's import and send for each uploaded list."""
