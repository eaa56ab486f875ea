"""ttrpc package."""
